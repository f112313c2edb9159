#include "nccl/nccl_group.h"

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

// One byte to and from every peer, so NCCL connects each pair now: later sends then never wait
// on the host for a peer to reach its matching recv.
void connect_pairs(Lib& lib, Comm comm, int me, int n) {
  if (n < 2) return;
  gpu::Cuda& cuda = gpu::cuda();
  void* buf = nullptr;
  gpu::check(cuda.Malloc(&buf, 2 * size_t(n)), "cudaMalloc");
  char* b = static_cast<char*>(buf);
  int rc = lib.GroupStart();
  for (int p = 0; p < n && rc == 0; ++p) {
    if (p == me) continue;
    rc = lib.Send(b + me, 1, kUInt8, p, comm, nullptr);
    if (rc == 0) rc = lib.Recv(b + n + p, 1, kUInt8, p, comm, nullptr);
  }
  int end = lib.GroupEnd();
  int sync = rc == 0 && end == 0 ? cuda.StreamSynchronize(nullptr) : 0;
  cuda.Free(buf);
  check(rc ? rc : end, "connecting NCCL's point-to-point pairs", comm);
  gpu::check(sync, "cudaStreamSynchronize");
}

}  // namespace

bool NcclGroup::native(DType t, ReduceOp op) {
  return data_type(t) >= 0 && (t != DType::kComplex64 || op == ReduceOp::kSum);
}

NcclGroup::NcclGroup(std::shared_ptr<ring::RingGroup> control, Comm comm, Options opts)
    : control_(std::move(control)), lib_(load(opts.lib)), opts_(std::move(opts)),
      id_(mix_ids(control_->id(), 0x6e63636cull)), timeout_s_(control_->options().timeout_s),
      sent_(control_->size()), received_(control_->size()), comm_(comm) {
  try {
    connect_pairs(lib_, comm_, rank(), size());
  } catch (...) {
    lib_.CommAbort(comm_);
    throw;
  }
  watchdog_ = std::thread([this] { watch(); });
}

NcclGroup::~NcclGroup() {
  close();
  gpu::Cuda& cuda = gpu::cuda();
  for (auto& p : pending_) cuda.EventDestroy(p.event);
  for (void* e : free_events_) cuda.EventDestroy(e);
}

void NcclGroup::fail_locked(const std::string& why) {
  if (failure_.empty()) failure_ = why;
  if (!destroyed_) lib_.CommAbort(comm_);  // NCCL kernels in flight return; the stream moves on
  destroyed_ = true;
  cv_.notify_all();
}

void NcclGroup::throw_if_failed_locked() const {
  if (!failure_.empty()) fail("the NCCL communicator was aborted after an earlier error: ", failure_);
}

void NcclGroup::abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    fail_locked("the group was aborted");
  }
  control_->abort();
}

void NcclGroup::close() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (stop_) return;
    // Ops still on the stream finish first (the watchdog fails them at the timeout).
    cv_.wait(lock, [this] { return pending_.empty() || !failure_.empty(); });
    if (!destroyed_) lib_.CommDestroy(comm_);
    destroyed_ = true;
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  control_->close();
}

void NcclGroup::watch() {
  gpu::Cuda& cuda = gpu::cuda();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::milliseconds(pending_.empty() ? 200 : 2));
    while (!pending_.empty() && failure_.empty()) {
      Pending& p = pending_.front();
      int rc = cuda.EventQuery(p.event);
      if (rc == gpu::kNotReady) {
        double waited = std::chrono::duration<double>(Clock::now() - p.since).count();
        if (waited > timeout_s_)
          fail_locked(p.what + " on " + label() + ": no progress for " + std::to_string(int(waited)) +
                      " s (MLXDIST_TIMEOUT): a peer stalled, died or called another op; the "
                      "NCCL communicator was aborted");
        break;
      }
      if (rc != 0) {
        fail_locked(p.what + " on " + label() + ": CUDA error " + cuda.GetErrorString(rc));
        break;
      }
      free_events_.push_back(p.event);
      pending_.pop_front();
      // The next op's clock starts when it reaches the head of the stream's NCCL work.
      if (!pending_.empty()) pending_.front().since = std::max(pending_.front().since, Clock::now());
      cv_.notify_all();
    }
    int async = 0;
    if (failure_.empty() && !destroyed_ && lib_.CommGetAsyncError(comm_, &async) == 0 &&
        async != 0 && async != kInProgress)
      fail_locked("NCCL failed on " + label() + ": " + lib_.GetErrorString(async) + " (" +
                  lib_.GetLastError(comm_) + ")");
  }
}

Header NcclGroup::header(OpCode op, DType t, ReduceOp r, uint64_t nbytes, uint64_t shape_hash,
                         uint64_t seq) const {
  return make_header(id_, op, t, r, nbytes, shape_hash, seq);
}

void NcclGroup::agree(const Header& mine) {
  if (!opts_.check) return;
  std::vector<Header> all(size());
  control_->all_gather(&mine, all.data(), sizeof(Header), DType::kUInt8, 0);
  for (int p = 0; p < size(); ++p)
    if (p != rank()) check_header(mine, all[p], "this rank", control_->describe_peer(p));
}

