#include "mpi/mpi_group.h"

#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace mlxdist::mpi {
namespace {

// A failed rank's farewell to its peers: its error text, on a tag no op uses (send/recv use
// 2 * tag and 2 * tag + 1 for tags below 256; MPI guarantees tags up to 32767).
constexpr int kFarewellTag = 32000;
constexpr size_t kFarewellBytes = 1024;  // small: sent eagerly, whether or not a peer listens
// all_to_all's per-pair headers and blocks, then rooted collectives' data (non-overtaking per
// tag keeps calls in order).
constexpr int kAllToAllTag = 31000;

// Our own kernels as MPI ops where MPI's builtins differ from the ring (NaN propagates
// through max/min, as the ring and numpy do).
template <DType T, ReduceOp R>
void kernel(void* in, void* inout, int* len, Handle*) {
  reduce_into(inout, in, size_t(*len), T, R);
}

// Max and min of floats (NaN propagates) and complex numbers (MPI has no order for them; ours
// is MLX's: real part, then imaginary part), as user ops: [type][0 max, 1 min].
constexpr DType kUserTypes[] = {DType::kFloat32, DType::kFloat64, DType::kComplex64,
                                DType::kComplex128};
struct UserOps {
  Handle ops[4][2] = {};
};

template <DType T>
void create_pair(Lib& lib, Handle* pair) {
  check(lib, lib.Op_create(kernel<T, ReduceOp::kMax>, 1, &pair[0]), "MPI_Op_create");
  check(lib, lib.Op_create(kernel<T, ReduceOp::kMin>, 1, &pair[1]), "MPI_Op_create");
}

UserOps& user_ops(Lib& lib) {
  static UserOps ops = [&lib] {
    UserOps o;
    std::lock_guard<std::mutex> lock(lib.mu);
    create_pair<DType::kFloat32>(lib, o.ops[0]);
    create_pair<DType::kFloat64>(lib, o.ops[1]);
    create_pair<DType::kComplex64>(lib, o.ops[2]);
    create_pair<DType::kComplex128>(lib, o.ops[3]);
    return o;
  }();
  return ops;
}

int as_count(size_t count, const char* what) {
  if (count > size_t(INT_MAX))
    fail(what, ": ", count, " elements is more than MPI's limit of ", INT_MAX, " per call");
  return int(count);
}

}  // namespace

MpiGroup::MpiGroup(Lib& lib, Handle comm, uint64_t id, double timeout_s)
    : lib_(lib), comm_(comm), id_(id), timeout_s_(timeout_s), calls_(id, 0) {
  std::lock_guard<std::mutex> lock(lib_.mu);
  check(lib_, lib_.Comm_set_errhandler(comm_, lib_.errors_return), "MPI_Comm_set_errhandler");
  check(lib_, lib_.Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check(lib_, lib_.Comm_size(comm_, &size_), "MPI_Comm_size");
  calls_ = Calls(id_, size_);
  headers_.resize(size_t(size_));
}

MpiGroup::~MpiGroup() { close(); }

void MpiGroup::wait(Handle& req, const std::string& what) {
  using namespace std::chrono;
  const auto start = steady_clock::now();
  const auto deadline = start + duration_cast<steady_clock::duration>(duration<double>(timeout_s_));
  auto nap = microseconds(20);
  for (;;) {
    int done = 0;
    {
      std::lock_guard<std::mutex> lock(lib_.mu);
      check(lib_, lib_.Test(&req, &done, lib_.status_ignore), "MPI_Test");
    }
    if (done) return;
    const auto now = steady_clock::now();
    if (now - start > milliseconds(20)) check_farewells();  // a peer may never come: ask why
    if (now >= deadline) {
      failed_ = lib_.failed = true;  // the request stays posted: MPI cannot cancel it
      fail(what, ": no progress within MLXDIST_TIMEOUT=", timeout_s_, "s (a peer stalled, died, ",
           "or called another op)");
    }
    // MPI progresses non-blocking ops only inside MPI_Test: poll continuously (yielding the
    // core to other threads) while the op is young, then back off so a long wait (a peer
    // far behind) does not burn a core.
    if (now - start < seconds(1)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, microseconds(500));
    }
  }
}

