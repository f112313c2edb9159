#include "nccl/nccl_group.h"

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>

#include "core/error.h"
#include "gpu/cuda_runtime.h"
#include "transport/shm.h"

namespace mlxdist::nccl {
namespace {

constexpr int kInProgress = 7;  // ncclInProgress: not an error

// NCCL's element type for t, or -1 when it has none (16-bit integers).
int data_type(DType t) {
  switch (t) {
    case DType::kBool: case DType::kUInt8: return kUInt8;
    case DType::kInt8: return kInt8;
    case DType::kInt32: return kInt32;
    case DType::kUInt32: return kUInt32;
    case DType::kInt64: return kInt64;
    case DType::kUInt64: return kUInt64;
    case DType::kFloat16: return kFloat16;
    case DType::kBFloat16: return kBFloat16;
    case DType::kFloat32: return kFloat32;
    case DType::kComplex64: return kFloat32;  // as pairs of float32: sums only
    case DType::kFloat64: return kFloat64;
    default: return -1;
  }
}

size_t nccl_elements(size_t count, DType t) { return t == DType::kComplex64 ? 2 * count : count; }

int red_op(DType t, ReduceOp op) {
  if (t == DType::kBool)  // 0/1 bytes: sum and max are OR, min and prod AND (as the ring)
    return op == ReduceOp::kSum || op == ReduceOp::kMax ? kMax : kMin;
  switch (op) {
    case ReduceOp::kMax: return kMax;
    case ReduceOp::kMin: return kMin;
    case ReduceOp::kProd: return kProd;
    default: return kSum;
  }
}

}  // namespace

bool NcclGroup::runs(DType t, ReduceOp op) const {
  if (data_type(t) < 0 || op >= ReduceOp::kAnd) return false;  // NCCL has no bitwise ops
  if (t == DType::kComplex64) return op == ReduceOp::kSum;
  // NCCL's float max/min (fmaxf) drop NaN; every backend here propagates it.
  const bool floating = t == DType::kFloat16 || t == DType::kBFloat16 || t == DType::kFloat32 ||
                        t == DType::kFloat64;
  return !(floating && (op == ReduceOp::kMax || op == ReduceOp::kMin));
}

NcclGroup::NcclGroup(std::shared_ptr<ring::RingGroup> control, Comm comm, Options opts)
    : control_(std::move(control)), lib_(load(opts.lib)), opts_(std::move(opts)),
      id_(mix_ids(control_->id(), 0x6e63636cull)), timeout_s_(control_->options().timeout_s),
      calls_(id_, control_->size()), comm_(comm) {
  watchdog_ = std::thread([this] { watch(); });
  try {
    connect_pairs();
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fail_locked("connecting NCCL's point-to-point pairs failed", true);
      stop_ = true;
    }
    stop_watchdog();
    throw;
  }
}

NcclGroup::~NcclGroup() {
  close();
  stop_watchdog();  // close() returned early if a failed constructor stopped it
  gpu::Cuda& cuda = gpu::cuda();
  for (auto& p : pending_) {
    cuda.EventDestroy(p.start);
    cuda.EventDestroy(p.done);
  }
  for (void* e : free_events_) cuda.EventDestroy(e);
}

void NcclGroup::stop_watchdog() {
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

// One byte to and from every peer, so NCCL connects each pair now: a later send then never
// blocks on the host until its peer posts the matching recv (two ranks that both send first
// would wait on each other there).
void NcclGroup::connect_pairs() {
  const int n = size(), me = rank();
  if (n < 2) return;
  gpu::Cuda& cuda = gpu::cuda();
  void* buf = nullptr;
  gpu::check(cuda.Malloc(&buf, 2 * size_t(n)), "cudaMalloc");
  char* b = static_cast<char*>(buf);
  try {
    enqueue(nullptr, "connecting NCCL's point-to-point pairs", "ncclSend/ncclRecv", [&](Comm c) {
      int rc = lib_.GroupStart();
      for (int p = 0; p < n && rc == 0; ++p) {
        if (p == me) continue;
        rc = lib_.Send(b + me, 1, kUInt8, p, c, nullptr);
        if (rc == 0) rc = lib_.Recv(b + n + p, 1, kUInt8, p, c, nullptr);
      }
      int end = lib_.GroupEnd();
      return rc ? rc : end;
    });
    drain();
    std::lock_guard<std::mutex> lock(mu_);
    throw_if_failed_locked();
  } catch (...) {
    drain();
    cuda.Free(buf);
    throw;
  }
  cuda.Free(buf);
}

void* NcclGroup::take_event_locked() {
  if (!free_events_.empty()) {
    void* e = free_events_.back();
    free_events_.pop_back();
    return e;
  }
  void* e = nullptr;
  gpu::check(gpu::cuda().EventCreateWithFlags(&e, gpu::kDisableTiming), "cudaEventCreateWithFlags");
  return e;
}

void NcclGroup::fail_locked(const std::string& why, bool reported) {
  if (failure_.empty()) {
    failure_ = why;
    failure_reported_ = reported;
  }
  // NCCL's kernels in flight return and the stream moves on; a blocked host call returns.
  if (!destroyed_) lib_.CommAbort(comm_);
  destroyed_ = true;
  cv_.notify_all();
}

void NcclGroup::throw_if_failed_locked() {
  if (failure_.empty()) return;
  failure_reported_ = true;
  fail("the NCCL communicator was aborted after an earlier error: ", failure_);
}

std::string NcclGroup::unreported_failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_reported_ ? "" : failure_;
}

