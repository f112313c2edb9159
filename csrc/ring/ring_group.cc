#include "ring/ring_group.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iostream>
#include <numeric>

#include "core/error.h"
#include "core/prefault.h"
#include "ring/algorithms.h"
#include "transport/shm.h"
#include "bootstrap/tcp_mesh.h"

namespace mlxdist::ring {
namespace {

Deadline deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace

RingGroup::RingGroup(uint64_t id, int rank, std::vector<int> world_ranks,
                     std::shared_ptr<const AddressBook> book, Options opts)
    : id_(id), rank_(rank), world_ranks_(std::move(world_ranks)), book_(std::move(book)),
      opts_(opts), calls_(id, int(world_ranks_.size())) {
  const int n = size();
  std::vector<std::vector<tcp::Address>> addrs;
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    const auto& a = book_->addrs[world_ranks_[i]];
    addrs.push_back(a);
    std::string name = "rank " + std::to_string(i);
    if (world_ranks_[i] != i) name += " (world rank " + std::to_string(world_ranks_[i]) + ")";
    names.push_back(name + " at " + a.front().str());
  }
  int links = int(book_->addrs[world_ranks_[rank_]].size());
  links_ = tcp::connect_mesh(addrs, names, rank_, id_, links, opts_.timeout_s, opts_.token,
                            opts_.verbose);
  if (opts_.transport != "tcp" && n > 1) try_shared_memory();
  open_outbox();
}

void RingGroup::open_outbox() {
  auto outbox = std::make_unique<Outbox>(std::move(links_), opts_.timeout_s);
  outbox_ = outbox.get();
  links_ = std::move(outbox);
}

RingGroup::RingGroup(uint64_t id, int rank, int size, std::unique_ptr<Links> links, Options opts)
    : id_(id), rank_(rank), world_ranks_(size), opts_(opts), links_(std::move(links)),
      calls_(id, size) {
  std::iota(world_ranks_.begin(), world_ranks_.end(), 0);
  open_outbox();
}

RingGroup::~RingGroup() { close(); }

void RingGroup::abort(const std::string& why) {
  if (links_) links_->reset(why);
}

void RingGroup::close() {
  if (links_) links_->close();
}

struct RingGroup::Context : ring::Context {
  Context(RingGroup& g, const Header& h)
      : ring::Context{*g.links_, g.rank_, g.size(), h, deadline_after(g.opts_.timeout_s),
                      std::chrono::duration_cast<Clock::duration>(
                          std::chrono::duration<double>(g.opts_.timeout_s)),
                      "rank " + std::to_string(g.rank_), g.opts_.chunk_bytes} {}
};

void RingGroup::all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                           uint64_t shape_hash) {
  const size_t es = dtype_size(t), bytes = count * es;
  const int n = size();
  if (n == 1) {  // a group of one (from split): nothing to combine
    if (out != in) std::memmove(out, in, bytes);
    return;
  }
  Context ctx(*this, calls_.collective(OpCode::kAllReduce, t, op, bytes, shape_hash));
  const bool widen = widened(t, op);

  if (bytes <= opts_.small_bytes) {
    // Latency path: gather everything, then every rank reduces in rank order (same bits).
    work_.resize(n * bytes);
    std::memcpy(work_.data() + rank_ * bytes, in, bytes);
    ring::all_gather(ctx, work_.data(), es, Layout::blocks_of(count, n));
    reduce_blocks(out, work_.data(), n, count, t, op, widen);
    return;
  }

  Layout layout = Layout::split_halves(count, n);
  if (widen) {  // reduce in float32 on the wire, round once at the owner
    work_.resize(count * sizeof(float));
    float* w = reinterpret_cast<float*>(work_.data());
    to_float32(in, w, count, t);
    ring::reduce_scatter(ctx, work_.data(), work_.data(), DType::kFloat32, op, layout, scratch_);
    for (int d = 0; d < 2; ++d) {
      size_t off = layout.off[d][rank_];
      from_float32(w + off, static_cast<char*>(out) + off * es, layout.cnt[d][rank_], t);
    }
  } else {
    if (out != in) prefault(out, bytes);  // XLA aliases them when the input is donated
    ring::reduce_scatter(ctx, static_cast<const char*>(in), static_cast<char*>(out), t, op, layout,
                         scratch_);
  }
  ring::all_gather(ctx, static_cast<char*>(out), es, layout);
}