void MpiGroup::agree(const Header& mine) {
  Handle req = nullptr;
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    check(lib_, lib_.Iallgather(&mine, sizeof(Header), lib_.byte, headers_.data(), sizeof(Header),
                                lib_.byte, comm_, &req), "MPI_Iallgather");
  }
  wait(req, "exchanging headers");
  check_headers(mine, headers_, rank_, [](int r) { return "rank " + std::to_string(r); });
}

Handle MpiGroup::op_for(DType t, ReduceOp op) const {
  if (op == ReduceOp::kXor) return lib_.bxor;  // bool too: 0/1 bytes stay 0/1
  if (t == DType::kBool || op == ReduceOp::kAnd || op == ReduceOp::kOr)
    return (op == ReduceOp::kSum || op == ReduceOp::kMax || op == ReduceOp::kOr) ? lib_.bor : lib_.band;
  if (op == ReduceOp::kMax || op == ReduceOp::kMin)
    for (int i = 0; i < 4; ++i)
      if (kUserTypes[i] == t) return user_ops(lib_).ops[i][op == ReduceOp::kMin];
  switch (op) {
    case ReduceOp::kSum: return lib_.sum;
    case ReduceOp::kMax: return lib_.max;
    case ReduceOp::kMin: return lib_.min;
    default: return lib_.prod;
  }
}

void MpiGroup::reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                      bool scatter) {
  const char* what = scatter ? "MPI_Ireduce_scatter_block" : "MPI_Iallreduce";
  const size_t in_count = scatter ? count * size_t(size_) : count;
  DType wire = is_half(t) ? DType::kFloat32 : t;
  if (wire != t) {  // float16/bfloat16: reduce in float32, as the ring does
    wide_in_.resize(in_count);
    wide_out_.resize(count);
    to_float32(in, wide_in_.data(), in_count, t);
    in = wide_in_.data();
  }
  void* dst = wire != t ? static_cast<void*>(wide_out_.data()) : out;
  if (in == dst) {  // in place (XLA aliases our output to the input): libnbc's in-place
    // all-reduce runs at less than half speed, so reduce from a copy instead
    const size_t bytes = in_count * dtype_size(wire);
    if (scratch_.size() < bytes) scratch_.resize(bytes);
    std::memcpy(scratch_.data(), in, bytes);
    in = scratch_.data();
  }
  const void* src = in;
  Handle req = nullptr, type = lib_.types[size_t(wire)], mpi_op = op_for(wire, op);
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    int n = as_count(count, what);
    int rc = scatter ? lib_.Ireduce_scatter_block(src, dst, n, type, mpi_op, comm_, &req)
                     : lib_.Iallreduce(src, dst, n, type, mpi_op, comm_, &req);
    check(lib_, rc, what);
  }
  wait(req, what);
  if (wire != t) from_float32(wide_out_.data(), out, count, t);
}

void MpiGroup::all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                          uint64_t shape_hash) {
  agree(calls_.collective(OpCode::kAllReduce, t, op, count * dtype_size(t), shape_hash));
  reduce(in, out, count, t, op, false);
}

void MpiGroup::reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,
                              uint64_t shape_hash) {
  agree(calls_.collective(OpCode::kReduceScatter, t, op, count * size_t(size_) * dtype_size(t),
                          shape_hash));
  reduce(in, out, count, t, op, true);
}

void MpiGroup::all_gather(const void* in, void* out, size_t count, DType t, uint64_t shape_hash) {
  const size_t bytes = count * dtype_size(t);
  agree(calls_.collective(OpCode::kAllGather, t, ReduceOp::kSum, bytes, shape_hash));
  Handle req = nullptr;
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    int n = as_count(bytes, "MPI_Iallgather");
    check(lib_, lib_.Iallgather(in, n, lib_.byte, out, n, lib_.byte, comm_, &req),
          "MPI_Iallgather");
  }
  wait(req, "MPI_Iallgather");
}