void NcclGroup::abort(const std::string& why) {
  std::lock_guard<std::mutex> ops(ops_mu_);  // the control ring is not in use meanwhile
  {
    std::lock_guard<std::mutex> lock(mu_);
    fail_locked("the group was aborted after an error", true);
  }
  control_->abort(why);
}

void NcclGroup::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return pending_.empty() || !failure_.empty(); });
}

void NcclGroup::close() {
  std::lock_guard<std::mutex> ops(ops_mu_);
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (stop_) return;
    cv_.wait(lock, [this] { return pending_.empty() || !failure_.empty(); });
    if (!destroyed_) lib_.CommDestroy(comm_);
    destroyed_ = true;
    stop_ = true;
  }
  stop_watchdog();
  control_->close();
}

void NcclGroup::watch() {
  pthread_setname_np(pthread_self(), "mlxdist-watch");
  gpu::Cuda& cuda = gpu::cuda();
  cuda.SetDevice(opts_.device);  // event queries must not open a context on another GPU
  auto seconds = [](Clock::time_point since) {
    return std::chrono::duration<double>(Clock::now() - since).count();
  };
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    const bool busy = failure_.empty() && (!pending_.empty() || !in_call_.empty());
    cv_.wait_for(lock, std::chrono::milliseconds(busy ? 2 : 200));
    if (stop_ || !failure_.empty()) continue;
    if (!in_call_.empty() && seconds(in_call_since_) > timeout_s_) {
      fail_locked(in_call_ + " on " + label() + ": blocked in NCCL for " +
                      std::to_string(int(seconds(in_call_since_))) +
                      " s (MLXDIST_TIMEOUT): a peer stalled or died; the NCCL communicator was aborted",
                  false);
      continue;
    }
    while (!pending_.empty() && failure_.empty()) {
      Pending& p = pending_.front();
      if (!p.started) {
        int rc = cuda.EventQuery(p.start);
        if (rc == gpu::kNotReady) break;  // the stream is still on earlier work (compute)
        if (rc != 0) {
          fail_locked(p.what + " on " + label() + ": CUDA error " + cuda.GetErrorString(rc), false);
          break;
        }
        p.started = true;
        p.since = Clock::now();
      }
      int rc = cuda.EventQuery(p.done);
      if (rc == gpu::kNotReady) {
        if (seconds(p.since) > timeout_s_)
          fail_locked(p.what + " on " + label() + ": no progress for " +
                          std::to_string(int(seconds(p.since))) +
                          " s (MLXDIST_TIMEOUT): a peer stalled, died or called another op; the "
                          "NCCL communicator was aborted",
                      false);
        break;
      }
      if (rc != 0) {
        fail_locked(p.what + " on " + label() + ": CUDA error " + cuda.GetErrorString(rc), false);
        break;
      }
      free_events_.push_back(p.start);
      free_events_.push_back(p.done);
      pending_.pop_front();
      cv_.notify_all();  // drain() waits for this
    }
    int async = 0;
    if (failure_.empty() && !destroyed_ && lib_.CommGetAsyncError(comm_, &async) == 0 &&
        async != 0 && async != kInProgress)
      fail_locked("NCCL failed on " + label() + ": " + lib_.GetErrorString(async) + " (" +
                      lib_.GetLastError(comm_) + ")",
                  false);
  }
}

