// One engine per group: a persistent thread that runs the group's posted operations in order
// and completes their callbacks. FFI handlers post and return at once, so XLA threads never
// block on the network. After a failure the group is poisoned: its connections are dropped
// (peers then fail fast) and later operations fail with the original error.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "core/group.h"
#include "core/recorder.h"

namespace mlxdist {

class Engine {
 public:
  // Called on the engine thread with "" on success or the error text.
  using Done = std::function<void(const std::string& error)>;

  explicit Engine(std::shared_ptr<Group> group);
  ~Engine();  // drains queued work, then joins the thread

  Group& group() { return *group_; }
  std::shared_ptr<Group> group_ptr() { return group_; }

  // what names the op for error messages ("all_sum"); work runs on the engine thread.
  void post(std::string what, std::function<void(Group&)> work, Done done);
  // post() and wait; rethrows the error as DistError.
  void run_sync(std::string what, std::function<void(Group&)> work);
  // Waits for queued work and pending sends, then stops the thread; later posts fail.
  void shutdown();
  // After shutdown: a failure of a send that had already returned, which no op reported.
  const std::string& unreported_failure() const { return unreported_; }
  const Recorder& recorder() const { return recorder_; }

 private:
  struct Task {
    std::string what;
    std::function<void(Group&)> work;
    Done done;
    int64_t queued_ns = 0;
  };
  void loop();
  // Polls the queue for up to kSpin before sleeping (see engine.cc).
  void spin_for_work();
  // Runs group work outside any op (pending sends); a failure poisons the group like an op's.
  void in_background(const std::function<void()>& work);

  std::shared_ptr<Group> group_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without the lock
  bool stopping_ = false;
  std::string failure_;  // engine thread only
  std::string unreported_;  // failure_ when it came from in_background and no op raised it
  Recorder recorder_;
  std::thread thread_;
};

}  // namespace mlxdist