// Never waits for the receiver: MPI sends a copy, reaped by later ops and the idle engine.
void MpiGroup::send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash, int tag) {
  check_peer(dst, "destination");
  reap();
  Pending p{{nullptr, nullptr}, std::make_unique<Header>(calls_.send(t, count * dtype_size(t),
                                                                     shape_hash, dst, tag)),
            {}, dst, std::chrono::steady_clock::now()};
  const char* from = static_cast<const char*>(in);
  p.data.assign(from, from + p.header->nbytes);
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    int n = as_count(p.header->nbytes, "MPI_Isend");
    check(lib_, lib_.Isend(p.header.get(), sizeof(Header), lib_.byte, dst, 2 * tag, comm_, &p.reqs[0]),
          "MPI_Isend");
    check(lib_, lib_.Isend(p.data.data(), n, lib_.byte, dst, 2 * tag + 1, comm_, &p.reqs[1]),
          "MPI_Isend");
  }
  outbox_.push_back(std::move(p));
  reap();  // a small send usually completes at once
}

void MpiGroup::reap() {
  const auto now = std::chrono::steady_clock::now();
  const auto stall = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(timeout_s_));
  for (auto it = outbox_.begin(); it != outbox_.end();) {
    int done[2] = {it->reqs[0] == nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(lib_.mu);
      if (!done[0]) check(lib_, lib_.Test(&it->reqs[0], &done[0], lib_.status_ignore), "MPI_Test");
      if (done[0]) it->reqs[0] = nullptr;
      check(lib_, lib_.Test(&it->reqs[1], &done[1], lib_.status_ignore), "MPI_Test");
    }
    if (done[0] && done[1]) {
      it = outbox_.erase(it);
      continue;
    }
    if (now - it->posted > stall) {
      failed_ = lib_.failed = true;  // the request stays posted: MPI cannot cancel it
      fail("send to rank ", it->dst, ": not received within MLXDIST_TIMEOUT=", timeout_s_,
           "s (no matching recv)");
    }
    ++it;
  }
}

void MpiGroup::progress_sends(std::chrono::microseconds wait) {
  const auto until = std::chrono::steady_clock::now() + wait;
  do {
    reap();
    std::this_thread::yield();
  } while (!outbox_.empty() && std::chrono::steady_clock::now() < until);
  if (!outbox_.empty() &&
      std::chrono::steady_clock::now() - outbox_.front().posted > std::chrono::milliseconds(20))
    check_farewells();  // its receiver may have failed: say why
}

void MpiGroup::flush_sends() {
  while (!outbox_.empty()) progress_sends(std::chrono::milliseconds(20));
}

void MpiGroup::recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) {
  check_peer(src, "source");
  const std::string peer = "rank " + std::to_string(src);
  const Header mine = calls_.recv(t, count * dtype_size(t), shape_hash, src, tag);
  Header theirs;
  Handle req = nullptr;
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    check(lib_, lib_.Irecv(&theirs, sizeof(theirs), lib_.byte, src, 2 * tag, comm_, &req),
          "MPI_Irecv");
  }
  wait(req, "recv from " + peer);
  check_header(mine, theirs, "this rank", peer);
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    int n = as_count(mine.nbytes, "MPI_Irecv");
    check(lib_, lib_.Irecv(out, n, lib_.byte, src, 2 * tag + 1, comm_, &req), "MPI_Irecv");
  }
  wait(req, "recv from " + peer);
}