void NcclGroup::agree(const Header& mine) {
  if (!opts_.check) return;
  std::vector<Header> all(size());
  control_->all_gather(&mine, all.data(), sizeof(Header), DType::kUInt8, 0);
  check_headers(mine, all, rank(), [this](int p) { return control_->describe_peer(p); });
}

template <typename Body>
void NcclGroup::guarded(Body&& body) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) fail("the group is closed");
    throw_if_failed_locked();
  }
  try {
    body();
  } catch (const std::exception& e) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fail_locked(e.what(), true);
    }
    control_->abort(e.what());
    throw;
  }
}

template <typename Call>
int NcclGroup::blocking(const std::string& what, Call&& call) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    throw_if_failed_locked();
    in_call_ = what;
    in_call_since_ = Clock::now();
  }
  cv_.notify_all();
  // Outside mu_, so the watchdog can abort the communicator if this blocks on a peer.
  int rc = call(comm_);
  std::lock_guard<std::mutex> lock(mu_);
  in_call_.clear();
  throw_if_failed_locked();  // aborted meanwhile: comm_ is gone, say why
  return rc;
}

template <typename Call>
void NcclGroup::enqueue(void* stream, const std::string& what, const char* call, Call&& nccl_call) {
  gpu::Cuda& cuda = gpu::cuda();
  void *start, *done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    start = take_event_locked();
    done = take_event_locked();
  }
  auto give_back = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    free_events_.push_back(start);
    free_events_.push_back(done);
  };
  int recorded = cuda.EventRecord(start, stream), rc = 0;
  try {
    if (recorded == 0) rc = blocking(what, nccl_call);
  } catch (...) {
    give_back();
    throw;
  }
  if (recorded == 0 && rc == 0) recorded = cuda.EventRecord(done, stream);
  if (recorded != 0 || rc != 0) {
    give_back();
    std::lock_guard<std::mutex> lock(mu_);
    fail(recorded ? std::string("cudaEventRecord failed: ") + cuda.GetErrorString(recorded)
                  : std::string(call) + " failed: " + lib_.GetErrorString(rc) + " (" +
                        (destroyed_ ? "" : lib_.GetLastError(comm_)) + ")");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({start, done, what});
  }
  cv_.notify_all();
}

void NcclGroup::all_reduce_on(void* stream, const void* in, void* out, size_t count, DType t,
                              ReduceOp op, uint64_t shape_hash) {
  guarded([&] {
    const Header h = calls_.collective(OpCode::kAllReduce, t, op, count * dtype_size(t), shape_hash);
    agree(h);
    const int type = data_type(t), red = red_op(t, op);
    const size_t n = nccl_elements(count, t);
    enqueue(stream, describe(h), "ncclAllReduce",
            [&](Comm c) { return lib_.AllReduce(in, out, n, type, red, c, stream); });
  });
}

void NcclGroup::all_gather_on(void* stream, const void* in, void* out, size_t count, DType t,
                              uint64_t shape_hash) {
  guarded([&] {
    const size_t bytes = count * dtype_size(t);
    const Header h = calls_.collective(OpCode::kAllGather, t, ReduceOp::kSum, bytes, shape_hash);
    agree(h);
    enqueue(stream, describe(h), "ncclAllGather",
            [&](Comm c) { return lib_.AllGather(in, out, bytes, kUInt8, c, stream); });
  });
}

void NcclGroup::reduce_scatter_on(void* stream, const void* in, void* out, size_t count, DType t,
                                  ReduceOp op, uint64_t shape_hash) {
  guarded([&] {
    const Header h = calls_.collective(OpCode::kReduceScatter, t, op, count * size() * dtype_size(t),
                                       shape_hash);
    agree(h);
    const int type = data_type(t), red = red_op(t, op);
    const size_t n = nccl_elements(count, t);
    enqueue(stream, describe(h), "ncclReduceScatter",
            [&](Comm c) { return lib_.ReduceScatter(in, out, n, type, red, c, stream); });
  });
}

void NcclGroup::send_on(void* stream, const void* in, size_t count, DType t, int dst,
                        uint64_t shape_hash, int tag) {
  check_peer(dst, "destination");
  guarded([&] {
    const size_t bytes = count * dtype_size(t);
    const Header h = calls_.send(t, bytes, shape_hash, dst, tag);
    if (opts_.check) control_->send(&h, sizeof(Header), DType::kUInt8, dst, 0, tag);
    enqueue(stream, describe(h), "ncclSend",
            [&](Comm c) { return lib_.Send(in, bytes, kUInt8, dst, c, stream); });
  });
}

