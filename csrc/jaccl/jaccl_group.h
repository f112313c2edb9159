// The JACCL backend: MLX's JACCL (collectives for fully connected ranks over RDMA), here over
// verbs-style queue pairs from libibverbs or, for ranks on one host, shared memory. A TCP
// ring group of the same ranks is its control channel: set-up exchanges, split, and noticing
// a peer that died.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/calls.h"
#include "core/group.h"
#include "jaccl/mesh.h"
#include "ring/ring_group.h"

namespace mlxdist::jaccl {

struct Options {
  std::string transport = "auto";    // auto (shared memory on one host, else ibverbs), shm, ibverbs
  std::vector<std::string> devices;  // this rank's row of MLX_IBV_DEVICES ("" for itself)
  std::string ibverbs_lib = "libibverbs.so.1";
  int gid_index = -1;  // MLXDIST_IBV_GID_INDEX (-1: pick one)
  size_t frame_bytes = 256 << 10;
  int depth = 4;
  bool ring = false;  // MLX_JACCL_RING: the ring algorithms over the same queue pairs
};

class JacclGroup : public Group {
 public:
  JacclGroup(std::shared_ptr<ring::RingGroup> control, Options opts);
  ~JacclGroup() override;

  int rank() const override { return control_->rank(); }
  int size() const override { return control_->size(); }
  uint64_t id() const override { return id_; }
  const char* backend() const override { return "jaccl"; }

  MLXDIST_GROUP_OPS  // core/group.h
  Calls& calls() override { return calls_; }
  MLXDIST_EXCHANGE_OPS
  void abort(const std::string& why) override;
  void close() override;
  bool sending() const override { return mesh_ && mesh_->pending(); }
  void progress_sends(std::chrono::microseconds wait) override { mesh_->progress(wait); }
  void flush_sends() override { mesh_->flush(); }

 private:
  std::shared_ptr<ring::RingGroup> control_;
  Options opts_;
  uint64_t id_;
  std::unique_ptr<verbs::QueuePairs> qp_;
  std::unique_ptr<Mesh> mesh_;
  std::unique_ptr<ring::RingGroup> ring_;  // the ring variant runs every op through it
  Calls calls_;
  std::vector<char> work_, out_;
};

// The world: a TCP control group from the ring's configuration (hostfile or coordinator
// table), then queue pairs over the chosen transport.
std::shared_ptr<Group> make_world(int rank, const std::vector<std::vector<std::string>>& hostfile,
                                  const std::vector<int>& listen_fds, ring::Options ring_opts,
                                  Options opts);

}  // namespace mlxdist::jaccl