void RingGroup::all_gather(const void* in, void* out, size_t count, DType t, uint64_t shape_hash) {
  const size_t es = dtype_size(t), bytes = count * es;
  Context ctx(*this, calls_.collective(OpCode::kAllGather, t, ReduceOp::kSum, bytes, shape_hash));
  prefault(out, bytes * size());
  std::memcpy(static_cast<char*>(out) + rank_ * bytes, in, bytes);
  ring::all_gather(ctx, static_cast<char*>(out), es, Layout::blocks_of(count, size()));
}

void RingGroup::reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,
                               uint64_t shape_hash) {
  const size_t es = dtype_size(t), total = count * size();
  if (size() == 1) {  // a group of one: its block is the input
    if (out != in) std::memmove(out, in, total * es);
    return;
  }
  Context ctx(*this, calls_.collective(OpCode::kReduceScatter, t, op, total * es, shape_hash));
  const bool widen = widened(t, op);
  const DType wire = widen ? DType::kFloat32 : t;
  const size_t wes = dtype_size(wire);
  work_.resize(total * wes);
  const char* src = static_cast<const char*>(in);
  if (widen) {
    to_float32(in, reinterpret_cast<float*>(work_.data()), total, t);
    src = work_.data();
  }
  ring::reduce_scatter(ctx, src, work_.data(), wire, op, Layout::blocks_of(count, size()), scratch_);
  const char* mine = work_.data() + rank_ * count * wes;
  if (widen)
    from_float32(reinterpret_cast<const float*>(mine), out, count, t);
  else
    std::memcpy(out, mine, count * es);
}

void RingGroup::send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash,
                     int tag) {
  check_peer(dst, "destination");
  const size_t bytes = count * dtype_size(t);
  Context ctx(*this, calls_.send(t, bytes, shape_hash, dst, tag));
  ring::send(ctx, in, bytes, dst);
}

void RingGroup::recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) {
  check_peer(src, "source");
  const size_t bytes = count * dtype_size(t);
  Context ctx(*this, calls_.recv(t, bytes, shape_hash, src, tag));
  prefault(out, bytes);
  ring::recv(ctx, out, bytes, src);
}

void RingGroup::sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash,
                         void* out, size_t recv_count, int src, uint64_t recv_hash, DType t,
                         int tag) {
  check_peer(dst, "destination");
  check_peer(src, "source");
  const size_t es = dtype_size(t);
  const auto h = calls_.sendrecv(t, send_count * es, send_hash, dst, recv_count * es, recv_hash, src, tag);
  Context ctx(*this, h.recv);
  prefault(out, recv_count * es);
  ring::sendrecv(ctx, h.send, in, send_count * es, dst, h.recv, out, recv_count * es, src);
}

void RingGroup::all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,
                           const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash) {
  Context ctx(*this, calls_.collective(OpCode::kAllToAll, t, ReduceOp::kSum, 0, shape_hash));
  const auto b = keep_own_block(in, send_counts, out, recv_counts, dtype_size(t), rank_);
  prefault(out, b.recv_at.back());
  ring::all_to_all(ctx, static_cast<const char*>(in), b.send_at, static_cast<char*>(out), b.recv_at);
}

void RingGroup::star(const Header& h, int root, const std::vector<Bytes>& to,
                     const std::vector<Bytes>& from) {
  Context ctx(*this, h);
  std::vector<std::pair<const void*, size_t>> out;
  std::vector<std::pair<void*, size_t>> in;
  for (int p = 0; p < size(); ++p) {
    out.emplace_back(to[p].data, to[p].len);
    in.emplace_back(const_cast<void*>(from[p].data), from[p].len);
    if (from[p].len) prefault(in.back().first, from[p].len);
  }
  ring::star(ctx, root, out, in);
}

void RingGroup::barrier() {
  // An empty all-gather: a rank leaves only after hearing (through the ring) from every rank.
  Context ctx(*this, calls_.collective(OpCode::kBarrier, DType::kUInt8, ReduceOp::kSum, 0, 0));
  ring::all_gather(ctx, nullptr, 1, Layout::blocks_of(0, size()));
}

std::vector<int32_t> RingGroup::gather_split(int color, int key) {
  const int n = size();
  std::vector<int32_t> all(2 * n);
  Context ctx(*this, calls_.collective(OpCode::kSplit, DType::kInt32, ReduceOp::kSum, 8, 0));
  all[2 * rank_] = color;
  all[2 * rank_ + 1] = key;
  ring::all_gather(ctx, reinterpret_cast<char*>(all.data()), 4, Layout::blocks_of(2, n));
  return all;
}

