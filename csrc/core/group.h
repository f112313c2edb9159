// A communicator: a fixed set of ranks that run collectives together. Backends implement it;
// the engine calls it from one thread per group, so implementations need no locking.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/calls.h"
#include "core/dtype.h"
#include "core/header.h"

namespace mlxdist {

// Ops on device memory, enqueued on a device stream (XLA's) instead of run on the engine: what
// a group whose library drives the device itself offers (NCCL), as MLX's groups own a
// communication stream. Called from XLA's threads, one op at a time per group. A group without
// them, or an op it does not run natively, takes the staged path (gpu/staging.h): device
// memory copied through pinned host buffers and the op run on the engine.
class StreamOps {
 public:
  virtual ~StreamOps() = default;
  // Whether an op on dtype t reducing with op (kSum where nothing is reduced) runs here.
  virtual bool runs(DType t, ReduceOp op) const = 0;
  virtual void all_reduce_on(void* stream, const void* in, void* out, size_t count, DType t,
                             ReduceOp op, uint64_t shape_hash) = 0;
  virtual void all_gather_on(void* stream, const void* in, void* out, size_t count, DType t,
                             uint64_t shape_hash) = 0;
  virtual void reduce_scatter_on(void* stream, const void* in, void* out, size_t count, DType t,
                                 ReduceOp op, uint64_t shape_hash) = 0;
  virtual void send_on(void* stream, const void* in, size_t count, DType t, int dst,
                       uint64_t shape_hash, int tag) = 0;
  virtual void recv_on(void* stream, void* out, size_t count, DType t, int src,
                       uint64_t shape_hash, int tag) = 0;
  virtual void sendrecv_on(void* stream, const void* in, size_t send_count, int dst,
                           uint64_t send_hash, void* out, size_t recv_count, int src,
                           uint64_t recv_hash, DType t, int tag) = 0;
  virtual void all_to_all_on(void* stream, const void* in, const std::vector<size_t>& send_counts,
                             void* out, const std::vector<size_t>& recv_counts, DType t,
                             uint64_t shape_hash) = 0;
  // Waits for the group's work on stream (raising what failed), then a barrier.
  virtual void barrier_on(void* stream) = 0;
};

class Group {
 public:
  virtual ~Group() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual uint64_t id() const = 0;
  virtual const char* backend() const = 0;

