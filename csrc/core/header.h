// The header every message carries. Each side compares the header it receives with the one it
// expects, so ranks that call different collectives, shapes or dtypes fail fast with both sides
// named instead of exchanging wrong bytes or waiting forever.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace mlxdist {

enum class OpCode : uint8_t {
  kAllReduce = 1, kAllGather, kReduceScatter, kSend, kBarrier, kSplit, kSetup, kAllToAll,
  kBroadcast, kReduce, kGather, kScatter  // rooted: the root in Header::tag
};

constexpr uint32_t kHeaderMagic = 0x4d4c5844;  // "MLXD"

// Host byte order: the ranks of one job share an architecture.
struct Header {
  uint32_t magic = kHeaderMagic;
  OpCode op = OpCode::kAllReduce;
  DType dtype = DType::kUInt8;
  ReduceOp reduce = ReduceOp::kSum;
  uint8_t tag = 0;          // send/recv: 0 for values, k for k-th order tangents (autodiff);
                            // rooted collectives: the root (mod 256; the hash has the rest)
  uint64_t group = 0;
  uint64_t seq = 0;         // per-group collective counter, or per-peer counter for send/recv
  uint64_t nbytes = 0;      // this rank's input bytes
  uint64_t shape_hash = 0;  // hash of the input shape, so equal byte counts of other shapes differ
};
static_assert(sizeof(Header) == 40, "header layout is part of the wire format");

inline Header make_header(uint64_t group, OpCode op, DType t, ReduceOp r, uint64_t nbytes,
                          uint64_t shape_hash, uint64_t seq) {
  Header h;
  h.op = op;
  h.dtype = t;
  h.reduce = r;
  h.group = group;
  h.seq = seq;
  h.nbytes = nbytes;
  h.shape_hash = shape_hash;
  return h;
}

// "all_sum(float32, 64 bytes, #3)": the op as a user would name it.
std::string describe(const Header& h);

// Throws DistError naming this rank's call and the peer's when they differ.
void check_header(const Header& mine, const Header& theirs, const std::string& me,
                  const std::string& peer);

// Header agreement for backends that exchange every member's header before an op (MPI,
// NCCL): all[p] is member p's; throws naming the first that differs from mine.
void check_headers(const Header& mine, const std::vector<Header>& all, int me,
                   const std::function<std::string(int)>& name);

}  // namespace mlxdist