void MpiGroup::sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash, void* out,
                        size_t recv_count, int src, uint64_t recv_hash, DType t, int tag) {
  check_peer(dst, "destination");
  check_peer(src, "source");
  reap();
  const size_t es = dtype_size(t);
  const auto h = calls_.sendrecv(t, send_count * es, send_hash, dst, recv_count * es, recv_hash, src, tag);
  const Header &send_h = h.send, &mine = h.recv;
  Header theirs;
  Handle reqs[4] = {nullptr, nullptr, nullptr, nullptr};
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    check(lib_, lib_.Isend(&send_h, sizeof(Header), lib_.byte, dst, 2 * tag, comm_, &reqs[0]), "MPI_Isend");
    check(lib_, lib_.Isend(in, as_count(send_h.nbytes, "MPI_Isend"), lib_.byte, dst, 2 * tag + 1,
                           comm_, &reqs[1]), "MPI_Isend");
    check(lib_, lib_.Irecv(&theirs, sizeof(Header), lib_.byte, src, 2 * tag, comm_, &reqs[2]),
          "MPI_Irecv");
  }
  const std::string from = "sendrecv from rank " + std::to_string(src);
  wait(reqs[2], from);
  check_header(mine, theirs, "this rank", "rank " + std::to_string(src));
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    check(lib_, lib_.Irecv(out, as_count(mine.nbytes, "MPI_Irecv"), lib_.byte, src, 2 * tag + 1,
                           comm_, &reqs[3]), "MPI_Irecv");
  }
  wait(reqs[3], from);
  const std::string to = "sendrecv to rank " + std::to_string(dst);
  wait(reqs[0], to);
  wait(reqs[1], to);
}

void MpiGroup::all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,
                          const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash) {
  reap();
  const Header h = calls_.collective(OpCode::kAllToAll, t, ReduceOp::kSum, 0, shape_hash);
  agree(h);  // every rank is in this all_to_all (not another op)
  const auto b = keep_own_block(in, send_counts, out, recv_counts, dtype_size(t), rank_);
  // Each pair's header carries its own message's bytes, checked before the blocks move.
  std::vector<Header> sent(size_, h), got(size_);
  std::vector<Handle> reqs;
  reqs.reserve(4 * size_t(size_));
  auto post = [&](auto&& call, const char* name) {
    reqs.push_back(nullptr);
    std::lock_guard<std::mutex> lock(lib_.mu);
    check(lib_, call(&reqs.back()), name);
  };
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    sent[p].nbytes = b.send_at[p + 1] - b.send_at[p];
    post([&](Handle* r) { return lib_.Irecv(&got[p], sizeof(Header), lib_.byte, p, kAllToAllTag, comm_, r); }, "MPI_Irecv");
    post([&](Handle* r) { return lib_.Isend(&sent[p], sizeof(Header), lib_.byte, p, kAllToAllTag, comm_, r); }, "MPI_Isend");
  }
  for (auto& r : reqs) wait(r, "all_to_all (headers)");
  reqs.clear();
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    Header expected = h;
    expected.nbytes = b.recv_at[p + 1] - b.recv_at[p];
    check_header(expected, got[p], "this rank", "rank " + std::to_string(p));
  }
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const int in_n = as_count(b.recv_at[p + 1] - b.recv_at[p], "MPI_Irecv");
    const int out_n = as_count(b.send_at[p + 1] - b.send_at[p], "MPI_Isend");
    post([&](Handle* r) { return lib_.Irecv(static_cast<char*>(out) + b.recv_at[p], in_n, lib_.byte, p, kAllToAllTag + 1, comm_, r); }, "MPI_Irecv");
    post([&](Handle* r) { return lib_.Isend(static_cast<const char*>(in) + b.send_at[p], out_n, lib_.byte, p, kAllToAllTag + 1, comm_, r); }, "MPI_Isend");
  }
  for (auto& r : reqs) wait(r, "all_to_all");
}

void MpiGroup::star(const Header& h, int root, const std::vector<Bytes>& to,
                    const std::vector<Bytes>& from) {
  reap();
  agree(h);  // every rank is in this op, with this root (else all raise, naming both calls)
  std::vector<Handle> reqs;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_ || (rank_ != root && p != root)) continue;
    std::lock_guard<std::mutex> lock(lib_.mu);
    if (from[p].len) {
      reqs.push_back(nullptr);
      check(lib_, lib_.Irecv(const_cast<void*>(from[p].data), as_count(from[p].len, "MPI_Irecv"),
                             lib_.byte, p, kAllToAllTag + 2, comm_, &reqs.back()), "MPI_Irecv");
    }
    if (to[p].len) {
      reqs.push_back(nullptr);
      check(lib_, lib_.Isend(to[p].data, as_count(to[p].len, "MPI_Isend"), lib_.byte, p,
                             kAllToAllTag + 2, comm_, &reqs.back()), "MPI_Isend");
    }
  }
  for (auto& r : reqs) wait(r, describe(h));
}