template <typename Call>
void NcclGroup::enqueue(void* stream, const Header& h, const char* call, Call&& nccl_call) {
  gpu::Cuda& cuda = gpu::cuda();
  {
    std::lock_guard<std::mutex> lock(mu_);
    throw_if_failed_locked();
    void* event = nullptr;
    if (free_events_.empty()) {
      gpu::check(cuda.EventCreateWithFlags(&event, gpu::kDisableTiming), "cudaEventCreateWithFlags");
    } else {
      event = free_events_.back();
      free_events_.pop_back();
    }
    int rc = nccl_call(comm_);
    int recorded = rc == 0 ? cuda.EventRecord(event, stream) : 0;
    if (rc != 0 || recorded != 0) {
      free_events_.push_back(event);
      std::string why = rc ? std::string(call) + " failed: " + lib_.GetErrorString(rc) + " (" +
                                 lib_.GetLastError(comm_) + ")"
                           : std::string("cudaEventRecord failed: ") + cuda.GetErrorString(recorded);
      fail_locked(why);
      fail(why);
    }
    pending_.push_back({event, describe(h), Clock::now()});
  }
  cv_.notify_all();
}

#define MLXDIST_READY()                         \
  std::lock_guard<std::mutex> ops(ops_mu_);     \
  {                                             \
    std::lock_guard<std::mutex> lock(mu_);      \
    throw_if_failed_locked();                   \
  }

void NcclGroup::all_reduce_on(void* stream, const void* in, void* out, size_t count, DType t,
                              ReduceOp op, uint64_t shape_hash) {
  MLXDIST_READY();
  const Header h = header(OpCode::kAllReduce, t, op, count * dtype_size(t), shape_hash, seq_++);
  agree(h);
  const int type = data_type(t), red = red_op(t, op);
  const size_t n = nccl_elements(count, t);
  enqueue(stream, h, "ncclAllReduce",
          [&](Comm c) { return lib_.AllReduce(in, out, n, type, red, c, stream); });
}

void NcclGroup::all_gather_on(void* stream, const void* in, void* out, size_t count, DType t,
                              uint64_t shape_hash) {
  MLXDIST_READY();
  const size_t bytes = count * dtype_size(t);
  const Header h = header(OpCode::kAllGather, t, ReduceOp::kSum, bytes, shape_hash, seq_++);
  agree(h);
  enqueue(stream, h, "ncclAllGather",
          [&](Comm c) { return lib_.AllGather(in, out, bytes, kUInt8, c, stream); });
}

void NcclGroup::reduce_scatter_on(void* stream, const void* in, void* out, size_t count, DType t,
                                  ReduceOp op, uint64_t shape_hash) {
  MLXDIST_READY();
  const Header h = header(OpCode::kReduceScatter, t, op, count * size() * dtype_size(t),
                          shape_hash, seq_++);
  agree(h);
  const int type = data_type(t), red = red_op(t, op);
  const size_t n = nccl_elements(count, t);
  enqueue(stream, h, "ncclReduceScatter",
          [&](Comm c) { return lib_.ReduceScatter(in, out, n, type, red, c, stream); });
}

void NcclGroup::send_on(void* stream, const void* in, size_t count, DType t, int dst,
                        uint64_t shape_hash, int tag) {
  MLXDIST_READY();
  check_peer(dst, "destination");
  const size_t bytes = count * dtype_size(t);
  Header h = header(OpCode::kSend, t, ReduceOp::kSum, bytes, shape_hash, sent_[dst]++);
  h.tag = uint8_t(tag);
  if (opts_.check) control_->send(&h, sizeof(Header), DType::kUInt8, dst, 0, tag);
  enqueue(stream, h, "ncclSend",
          [&](Comm c) { return lib_.Send(in, bytes, kUInt8, dst, c, stream); });
}

void NcclGroup::recv_on(void* stream, void* out, size_t count, DType t, int src,
                        uint64_t shape_hash, int tag) {
  MLXDIST_READY();
  check_peer(src, "source");
  const size_t bytes = count * dtype_size(t);
  Header h = header(OpCode::kSend, t, ReduceOp::kSum, bytes, shape_hash, received_[src]++);
  h.tag = uint8_t(tag);
  if (opts_.check) {
    Header theirs;
    control_->recv(&theirs, sizeof(Header), DType::kUInt8, src, 0, tag);
    check_header(h, theirs, "this rank", control_->describe_peer(src));
  }
  enqueue(stream, h, "ncclRecv",
          [&](Comm c) { return lib_.Recv(out, bytes, kUInt8, src, c, stream); });
}

#undef MLXDIST_READY

// Host memory runs on the control ring, in the same order as the NCCL ops.
void NcclGroup::all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                           uint64_t shape_hash) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  control_->all_reduce(in, out, count, t, op, shape_hash);
}

void NcclGroup::all_gather(const void* in, void* out, size_t count, DType t, uint64_t shape_hash) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  control_->all_gather(in, out, count, t, shape_hash);
}

void NcclGroup::reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,
                               uint64_t shape_hash) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  control_->reduce_scatter(in, out, count, t, op, shape_hash);
}

void NcclGroup::send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash, int tag) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  control_->send(in, count, t, dst, shape_hash, tag);
}

void NcclGroup::recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  control_->recv(out, count, t, src, shape_hash, tag);
}

void NcclGroup::barrier() {
  std::lock_guard<std::mutex> ops(ops_mu_);
  control_->barrier();
}

std::shared_ptr<Group> NcclGroup::split(int color, int key) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    throw_if_failed_locked();
  }
  // NCCL wants colors >= 0: number the distinct colors in order, as every member sees them.
  std::set<int> colors;
  for (const auto& c : control_->exchange(std::to_string(color))) colors.insert(std::stoi(c));
  const int dense = int(std::distance(colors.begin(), colors.find(color)));
  auto child_control = std::dynamic_pointer_cast<ring::RingGroup>(control_->split(color, key));
  gpu::check(gpu::cuda().SetDevice(opts_.device), "cudaSetDevice");
  Comm child = nullptr;
  check(lib_.CommSplit(comm_, dense, key, &child, nullptr), "ncclCommSplit", comm_);
  return std::make_shared<NcclGroup>(std::move(child_control), child, opts_);
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
