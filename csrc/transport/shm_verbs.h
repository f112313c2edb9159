// Verbs-style queue pairs between ranks on one host: each rank's registered memory lives in a
// shared segment its peers map, so a posted send is one copy straight into the receive its
// peer posted (as an RDMA NIC would place it). The group's control connections (TCP) stay
// open beside it and reveal a peer that died.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "transport/shm.h"
#include "transport/verbs.h"

namespace mlxdist::shm {

class ShmQueuePairs : public verbs::QueuePairs {
 public:
  // Creates this rank's segment (arena_bytes of registrable memory), publishes its name with
  // exchange and maps every peer's. Throws (on every rank) when one cannot.
  ShmQueuePairs(int me, int n, size_t arena_bytes, const AllGather& exchange,
                PeerNames names, LostPeers lost);
  ~ShmQueuePairs() override;

  verbs::Buffer allocate(size_t bytes) override;
  bool sends_from_any_memory() const override { return true; }
  void post_send(int peer, const verbs::Buffer& buf, size_t off, size_t len, uint64_t id) override;
  void post_recv(int peer, const verbs::Buffer& buf, size_t off, size_t len, uint64_t id) override;
  bool poll(std::vector<verbs::Completion>& done, Deadline deadline,
            const std::vector<int>& waiting_on) override;
  std::string describe_peer(int peer) const override { return names_(peer); }
  void close() override;
  void abort(const std::string& why) override;

  struct Postings;  // shared, in shm_verbs.cc

 private:
  struct PendingSend {
    const char* data;
    size_t len;
    uint64_t id;
  };
  Postings* postings(int owner) const;
  bool progress(std::vector<verbs::Completion>& done);  // true when something completed
  void ring_bell(int owner) const;
  void check_farewell(int peer) const;  // throws if peer left one

  PeerNames names_;
  LostPeers lost_;
  int me_, n_;
  size_t arena_bytes_, arena_used_ = 0;
  std::vector<std::unique_ptr<Mapping>> segments_;
  std::vector<std::deque<PendingSend>> sends_;  // per peer, waiting for its posted receives
  std::vector<std::deque<uint64_t>> recv_ids_;  // per peer, posted receives not yet completed
};

}  // namespace mlxdist::shm