void MpiGroup::barrier() {
  agree(calls_.collective(OpCode::kBarrier, DType::kUInt8, ReduceOp::kSum, 0, 0));
}

std::shared_ptr<Group> MpiGroup::split(int color, int key) {
  agree(calls_.collective(OpCode::kSplit, DType::kUInt8, ReduceOp::kSum, 0, 0));
  Handle child = nullptr;
  {
    std::lock_guard<std::mutex> lock(lib_.mu);
    // MPI_Comm_split blocks until every rank calls it; the header exchange above has just
    // shown that they all are.
    check(lib_, lib_.Comm_split(comm_, color, key, &child), "MPI_Comm_split");
  }
  return std::make_shared<MpiGroup>(lib_, child, mix_ids(mix_ids(id_, splits_++), uint32_t(color)),
                                    timeout_s_);
}

void MpiGroup::abort(const std::string& why) {
  // MPI cannot drop a communicator's traffic; a failed group just stops being used. Its peers
  // learn why from a farewell, which they look for while they wait on this rank.
  failed_ = true;
  if (why.empty() || said_farewell_) return;
  said_farewell_ = true;
  // MPI may read the buffer after this group is gone (its sends are never waited for): it
  // lives until the process ends.
  char* text = new char[kFarewellBytes]();
  std::memcpy(text, why.data(), std::min(why.size(), kFarewellBytes - 1));
  std::lock_guard<std::mutex> lock(lib_.mu);
  for (int r = 0; r < size_; ++r) {
    Handle req = nullptr;
    if (r != rank_) lib_.Isend(text, int(kFarewellBytes), lib_.byte, r, kFarewellTag, comm_, &req);
  }
}

void MpiGroup::check_farewells() {
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    int waiting = 0;
    {
      std::lock_guard<std::mutex> lock(lib_.mu);
      check(lib_, lib_.Iprobe(r, kFarewellTag, comm_, &waiting, lib_.status_ignore), "MPI_Iprobe");
    }
    if (!waiting) continue;
    std::vector<char> text(kFarewellBytes, '\0');
    Handle req = nullptr;
    {
      std::lock_guard<std::mutex> lock(lib_.mu);
      check(lib_, lib_.Irecv(text.data(), int(kFarewellBytes), lib_.byte, r, kFarewellTag, comm_,
                             &req), "MPI_Irecv");
    }
    for (int done = 0; !done;) {  // already arrived: completes at once
      std::lock_guard<std::mutex> lock(lib_.mu);
      check(lib_, lib_.Test(&req, &done, lib_.status_ignore), "MPI_Test");
    }
    text.back() = '\0';
    fail("rank ", r, " left the group after an error: ", text.data());
  }
}

void MpiGroup::close() {
  if (!comm_) return;
  if (!failed_ && !lib_.failed) {
    std::lock_guard<std::mutex> lock(lib_.mu);
    int finalized = 0;
    lib_.Finalized(&finalized);
    if (!finalized) lib_.Comm_free(&comm_);
  }
  comm_ = nullptr;
}

std::shared_ptr<Group> make_world(const std::string& lib_path, double timeout_s) {
  Lib& lib = load(lib_path);
  static uint64_t generation = 0;  // same sequence of inits on every rank
  Handle comm = nullptr;
  {
    std::lock_guard<std::mutex> lock(lib.mu);
    check(lib, lib.Comm_dup(lib.comm_world, &comm), "MPI_Comm_dup");
  }
  return std::make_shared<MpiGroup>(lib, comm, mix_ids(0x6d7069ull, generation++), timeout_s);
}

}  // namespace mlxdist::mpi
