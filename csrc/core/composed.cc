// Ops written once for every backend over its basic ones: broadcast, reduce, gather and
// scatter over Group::star (what moves between the root and each member; backends provide
// it), the reduction of many arrays over all_reduce, and the default sendrecv, all_to_all and
// star, composed of point-to-point calls (backends override them with one exchange).
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/group.h"
#include "core/prefault.h"

namespace mlxdist {
namespace {

void check_root(const Group& g, int root) {
  if (root < 0 || root >= g.size())
    fail("invalid root ", root, " for a group of size ", g.size());
}

}  // namespace

void Group::sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash, void* out,
                     size_t recv_count, int src, uint64_t recv_hash, DType t, int tag) {
  send(in, send_count, t, dst, send_hash, tag);
  recv(out, recv_count, t, src, recv_hash, tag);
}

BlockOffsets keep_own_block(const void* in, const std::vector<size_t>& send_counts, void* out,
                            const std::vector<size_t>& recv_counts, size_t es, int me) {
  BlockOffsets b = block_offsets(send_counts, recv_counts, es, me);
  std::memcpy(static_cast<char*>(out) + b.recv_at[me], static_cast<const char*>(in) + b.send_at[me],
              send_counts[me] * es);
  return b;
}

BlockOffsets block_offsets(const std::vector<size_t>& send_counts,
                           const std::vector<size_t>& recv_counts, size_t es, int me) {
  const size_t n = send_counts.size();
  if (recv_counts.size() != n) fail("all_to_all: ", n, " send counts but ", recv_counts.size(), " recv counts");
  if (recv_counts[me] != send_counts[me])
    fail("all_to_all: this rank keeps ", send_counts[me], " elements of its own block but expects ",
         recv_counts[me]);
  BlockOffsets b{std::vector<size_t>(n + 1, 0), std::vector<size_t>(n + 1, 0)};
  for (size_t p = 0; p < n; ++p) {
    b.send_at[p + 1] = b.send_at[p] + send_counts[p] * es;
    b.recv_at[p + 1] = b.recv_at[p] + recv_counts[p] * es;
  }
  return b;
}

void Group::all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,
                       const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash) {
  const int n = size(), me = rank();
  const auto b = keep_own_block(in, send_counts, out, recv_counts, dtype_size(t), me);
  for (int k = 1; k < n; ++k) {  // round k: to rank + k, from rank - k
    const int to = (me + k) % n, from = (me - k + n) % n;
    sendrecv(static_cast<const char*>(in) + b.send_at[to], send_counts[to], to, shape_hash,
             static_cast<char*>(out) + b.recv_at[from], recv_counts[from], from, shape_hash, t, 0);
  }
}

// Leaves up to this size travel packed together; larger ones are reduced where they lie.
constexpr size_t kPackBytes = 1 << 20;

void Group::all_reduce_many(const std::vector<const void*>& ins, const std::vector<void*>& outs,
                            const std::vector<size_t>& counts, DType t, ReduceOp op,
                            uint64_t shape_hash) {
  const size_t es = dtype_size(t);
  std::vector<size_t> small;
  size_t packed = 0;
  for (size_t i = 0; i < ins.size(); ++i) {
    if (counts[i] * es <= kPackBytes) {
      small.push_back(i);
      packed += counts[i];
    } else {
      all_reduce(ins[i], outs[i], counts[i], t, op, shape_hash ^ i);
    }
  }
  if (small.empty()) return;
  std::vector<char> pack(packed * es);
  size_t at = 0;
  for (size_t i : small) {
    std::memcpy(pack.data() + at, ins[i], counts[i] * es);
    at += counts[i] * es;
  }
  all_reduce(pack.data(), pack.data(), packed, t, op, shape_hash ^ packed);
  at = 0;
  for (size_t i : small) {
    std::memcpy(outs[i], pack.data() + at, counts[i] * es);
    at += counts[i] * es;
  }
}

void Group::star(const Header& h, int root, const std::vector<Bytes>& to,
                 const std::vector<Bytes>& from) {
  // Composed of point-to-point calls: correct, not fast (backends override it).
  const int me = rank();
  for (int p = 0; p < size(); ++p) {
    if (p == me || (me != root && p != root)) continue;
    sendrecv(to[p].data, to[p].len, p, h.shape_hash, const_cast<void*>(from[p].data), from[p].len,
             p, h.shape_hash, DType::kUInt8, 0);
  }
}

void Group::broadcast(const void* in, void* out, size_t count, DType t, int root,
                      uint64_t shape_hash) {
  check_root(*this, root);
  const size_t bytes = count * dtype_size(t);
  const Header h = calls().rooted(OpCode::kBroadcast, t, ReduceOp::kSum, bytes, shape_hash, root);
  std::vector<Bytes> to(size()), from(size());
  if (rank() == root) {
    for (auto& b : to) b = {in, bytes};  // members read the input; the own copy comes after
  } else {
    from[root] = {out, bytes};
  }
  if (size() > 1) star(h, root, to, from);
  if (rank() == root && out != in) {
    prefault(out, bytes);
    std::memcpy(out, in, bytes);
  }
}

void Group::gather(const void* in, void* out, size_t count, DType t, int root,
                   uint64_t shape_hash) {
  check_root(*this, root);
  const size_t bytes = count * dtype_size(t);
  const Header h = calls().rooted(OpCode::kGather, t, ReduceOp::kSum, bytes, shape_hash, root);
  std::vector<Bytes> to(size()), from(size());
  char* o = static_cast<char*>(out);
  if (rank() == root) {
    prefault(out, size() * bytes);
    std::memmove(o + root * bytes, in, bytes);
    for (int p = 0; p < size(); ++p) from[p] = {o + p * bytes, bytes};
  } else {
    if (out != in) std::memmove(out, in, bytes);
    to[root] = {out, bytes};
  }
  if (size() > 1) star(h, root, to, from);
}

void Group::scatter(const void* in, void* out, size_t count, DType t, int root,
                    uint64_t shape_hash) {
  check_root(*this, root);
  const size_t bytes = count * dtype_size(t);
  const Header h = calls().rooted(OpCode::kScatter, t, ReduceOp::kSum, bytes, shape_hash, root);
  std::vector<Bytes> to(size()), from(size());
  const char* i = static_cast<const char*>(in);
  if (rank() == root) {
    prefault(out, bytes);
    std::memmove(out, i + root * bytes, bytes);
    for (int p = 0; p < size(); ++p) to[p] = {i + p * bytes, bytes};
  } else {
    from[root] = {out, bytes};
  }
  if (size() > 1) star(h, root, to, from);
}

void Group::reduce(const void* in, void* out, size_t count, DType t, ReduceOp op, int root,
                   uint64_t shape_hash) {
  check_root(*this, root);
  const int n = size();
  const size_t es = dtype_size(t), bytes = count * es;
  const Header h = calls().rooted(OpCode::kReduce, t, op, bytes, shape_hash, root);
  std::vector<Bytes> to(n), from(n);
  if (rank() != root) {
    if (out != in) std::memmove(out, in, bytes);
    to[root] = {out, bytes};
    if (n > 1) star(h, root, to, from);
    return;
  }
  // Every member's input here, then reduced in rank order (all_reduce's bits).
  std::vector<char> all(size_t(n) * bytes);
  std::memcpy(all.data() + root * bytes, in, bytes);
  for (int p = 0; p < n; ++p) from[p] = {all.data() + p * bytes, bytes};
  if (n > 1) star(h, root, to, from);
  reduce_blocks(out, all.data(), n, count, t, op, widened(t, op));
}

}  // namespace mlxdist
