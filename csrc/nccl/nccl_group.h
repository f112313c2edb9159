// The NCCL backend: collectives and point-to-point on CUDA arrays, enqueued by NCCL on XLA's
// stream with no host synchronisation. A TCP ring group of the same ranks is its control
// channel: it hands out NCCL's unique id at start-up, checks that every rank calls the same op
// (headers, as the other backends do), and runs what NCCL lacks (16-bit integers, complex
// max/min/prod, float max/min that keep NaN, arrays in host memory) on staged host buffers. A watchdog thread turns a
// stalled or failed op into a DistError and aborts the communicator, so peers never wait forever.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/calls.h"
#include "core/group.h"
#include "ring/ring_group.h"
#include "nccl/nccl_lib.h"

namespace mlxdist::nccl {

struct Options {
  std::string lib;    // MLXDIST_NCCL_LIB, or "" for libnccl.so.2
  int device = 0;     // this rank's CUDA device (ordinal)
  bool check = true;  // MLXDIST_NCCL_CHECK: agree on each op's header before NCCL runs it
};

class NcclGroup : public Group, public StreamOps {
 public:
  // Connects every pair for point-to-point (see connect_pairs) under the watchdog.
  NcclGroup(std::shared_ptr<ring::RingGroup> control, Comm comm, Options opts);
  ~NcclGroup() override;

  int rank() const override { return control_->rank(); }
  int size() const override { return control_->size(); }
  uint64_t id() const override { return id_; }
  const char* backend() const override { return "nccl"; }

  // Host memory: through the control ring (CPU arrays, and dtypes NCCL lacks).
  MLXDIST_GROUP_OPS  // core/group.h
  Calls& calls() override { return calls_; }
  void abort(const std::string& why) override;
  void close() override;
  std::string unreported_failure() const override;

  // Device memory, enqueued on XLA's stream (core/group.h). NCCL runs every dtype for what
  // reduces nothing (bytes) and the reductions its types have (NaN-propagating max/min aside).
  StreamOps* stream_ops() override { return this; }
  bool runs(DType t, ReduceOp op) const override;
  void all_reduce_on(void* stream, const void* in, void* out, size_t count, DType t, ReduceOp op,
                     uint64_t shape_hash) override;
  void all_gather_on(void* stream, const void* in, void* out, size_t count, DType t,
                     uint64_t shape_hash) override;
  void reduce_scatter_on(void* stream, const void* in, void* out, size_t count, DType t,
                         ReduceOp op, uint64_t shape_hash) override;
  void send_on(void* stream, const void* in, size_t count, DType t, int dst, uint64_t shape_hash,
               int tag) override;
  void recv_on(void* stream, void* out, size_t count, DType t, int src, uint64_t shape_hash,
               int tag) override;
  // Waits for the group's work on stream (raising what failed), then a barrier on the host.
  void sendrecv_on(void* stream, const void* in, size_t send_count, int dst, uint64_t send_hash,
                   void* out, size_t recv_count, int src, uint64_t recv_hash, DType t,
                   int tag) override;
  void all_to_all_on(void* stream, const void* in, const std::vector<size_t>& send_counts,
                     void* out, const std::vector<size_t>& recv_counts, DType t,
                     uint64_t shape_hash) override;
  void barrier_on(void* stream) override;

 private:
  using Clock = std::chrono::steady_clock;
  // An op on a stream, between two events; its clock starts when the stream reaches it.
  struct Pending {
    void* start;
    void* done;
    std::string what;
    bool started = false;
    Clock::time_point since;
  };

  // Every member's header for this collective must match (when checking).
  void agree(const Header& mine);
  // Runs body as one op: any error poisons the group (NCCL aborted, the control ring reset so
  // peers waiting on this rank fail now, not at their timeout).
  template <typename Body>
  void guarded(Body&& body);
  // A host call into NCCL that may block on peers: the watchdog aborts it at the timeout.
  template <typename Call>
  int blocking(const std::string& what, Call&& call);
  // Runs an NCCL call that enqueues on stream, then watches it until the stream passes it.
  template <typename Call>
  void enqueue(void* stream, const std::string& what, const char* call, Call&& nccl_call);
  void connect_pairs();
  void drain();  // until no op is pending (the watchdog fails them at the timeout)
  void watch();
  void* take_event_locked();
  void fail_locked(const std::string& why, bool reported);  // mu_ held: records, aborts NCCL
  void throw_if_failed_locked();
  void stop_watchdog();

  std::shared_ptr<ring::RingGroup> control_;
  Lib& lib_;
  Options opts_;
  uint64_t id_;
  double timeout_s_;
  Calls calls_;

  std::mutex ops_mu_;  // one op at a time (and close): header agreement, then the NCCL call
  mutable std::mutex mu_;  // the state below, shared with the watchdog
  std::condition_variable cv_;
  Comm comm_;
  bool destroyed_ = false;  // comm_ aborted or destroyed: never touch it again
  std::string in_call_;     // a blocking NCCL host call under way, and since when
  Clock::time_point in_call_since_;
  std::deque<Pending> pending_;
  std::vector<void*> free_events_;
  std::string failure_;
  bool failure_reported_ = false;  // raised to a caller already
  bool stop_ = false;
  std::thread watchdog_;
};

// The world: a TCP control ring from the ring's configuration (hostfile or coordinator
// table), then an NCCL communicator on opts.device with the unique id rank 0 hands out.
std::shared_ptr<Group> make_world(int rank, const std::vector<std::vector<std::string>>& hostfile,
                                  const std::vector<int>& listen_fds, ring::Options ring_opts,
                                  Options opts);

}  // namespace mlxdist::nccl