void NcclGroup::recv_on(void* stream, void* out, size_t count, DType t, int src,
                        uint64_t shape_hash, int tag) {
  check_peer(src, "source");
  guarded([&] {
    const size_t bytes = count * dtype_size(t);
    const Header h = calls_.recv(t, bytes, shape_hash, src, tag);
    if (opts_.check) {
      Header theirs;
      control_->recv(&theirs, sizeof(Header), DType::kUInt8, src, 0, tag);
      check_header(h, theirs, "this rank", control_->describe_peer(src));
    }
    enqueue(stream, describe(h), "ncclRecv",
            [&](Comm c) { return lib_.Recv(out, bytes, kUInt8, src, c, stream); });
  });
}

// One NCCL group: the send and the recv progress together, so neither waits for the other.
void NcclGroup::sendrecv_on(void* stream, const void* in, size_t send_count, int dst,
                            uint64_t send_hash, void* out, size_t recv_count, int src,
                            uint64_t recv_hash, DType t, int tag) {
  check_peer(dst, "destination");
  check_peer(src, "source");
  guarded([&] {
    const size_t es = dtype_size(t);
    const auto h = calls_.sendrecv(t, send_count * es, send_hash, dst, recv_count * es, recv_hash,
                                   src, tag);
    const Header &hs = h.send, &hr = h.recv;
    if (opts_.check) {
      Header theirs;
      control_->sendrecv(&hs, sizeof(Header), dst, 0, &theirs, sizeof(Header), src, 0,
                         DType::kUInt8, tag);
      check_header(hr, theirs, "this rank", control_->describe_peer(src));
    }
    enqueue(stream, describe(hr), "ncclSend/ncclRecv", [&](Comm c) {
      int rc = lib_.GroupStart();
      if (rc == 0) rc = lib_.Send(in, hs.nbytes, kUInt8, dst, c, stream);
      if (rc == 0) rc = lib_.Recv(out, hr.nbytes, kUInt8, src, c, stream);
      int end = lib_.GroupEnd();
      return rc ? rc : end;
    });
  });
}

// Grouped sends and receives with every peer (NCCL has no uneven all-to-all of its own).
void NcclGroup::all_to_all_on(void* stream, const void* in, const std::vector<size_t>& send_counts,
                              void* out, const std::vector<size_t>& recv_counts, DType t,
                              uint64_t shape_hash) {
  guarded([&] {
    const int n = size(), me = rank();
    const size_t es = dtype_size(t);
    const Header h = calls_.collective(OpCode::kAllToAll, t, ReduceOp::kSum, 0, shape_hash);
    agree(h);
    const BlockOffsets b = block_offsets(send_counts, recv_counts, es, me);
    const std::vector<size_t>&send_at = b.send_at, &recv_at = b.recv_at;
    if (opts_.check) {  // each pair's sizes, before any byte moves
      std::vector<Header> sent(n, h), got(n, h);
      for (int p = 0; p < n; ++p) sent[p].nbytes = send_at[p + 1] - send_at[p];
      std::vector<size_t> one(n, sizeof(Header));
      control_->all_to_all(sent.data(), one, got.data(), one, DType::kUInt8, 0);
      for (int p = 0; p < n; ++p) {
        Header expected = h;
        expected.nbytes = recv_at[p + 1] - recv_at[p];
        if (p != me) check_header(expected, got[p], "this rank", control_->describe_peer(p));
      }
    }
    gpu::check(gpu::cuda().MemcpyAsync(static_cast<char*>(out) + recv_at[me],
                                       static_cast<const char*>(in) + send_at[me],
                                       send_at[me + 1] - send_at[me], gpu::kDeviceToDevice, stream),
               "cudaMemcpyAsync");
    enqueue(stream, describe(h), "ncclSend/ncclRecv", [&](Comm c) {
      int rc = lib_.GroupStart();
      for (int p = 0; p < n && rc == 0; ++p) {
        if (p == me) continue;
        rc = lib_.Send(static_cast<const char*>(in) + send_at[p], send_at[p + 1] - send_at[p],
                       kUInt8, p, c, stream);
        if (rc == 0)
          rc = lib_.Recv(static_cast<char*>(out) + recv_at[p], recv_at[p + 1] - recv_at[p],
                         kUInt8, p, c, stream);
      }
      int end = lib_.GroupEnd();
      return rc ? rc : end;
    });
  });
}

