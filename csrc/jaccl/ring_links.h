// JACCL's ring variant: the ring backend's algorithms (csrc/ring) run unchanged over the
// mesh's queue pairs, through this adapter from their byte-stream interface (core/transfer.h).
// Each direction of the ring is one link; a peer's transfers travel its queue pair in link
// order, which both sides agree on.
#pragma once

#include "core/transfer.h"
#include "jaccl/mesh.h"

namespace mlxdist::jaccl {

class RingLinks : public Links {
 public:
  RingLinks(Mesh& mesh, verbs::QueuePairs& qp) : mesh_(mesh), qp_(qp) {}
  int links_per_peer() const override { return 2; }
  void run(std::vector<Transfer>& transfers, Deadline deadline) override;
  std::string describe_peer(int peer) const override { return qp_.describe_peer(peer); }
  void close() override {}  // the group closes the queue pairs

 private:
  Mesh& mesh_;
  verbs::QueuePairs& qp_;
};

}  // namespace mlxdist::jaccl