  // count elements of dtype t in and out (out may alias in).
  virtual void all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                          uint64_t shape_hash) = 0;
  // in: count elements; out: size() * count elements, rank-major.
  virtual void all_gather(const void* in, void* out, size_t count, DType t,
                          uint64_t shape_hash) = 0;
  // in: size() * count elements; out: this rank's count-element block of the reduction.
  virtual void reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,
                              uint64_t shape_hash) = 0;
  // tag: 0 for values, k for k-th order tangents, so autodiff's messages never pair with values.
  virtual void send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash,
                    int tag) = 0;
  virtual void recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) = 0;
  // Sends in to dst and receives out from src at once (as MPI_Sendrecv); it pairs with a
  // plain recv on dst and a plain send on src. By default a send then a recv: right where
  // sends never wait for their receiver.
  virtual void sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash, void* out,
                        size_t recv_count, int src, uint64_t recv_hash, DType t, int tag);
  // in: size() blocks in rank order, block p (send_counts[p] elements) for rank p; out: the
  // blocks every rank sent to this one, in rank order (recv_counts[p] elements from rank p).
  // By default composed of sends and recvs (the backends override it with one exchange).
  virtual void all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,
                          const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash);
  virtual void barrier() = 0;

  // Several arrays of one dtype reduced in one op (a pytree's leaves), each in[i] into out[i]
  // (out may alias in): the small ones packed into one message, the others in place, each
  // as all_reduce would.
  void all_reduce_many(const std::vector<const void*>& ins, const std::vector<void*>& outs,
                       const std::vector<size_t>& counts, DType t, ReduceOp op,
                       uint64_t shape_hash);

  // Rooted collectives, each built on star() below. count: elements of this rank's block.
  // broadcast: out = root's in, everywhere. reduce: root's out = the reduction over ranks (in
  // rank order: the same bits as all_reduce's); elsewhere out = in. gather: root's out = every
  // rank's in, rank-major; elsewhere out = in. scatter: root's in holds size() blocks, every
  // rank's out gets its own; elsewhere in is ignored.
  void broadcast(const void* in, void* out, size_t count, DType t, int root, uint64_t shape_hash);
  void reduce(const void* in, void* out, size_t count, DType t, ReduceOp op, int root,
              uint64_t shape_hash);
  void gather(const void* in, void* out, size_t count, DType t, int root, uint64_t shape_hash);
  void scatter(const void* in, void* out, size_t count, DType t, int root, uint64_t shape_hash);
  // Collective over this group; ranks of one color form a new group ordered by (key, rank).
  virtual std::shared_ptr<Group> split(int color, int key) = 0;
  // After a failure: tell the peers why (best effort, so a survivor's error names the cause
  // and no survivor completes a call this rank abandoned), then drop all connections (peers
  // fail fast instead of waiting for the timeout).
  virtual void abort(const std::string& why) = 0;
  // Release the connections after the last op, letting bytes already sent arrive.
  virtual void close() { abort(""); }
  // Sends whose op returned before their receiver took them all (a send never waits for its
  // recv). The engine moves them while it is idle and delivers them before the group closes;
  // both throw as an op would (a lost peer, nothing moved for MLXDIST_TIMEOUT).
  virtual bool sending() const { return false; }
  virtual void progress_sends(std::chrono::microseconds wait) { (void)wait; }
  virtual void flush_sends() {}
  // A failure found after its op returned (asynchronous backends) that no call has raised yet.
  virtual std::string unreported_failure() const { return ""; }
  // Its ops on device streams, if it has them (else nullptr: the staged path).
  virtual StreamOps* stream_ops() { return nullptr; }

  // What a rooted collective moves: root exchanges with every other member, each of them with
  // root only; to[p] / from[p] are the bytes for and from member p (empty where nothing
  // moves). Both directions of each pair carry the op's header h, so members that disagree on
  // the op or the root raise on both sides, naming both calls. By default a sendrecv per pair.
  struct Bytes {
    const void* data = nullptr;
    size_t len = 0;
  };
  virtual void star(const Header& h, int root, const std::vector<Bytes>& to,
                    const std::vector<Bytes>& from);

  // "group 1a2b (rank 0 of 4)" for messages.
  std::string label() const;
  // Throws unless peer is another member (what: "destination", "source").
  void check_peer(int peer, const char* what) const;

 protected:
  // The group's call numbering (core/calls.h), for the ops built here.
  virtual Calls& calls() = 0;
};

// A backend's declarations of Group's ops, so their signatures are written once (above).
#define MLXDIST_GROUP_OPS                                                                       \
  void all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,                \
                  uint64_t shape_hash) override;                                                \
  void all_gather(const void* in, void* out, size_t count, DType t, uint64_t shape_hash)        \
      override;                                                                                 \
  void reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,            \
                      uint64_t shape_hash) override;                                            \
  void send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash, int tag)       \
      override;                                                                                 \
  void recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) override;  \
  void barrier() override;                                                                      \
  std::shared_ptr<Group> split(int color, int key) override;

// all_to_all's byte offsets of every rank's block (size + 1 entries each); throws unless this
// rank keeps as much of its own block as it expects.
struct BlockOffsets {
  std::vector<size_t> send_at, recv_at;
};
BlockOffsets block_offsets(const std::vector<size_t>& send_counts,
                           const std::vector<size_t>& recv_counts, size_t es, int me);
// The same, once this rank's own block is copied from in to out (host memory).
BlockOffsets keep_own_block(const void* in, const std::vector<size_t>& send_counts, void* out,
                            const std::vector<size_t>& recv_counts, size_t es, int me);

// The exchanges a backend runs natively instead of Group's composition of sends and recvs.
#define MLXDIST_EXCHANGE_OPS                                                                    \
  void star(const Header& h, int root, const std::vector<Bytes>& to,                            \
            const std::vector<Bytes>& from) override;                                           \
  void sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash, void* out,      \
                size_t recv_count, int src, uint64_t recv_hash, DType t, int tag) override;     \
  void all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,            \
                  const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash)         \
      override;

// A splitmix64 step: group ids derived the same way agree on every rank.
inline uint64_t mix_ids(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9e3779b97f4a7c15ull + (b << 6) + (b >> 2);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace mlxdist