std::shared_ptr<Group> RingGroup::split(int color, int key) {
  if (!book_) fail("internal: this ring runs over another backend's links and cannot split");
  const int n = size();
  std::vector<int32_t> all = gather_split(color, key);
  std::vector<int> members;  // parent ranks with my color, ordered by (key, parent rank)
  for (int i = 0; i < n; ++i)
    if (all[2 * i] == color) members.push_back(i);
  std::stable_sort(members.begin(), members.end(),
                   [&](int a, int b) { return all[2 * a + 1] < all[2 * b + 1]; });
  std::vector<int> world;
  int new_rank = -1;
  for (size_t i = 0; i < members.size(); ++i) {
    world.push_back(world_ranks_[members[i]]);
    if (members[i] == rank_) new_rank = int(i);
  }
  uint64_t new_id = mix_ids(mix_ids(id_, splits_++), uint64_t(uint32_t(color)));
  return std::make_shared<RingGroup>(new_id, new_rank, std::move(world), book_, opts_);
}

std::vector<std::string> RingGroup::exchange(const std::string& mine) {
  const int n = size();
  std::vector<uint64_t> lens(n, 0);
  lens[rank_] = mine.size();
  {
    Context ctx(*this, calls_.collective(OpCode::kSetup, DType::kUInt64, ReduceOp::kSum, 8, 3));
    ring::all_gather(ctx, reinterpret_cast<char*>(lens.data()), 8, Layout::blocks_of(1, n));
  }
  const size_t width = *std::max_element(lens.begin(), lens.end());
  std::vector<char> all(n * width, 0);
  std::memcpy(all.data() + rank_ * width, mine.data(), mine.size());
  {
    Context ctx(*this, calls_.collective(OpCode::kSetup, DType::kUInt8, ReduceOp::kSum, width, 4));
    ring::all_gather(ctx, all.data(), 1, Layout::blocks_of(width, n));
  }
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.emplace_back(all.data() + i * width, lens[i]);
  return out;
}

std::string RingGroup::lost_peers(const std::vector<int>& which) const {
  return links_->lost_peers(which);
}

void RingGroup::try_shared_memory() {
  const int n = size(), k = links_->links_per_peer();
  auto shared = shm::share_segments(
      rank_, n, shm::Mapping::bytes_for(n, k, opts_.shm_ring_bytes),
      [this](const std::string& mine) { return exchange(mine); },
      [this](int p) { return describe_peer(p); });
  if (!shared.why.empty()) {
    if (opts_.transport == "shm")
      fail("MLXDIST_TRANSPORT=shm but shared memory is not usable: ", shared.why);
    return;  // stay on TCP
  }
  std::unique_ptr<tcp::TcpLinks> tcp(static_cast<tcp::TcpLinks*>(links_.release()));
  const bool direct = shared.direct;
  links_ = std::make_unique<shm::ShmLinks>(std::move(tcp), rank_, std::move(shared), k,
                                           opts_.shm_ring_bytes, opts_.timeout_s);
  if (opts_.verbose)
    std::cerr << "[jax_mlxdist] " << label() << ": data over shared memory"
              << (direct ? " (large messages in one copy)" : "") << "\n";
}

std::shared_ptr<Group> make_world(int rank, const std::vector<std::vector<std::string>>& hostfile,
                                  const std::vector<int>& listen_fds, Options opts) {
  static std::atomic<uint64_t> generation{0};  // same sequence of inits on every rank
  const int n = int(hostfile.size());
  if (rank < 0 || rank >= n) fail("rank ", rank, " is not in a hostfile of ", n, " ranks");
  auto book = std::make_shared<AddressBook>();
  for (int i = 0; i < n; ++i) {
    if (hostfile[i].empty()) fail("hostfile entry for rank ", i, " lists no address");
    std::vector<tcp::Address> a;
    for (const auto& s : hostfile[i]) a.push_back(tcp::parse_address(s));
    book->addrs.push_back(std::move(a));
  }
  const auto& mine = book->addrs[rank];
  if (!listen_fds.empty() && listen_fds.size() != mine.size())
    fail("MLXDIST_LISTEN_FDS has ", listen_fds.size(), " sockets but the hostfile lists ",
         mine.size(), " addresses for rank ", rank);
  for (size_t k = 0; k < mine.size(); ++k)
    tcp::ensure_listening(mine[k], listen_fds.empty() ? -1 : listen_fds[k], opts.token);
  std::vector<int> world(n);
  std::iota(world.begin(), world.end(), 0);
  return std::make_shared<RingGroup>(mix_ids(0x776f726c64ull, generation++), rank, std::move(world),
                                     std::move(book), opts);
}

}  // namespace mlxdist::ring
