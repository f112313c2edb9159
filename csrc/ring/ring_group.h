// The TCP ring backend: MLX's ring, configured the same way (a hostfile listing "ip:port"
// entries per rank, one socket per entry), plus any-to-any send/recv and split.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/group.h"
#include "core/calls.h"
#include "core/transfer.h"
#include "transport/outbox.h"
#include "transport/tcp.h"

namespace mlxdist::ring {

// Every world rank's listening addresses; shared by the world group and its sub-groups.
struct AddressBook {
  std::vector<std::vector<tcp::Address>> addrs;
};

// Longer timeouts are cut to this (115 days: effectively none) so deadlines cannot overflow.
constexpr double kMaxTimeout = 1e7;

struct Options {
  double timeout_s = 300;
  bool verbose = false;
  std::string token;  // MLXDIST_TOKEN: every connection proves it; empty: no authentication
  std::string transport = "auto";  // MLXDIST_TRANSPORT: auto (shared memory on one host), tcp, shm
  size_t shm_ring_bytes = 2 << 20;  // per (peer, link) ring in shared memory: 4 chunks
  size_t chunk_bytes = 512 << 10;
  size_t small_bytes = 64 << 10;  // all-reduce at or below this: gather, then reduce in rank order
};

class RingGroup : public Group {
 public:
  // Connects to the other members (world ranks, in group-rank order); blocks until done.
  RingGroup(uint64_t id, int rank, std::vector<int> world_ranks,
            std::shared_ptr<const AddressBook> book, Options opts);
  // Over links another backend provides (JACCL's ring variant); such a group cannot split.
  RingGroup(uint64_t id, int rank, int size, std::unique_ptr<Links> links, Options opts);
  ~RingGroup() override;

  int rank() const override { return rank_; }
  int size() const override { return int(world_ranks_.size()); }
  uint64_t id() const override { return id_; }
  const char* backend() const override { return "ring"; }

  MLXDIST_GROUP_OPS  // core/group.h
  Calls& calls() override { return calls_; }
  MLXDIST_EXCHANGE_OPS
  // A split's first step, checked like every op: every member's (color, key), member-major.
  std::vector<int32_t> gather_split(int color, int key);
  void abort(const std::string& why) override;
  void close() override;
  bool sending() const override { return outbox_ && outbox_->pending(); }
  void progress_sends(std::chrono::microseconds wait) override { outbox_->progress(wait); }
  void flush_sends() override { outbox_->flush(); }

  // For groups that run their data elsewhere and use this one as their control channel:
  // one blob from every member (collective), peers whose connections closed, peer names.
  std::vector<std::string> exchange(const std::string& mine);
  std::string lost_peers(const std::vector<int>& which) const;
  std::string describe_peer(int peer) const { return links_->describe_peer(peer); }
  const Options& options() const { return opts_; }

 private:
  struct Context;
  // Moves the data path to shared memory when every member is on this host (and allowed).
  void try_shared_memory();
  // Last step of construction: sends from now on may outlive their op.
  void open_outbox();

  uint64_t id_;
  int rank_;
  std::vector<int> world_ranks_;
  std::shared_ptr<const AddressBook> book_;
  Options opts_;
  std::unique_ptr<Links> links_;
  Outbox* outbox_ = nullptr;  // links_, once open_outbox wrapped them
  Calls calls_;
  uint64_t splits_ = 0;
  std::vector<char> scratch_, work_;
};

// The world group from a parsed hostfile. listen_fds: inherited listening sockets for this
// rank's entries (empty: bind them here).
std::shared_ptr<Group> make_world(int rank, const std::vector<std::vector<std::string>>& hostfile,
                                  const std::vector<int>& listen_fds, Options opts);

}  // namespace mlxdist::ring
