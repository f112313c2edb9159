// The MPI backend: every op through the machine's MPI library (its fabric, its launcher).
// Ops are posted non-blocking and polled, so a stalled peer fails at the timeout instead of
// blocking forever, and each collective first exchanges its header, so ranks that call
// different ops, dtypes or shapes fail with both calls named instead of mixing data.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "core/calls.h"
#include "core/group.h"
#include "mpi/mpi_lib.h"

namespace mlxdist::mpi {

class MpiGroup : public Group {
 public:
  // Takes ownership of comm (a communicator of its own, never MPI_COMM_WORLD itself).
  MpiGroup(Lib& lib, Handle comm, uint64_t id, double timeout_s);
  ~MpiGroup() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  uint64_t id() const override { return id_; }
  const char* backend() const override { return "mpi"; }

  MLXDIST_GROUP_OPS  // core/group.h
  Calls& calls() override { return calls_; }
  MLXDIST_EXCHANGE_OPS
  void abort(const std::string& why) override;
  void close() override;
  bool sending() const override { return !outbox_.empty(); }
  void progress_sends(std::chrono::microseconds wait) override;
  void flush_sends() override;

 private:
  // A send whose op returned: MPI reads its own copy of the data until the receiver took it.
  struct Pending {
    Handle reqs[2];
    std::unique_ptr<Header> header;
    std::vector<char> data;
    int dst;
    std::chrono::steady_clock::time_point posted;
  };
  // Drops completed sends; throws when one has waited for MLXDIST_TIMEOUT.
  void reap();
  // All ranks' headers for the next collective must match this rank's.
  void agree(const Header& mine);
  // Polls req until it completes or the timeout passes (naming what and the peer, if one).
  void wait(Handle& req, const std::string& what);
  // Reduction in MPI: float16/bfloat16 travel widened to float32 (as the ring accumulates).
  void reduce(const void* in, void* out, size_t count, DType t, ReduceOp op, bool scatter);
  Handle op_for(DType t, ReduceOp op) const;
  // Throws with the reason a peer left, if one sent its farewell (checked while waiting long).
  void check_farewells();

  Lib& lib_;
  Handle comm_;
  uint64_t id_;
  double timeout_s_;
  int rank_ = 0, size_ = 1;
  Calls calls_;
  uint64_t splits_ = 0;
  std::vector<Header> headers_;
  std::vector<float> wide_in_, wide_out_;
  std::vector<char> scratch_;
  std::deque<Pending> outbox_;
  bool failed_ = false;
  bool said_farewell_ = false;
};

// The world group: a duplicate of MPI_COMM_WORLD (so the program's own MPI traffic never
// pairs with ours).
std::shared_ptr<Group> make_world(const std::string& lib_path, double timeout_s);

}  // namespace mlxdist::mpi