void NcclGroup::barrier_on(void* stream) {
  guarded([&] {
    // The watchdog aborts a stalled op at the timeout, after which the stream moves on.
    gpu::check(gpu::cuda().StreamSynchronize(stream), "cudaStreamSynchronize");
    drain();
    {
      std::lock_guard<std::mutex> lock(mu_);
      throw_if_failed_locked();
    }
    control_->barrier();
  });
}

// Host memory runs on the control ring, in the same order as the NCCL ops.
void NcclGroup::all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                           uint64_t shape_hash) {
  guarded([&] { control_->all_reduce(in, out, count, t, op, shape_hash); });
}

void NcclGroup::all_gather(const void* in, void* out, size_t count, DType t, uint64_t shape_hash) {
  guarded([&] { control_->all_gather(in, out, count, t, shape_hash); });
}

void NcclGroup::reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,
                               uint64_t shape_hash) {
  guarded([&] { control_->reduce_scatter(in, out, count, t, op, shape_hash); });
}

void NcclGroup::send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash, int tag) {
  guarded([&] { control_->send(in, count, t, dst, shape_hash, tag); });
}

void NcclGroup::recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) {
  guarded([&] { control_->recv(out, count, t, src, shape_hash, tag); });
}

void NcclGroup::barrier() {
  guarded([&] { control_->barrier(); });
}

std::shared_ptr<Group> NcclGroup::split(int color, int key) {
  std::shared_ptr<Group> child;
  guarded([&] {
    // NCCL wants colors >= 0: number the distinct colors in order, as every member sees them.
    std::set<int> colors;
    for (const auto& c : control_->exchange(std::to_string(color))) colors.insert(std::stoi(c));
    const int dense = int(std::distance(colors.begin(), colors.find(color)));
    auto child_control = std::dynamic_pointer_cast<ring::RingGroup>(control_->split(color, key));
    gpu::check(gpu::cuda().SetDevice(opts_.device), "cudaSetDevice");
    Comm comm = nullptr;
    int rc = blocking("split", [&](Comm c) { return lib_.CommSplit(c, dense, key, &comm, nullptr); });
    if (rc != 0) fail("ncclCommSplit failed: ", lib_.GetErrorString(rc));
    child = std::make_shared<NcclGroup>(std::move(child_control), comm, opts_);
  });
  return child;
}

std::shared_ptr<Group> make_world(int rank, const std::vector<std::vector<std::string>>& hostfile,
                                  const std::vector<int>& listen_fds, ring::Options ring_opts,
                                  Options opts) {
  setenv("NCCL_NVLS_ENABLE", "0", 0);  // NVLink multicast stays off unless asked for
  Lib& lib = load(opts.lib);
  gpu::Cuda& cuda = gpu::cuda();
  gpu::check(cuda.SetDevice(opts.device), "cudaSetDevice");
  auto control = std::dynamic_pointer_cast<ring::RingGroup>(
      ring::make_world(rank, hostfile, listen_fds, ring_opts));
  // NCCL refuses two ranks on one GPU; say which ranks and how to fix it.
  char bus[64] = {};
  gpu::check(cuda.DeviceGetPCIBusId(bus, sizeof(bus), opts.device), "cudaDeviceGetPCIBusId");
  auto where = control->exchange(shm::host_identity() + " " + bus);
  for (int i = 0; i < control->size(); ++i)
    for (int j = i + 1; j < control->size(); ++j)
      if (where[i] == where[j])
        fail("ranks ", i, " and ", j, " both use the GPU ", where[i].substr(where[i].rfind(' ') + 1),
             " of one host; NCCL needs a GPU per rank (give each rank its own, for example with "
             "CUDA_VISIBLE_DEVICES)");
  UniqueId id{};
  if (rank == 0) check(lib.GetUniqueId(&id), "ncclGetUniqueId");
  auto ids = control->exchange(std::string(id.internal, sizeof(id.internal)));
  std::memcpy(id.internal, ids[0].data(), sizeof(id.internal));
  Comm comm = nullptr;
  check(lib.CommInitRank(&comm, control->size(), id, rank), "ncclCommInitRank");
  return std::make_shared<NcclGroup>(std::move(control), comm, std::move(opts));
}

}  // namespace mlxdist::nccl
