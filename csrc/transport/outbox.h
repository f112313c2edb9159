// Sends that outlive their op. A send's op returns once its bytes are handed to the transport,
// the rest copied here, so a rank never waits in send for its receiver to reach recv (ring
// passes, pipeline stages). The outbox wraps a group's links: every later run moves the sends
// still pending ahead of its own transfers on the same link (byte order is kept), and the
// group's engine moves them while it has nothing else to do. Memory: the unsent part of each
// pending send, copied once; nothing for a send the transport takes whole.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "core/transfer.h"

namespace mlxdist {

class Outbox : public Links {
 public:
  Outbox(std::unique_ptr<Links> inner, double timeout_s)
      : inner_(std::move(inner)), timeout_s_(timeout_s) {}

  int links_per_peer() const override { return inner_->links_per_peer(); }
  bool can_combine() const override { return inner_->can_combine(); }
  // Pending sends move first; a background transfer of `transfers` left unfinished is adopted.
  void run(std::vector<Transfer>& transfers, Deadline deadline) override;
  std::string describe_peer(int peer) const override { return inner_->describe_peer(peer); }
  std::string lost_peers(const std::vector<int>& which) const override {
    return inner_->lost_peers(which);
  }
  void close() override { inner_->close(); }
  void reset(const std::string& why) override;

  bool pending() const { return !pending_.empty(); }
  // Moves pending sends, waiting at most `wait` for one to be able to move. Throws when a
  // transfer fails or a send has not moved for MLXDIST_TIMEOUT (its receiver never took it).
  void progress(Clock::duration wait);
  // Until every pending send is delivered to the transport (same errors).
  void flush();

 private:
  struct Pending {
    Transfer t;
    std::vector<std::vector<char>> copies;  // the bytes its segments point at
    Clock::time_point moved;                // when it last made progress
  };
  void run_with_pending(std::vector<Transfer>& transfers, Deadline deadline);
  void adopt(Transfer& t);
  void check_stalls();

  std::unique_ptr<Links> inner_;
  double timeout_s_;
  std::deque<Pending> pending_;  // in the order they were sent
};

}  // namespace mlxdist
