#include "core/engine.h"

#include <pthread.h>

#include <future>
#include <thread>
#include <sstream>

#include "core/error.h"

namespace mlxdist {

std::string Group::label() const {
  return std::string(backend()) + " group " + hex(id() & 0xffffff) + " (rank " +
         std::to_string(rank()) + " of " + std::to_string(size()) + ")";
}

void Group::check_peer(int peer, const char* what) const {
  if (peer < 0 || peer >= size() || peer == rank())
    fail("invalid ", what, " rank ", peer, " for this rank ", rank(), " of a group of size ", size());
}

Engine::Engine(std::shared_ptr<Group> group)
    : group_(std::move(group)), thread_([this] { loop(); }) {}

Engine::~Engine() { shutdown(); }

void Engine::post(std::string what, std::function<void(Group&)> work, Done done) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      queue_.push_back(Task{std::move(what), std::move(work), std::move(done), recording() ? now_ns() : 0});
      queued_.fetch_add(1, std::memory_order_release);
      cv_.notify_one();
      return;
    }
  }
  done(what + " on " + group_->label() + ": the group is closed");
}

void Engine::run_sync(std::string what, std::function<void(Group&)> work) {
  std::promise<std::string> result;
  auto fut = result.get_future();
  post(std::move(what), std::move(work), [&result](const std::string& e) { result.set_value(e); });
  std::string err = fut.get();
  if (!err.empty()) throw DistError(err);
}

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    cv_.notify_one();
  }
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

// A small op takes a few microseconds; waking a sleeping thread takes as long again. The next
// op of a loop usually arrives within microseconds of the last one completing, so the engine
// polls briefly before it sleeps. Bounded, so an idle group costs no CPU.
constexpr auto kSpin = std::chrono::microseconds(50);

void Engine::spin_for_work() {
  auto until = std::chrono::steady_clock::now() + kSpin;
  while (queued_.load(std::memory_order_acquire) == 0 &&
         std::chrono::steady_clock::now() < until)
    std::this_thread::yield();
}

void Engine::in_background(const std::function<void()>& work) {
  try {
    work();
  } catch (const std::exception& e) {
    failure_ = unreported_ = "send on " + group_->label() + ": " + e.what() + recorder_.context();
    group_->abort(failure_);
  }
}

// How long an idle engine with sends pending waits for them before it looks at its queue again.
constexpr auto kSendNap = std::chrono::milliseconds(1);

void Engine::loop() {
  pthread_setname_np(pthread_self(), "mlxdist-engine");  // lets leak checks count our threads
  for (;;) {
    Task task;
    spin_for_work();
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (queue_.empty() && !stopping_ && failure_.empty() && group_->sending()) {
        lock.unlock();
        in_background([this] { group_->progress_sends(kSendNap); });
        continue;
      }
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) break;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
    }
    std::string error;
    const bool record = recording();
    if (record) recorder_.begin(task.what, task.queued_ns);
    if (!failure_.empty()) {
      error = task.what + " on " + group_->label() +
              ": the group is unusable after an earlier error: " + failure_;
      unreported_.clear();
    } else {
      try {
        task.work(*group_);
      } catch (const std::exception& e) {
        error = task.what + " on " + group_->label() + ": " + e.what() + recorder_.context();
        failure_ = error;
        group_->abort(error);
      }
    }
    if (record) recorder_.end(error.empty(), op_log() ? group_->label() : std::string());
    task.done(error);
  }
  if (failure_.empty() && group_->sending()) in_background([this] { group_->flush_sends(); });
  group_->close();  // a failed group was reset already
}

}  // namespace mlxdist
