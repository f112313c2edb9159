#include "core/engine.h"

#include <pthread.h>

#include <cstring>
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

void Group::sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash, void* out,
                     size_t recv_count, int src, uint64_t recv_hash, DType t, int tag) {
  send(in, send_count, t, dst, send_hash, tag);
  recv(out, recv_count, t, src, recv_hash, tag);
}

BlockOffsets keep_own_block(const void* in, const std::vector<size_t>& send_counts, void* out,
                            const std::vector<size_t>& recv_counts, size_t es, int me) {
  BlockOffsets b = block_offsets(send_counts, recv_counts, es, me);
  std::memcpy(static_cast<char*>(out) + b.recv_at[me], static_cast<const char*>(in) + b.send_at[me],
              send_counts[me] * es);
  return b;
}

BlockOffsets block_offsets(const std::vector<size_t>& send_counts,
                           const std::vector<size_t>& recv_counts, size_t es, int me) {
  const size_t n = send_counts.size();
  if (recv_counts.size() != n) fail("all_to_all: ", n, " send counts but ", recv_counts.size(), " recv counts");
  if (recv_counts[me] != send_counts[me])
    fail("all_to_all: this rank keeps ", send_counts[me], " elements of its own block but expects ",
         recv_counts[me]);
  BlockOffsets b{std::vector<size_t>(n + 1, 0), std::vector<size_t>(n + 1, 0)};
  for (size_t p = 0; p < n; ++p) {
    b.send_at[p + 1] = b.send_at[p] + send_counts[p] * es;
    b.recv_at[p + 1] = b.recv_at[p] + recv_counts[p] * es;
  }
  return b;
}

void Group::all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,
                       const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash) {
  const int n = size(), me = rank();
  const auto b = keep_own_block(in, send_counts, out, recv_counts, dtype_size(t), me);
  for (int k = 1; k < n; ++k) {  // round k: to rank + k, from rank - k
    const int to = (me + k) % n, from = (me - k + n) % n;
    sendrecv(static_cast<const char*>(in) + b.send_at[to], send_counts[to], to, shape_hash,
             static_cast<char*>(out) + b.recv_at[from], recv_counts[from], from, shape_hash, t, 0);
  }
}

Engine::Engine(std::shared_ptr<Group> group)
    : group_(std::move(group)), thread_([this] { loop(); }) {}

Engine::~Engine() { shutdown(); }

void Engine::post(std::string what, std::function<void(Group&)> work, Done done) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      queue_.push_back(Task{std::move(what), std::move(work), std::move(done)});
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
    failure_ = unreported_ = "send on " + group_->label() + ": " + e.what();
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
    if (!failure_.empty()) {
      error = task.what + " on " + group_->label() +
              ": the group is unusable after an earlier error: " + failure_;
      unreported_.clear();
    } else {
      try {
        task.work(*group_);
      } catch (const std::exception& e) {
        error = task.what + " on " + group_->label() + ": " + e.what();
        failure_ = error;
        group_->abort(error);
      }
    }
    task.done(error);
  }
  if (failure_.empty() && group_->sending()) in_background([this] { group_->flush_sends(); });
  group_->close();  // a failed group was reset already
}

}  // namespace mlxdist
