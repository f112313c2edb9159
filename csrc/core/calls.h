// The header of each call a group makes, numbered the same way on every backend: collectives
// (and split, barrier, set-up exchanges) in one sequence, point-to-point messages in one
// sequence per peer and direction. Both ends of a message derive the same header, so a peer
// that called something else is caught by comparing them (core/header.h).
#pragma once

#include <cstdint>
#include <vector>

#include "core/header.h"
#include "core/recorder.h"

namespace mlxdist {

class Calls {
 public:
  Calls(uint64_t group, int size) : group_(group), sent_(size_t(size)), received_(size_t(size)) {}

  Header collective(OpCode op, DType t, ReduceOp r, uint64_t nbytes, uint64_t shape_hash) {
    return noted(make_header(group_, op, t, r, nbytes, shape_hash, seq_++));
  }
  Header send(DType t, uint64_t nbytes, uint64_t shape_hash, int dst, int tag) {
    return p2p(t, nbytes, shape_hash, sent_[size_t(dst)]++, tag);
  }
  Header recv(DType t, uint64_t nbytes, uint64_t shape_hash, int src, int tag) {
    return p2p(t, nbytes, shape_hash, received_[size_t(src)]++, tag);
  }
  // A rooted collective's (broadcast, reduce, gather, scatter): the root rides in the tag and
  // the hash, so ranks that disagree on it fail the header check.
  Header rooted(OpCode op, DType t, ReduceOp r, uint64_t nbytes, uint64_t shape_hash, int root) {
    Header h = make_header(group_, op, t, r, nbytes,
                           shape_hash ^ (uint64_t(root) * 0x9e3779b97f4a7c15ull), seq_++);
    h.tag = uint8_t(root);
    return noted(h);
  }
  // sendrecv's two: a send to dst and a recv from src, each in its own peer's sequence.
  struct Pair {
    Header send, recv;
  };
  Pair sendrecv(DType t, uint64_t send_bytes, uint64_t send_hash, int dst, uint64_t recv_bytes,
                uint64_t recv_hash, int src, int tag) {
    return {send(t, send_bytes, send_hash, dst, tag), recv(t, recv_bytes, recv_hash, src, tag)};
  }
  // Outside the sequence (a group's own set-up, before any call): shape_hash tells them apart.
  Header unnumbered(OpCode op, DType t, uint64_t nbytes, uint64_t shape_hash) const {
    return make_header(group_, op, t, ReduceOp::kSum, nbytes, shape_hash, 0);
  }

 private:
  Header p2p(DType t, uint64_t nbytes, uint64_t shape_hash, uint64_t seq, int tag) const {
    Header h = make_header(group_, OpCode::kSend, t, ReduceOp::kSum, nbytes, shape_hash, seq);
    h.tag = uint8_t(tag);
    return noted(h);
  }
  // The running op's flight record takes its first header (core/recorder.h).
  static Header noted(const Header& h) {
    Recorder::note_header(h);
    return h;
  }

  uint64_t group_;
  uint64_t seq_ = 0;
  std::vector<uint64_t> sent_, received_;
};

// Whether a reduction of t travels (and accumulates) as float32: float16 and bfloat16 sums
// and products, so every backend rounds once, at the end.
inline bool widened(DType t, ReduceOp op) {
  return is_half(t) && (op == ReduceOp::kSum || op == ReduceOp::kProd);
}

}  // namespace mlxdist
