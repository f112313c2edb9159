// Byte streams between ranks that are threads of one process, through bounded in-memory pipes:
// the algorithms run over it in unit tests without processes or sockets (as gloo tests every
// algorithm over every transport). Not a transport for real jobs.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "core/transfer.h"

namespace mlxdist::memory {

// The pipes of n ranks: one per (from, to, link), each holding at most `capacity` bytes, so
// senders wait for receivers as over a socket.
class Hub {
 public:
  explicit Hub(size_t capacity) : capacity_(capacity) {}

 private:
  friend class MemoryLinks;
  std::mutex mu_;
  std::condition_variable moved_;
  std::map<std::tuple<int, int, int>, std::deque<char>> pipes_;
  std::map<int, std::string> left_;  // rank -> why it failed (its farewell)
  size_t capacity_;
};

class MemoryLinks : public Links {
 public:
  MemoryLinks(std::shared_ptr<Hub> hub, int me, int links, double timeout_s)
      : hub_(std::move(hub)), me_(me), links_(links), timeout_s_(timeout_s) {}
  int links_per_peer() const override { return links_; }
  void run(std::vector<Transfer>& transfers, Deadline deadline) override;
  std::string describe_peer(int peer) const override { return "rank " + std::to_string(peer); }
  void close() override {}
  void reset(const std::string& why) override;  // peers waiting on this rank raise with why

 private:
  std::shared_ptr<Hub> hub_;
  int me_, links_;
  double timeout_s_;
};

}  // namespace mlxdist::memory
