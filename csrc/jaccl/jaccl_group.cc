#include "jaccl/jaccl_group.h"

#include <cstring>

#include "core/error.h"
#include "jaccl/ring_links.h"
#include "transport/ibverbs.h"
#include "transport/shm.h"
#include "transport/shm_verbs.h"

namespace mlxdist::jaccl {
namespace {

// Registered memory per rank: both slot sets for every peer, with room to spare.
size_t arena_bytes(int n, const Options& o) {
  return size_t(n) * 2 * o.depth * std::max<size_t>(o.frame_bytes, sizeof(Header)) + (1 << 20);
}

std::unique_ptr<verbs::QueuePairs> connect(ring::RingGroup& control, const Options& o) {
  const int n = control.size(), me = control.rank();
  auto exchange = [&control](const std::string& mine) { return control.exchange(mine); };
  auto names = [&control](int p) { return control.describe_peer(p); };
  auto lost = [&control](const std::vector<int>& peers) { return control.lost_peers(peers); };
  std::string transport = o.transport;
  if (transport == "auto")  // shared memory when every member shares this host
    transport = shm::all_on_this_host(exchange) ? "shm" : "ibverbs";
  if (transport == "shm")
    return std::make_unique<shm::ShmQueuePairs>(me, n, arena_bytes(n, o), exchange, names, lost);
  if (transport != "ibverbs") fail("unknown JACCL transport \"", transport, "\" (auto, shm or ibverbs)");
  std::vector<std::string> devices = o.devices;
  devices.resize(n);
  return ibverbs::connect(me, n, devices, exchange, names, lost, o.gid_index, o.ibverbs_lib);
}

}  // namespace

JacclGroup::JacclGroup(std::shared_ptr<ring::RingGroup> control, Options opts)
    : control_(std::move(control)), opts_(std::move(opts)),
      id_(mix_ids(control_->id(), 0x6a6163636cull)), calls_(id_, control_->size()) {
  qp_ = connect(*control_, opts_);
  mesh_ = std::make_unique<Mesh>(*qp_, rank(), size(), opts_.frame_bytes, opts_.depth,
                                 control_->options().timeout_s, "rank " + std::to_string(rank()));
  if (opts_.ring)
    ring_ = std::make_unique<ring::RingGroup>(id_, rank(), size(),
                                              std::make_unique<RingLinks>(*mesh_, *qp_),
                                              control_->options());
}

JacclGroup::~JacclGroup() { close(); }

void JacclGroup::abort(const std::string& why) {
  if (qp_) qp_->abort(why);
  control_->abort(why);
}

void JacclGroup::close() {
  if (qp_) qp_->close();
  control_->close();
}

void JacclGroup::all_reduce(const void* in, void* out, size_t count, DType t, ReduceOp op,
                            uint64_t shape_hash) {
  if (ring_) return ring_->all_reduce(in, out, count, t, op, shape_hash);
  const Header h = calls_.collective(OpCode::kAllReduce, t, op, count * dtype_size(t), shape_hash);
  if (widened(t, op)) {  // float32 on the wire
    work_.resize(count * sizeof(float));
    float* w = reinterpret_cast<float*>(work_.data());
    to_float32(in, w, count, t);
    jaccl::all_reduce(*mesh_, h, work_.data(), work_.data(), count, DType::kFloat32, op);
    from_float32(w, out, count, t);
    return;
  }
  jaccl::all_reduce(*mesh_, h, static_cast<const char*>(in), static_cast<char*>(out), count, t, op);
}

void JacclGroup::all_gather(const void* in, void* out, size_t count, DType t, uint64_t shape_hash) {
  if (ring_) return ring_->all_gather(in, out, count, t, shape_hash);
  const size_t bytes = count * dtype_size(t);
  const Header h = calls_.collective(OpCode::kAllGather, t, ReduceOp::kSum, bytes, shape_hash);
  jaccl::all_gather(*mesh_, h, static_cast<const char*>(in), static_cast<char*>(out), bytes);
}

void JacclGroup::reduce_scatter(const void* in, void* out, size_t count, DType t, ReduceOp op,
                                uint64_t shape_hash) {
  if (ring_) return ring_->reduce_scatter(in, out, count, t, op, shape_hash);
  const size_t total = count * size();
  const Header h = calls_.collective(OpCode::kReduceScatter, t, op, total * dtype_size(t), shape_hash);
  if (widened(t, op)) {
    work_.resize(total * sizeof(float));
    out_.resize(count * sizeof(float));
    to_float32(in, reinterpret_cast<float*>(work_.data()), total, t);
    jaccl::reduce_scatter(*mesh_, h, work_.data(), out_.data(), count, DType::kFloat32, op);
    from_float32(reinterpret_cast<const float*>(out_.data()), out, count, t);
    return;
  }
  jaccl::reduce_scatter(*mesh_, h, static_cast<const char*>(in), static_cast<char*>(out), count, t, op);
}

// Point-to-point goes over the mesh in both variants: its sends may outlive their op there.
void JacclGroup::send(const void* in, size_t count, DType t, int dst, uint64_t shape_hash, int tag) {
  check_peer(dst, "destination");
  const size_t bytes = count * dtype_size(t);
  const Header h = calls_.send(t, bytes, shape_hash, dst, tag);
  jaccl::send(*mesh_, h, static_cast<const char*>(in), bytes, dst);
}

void JacclGroup::recv(void* out, size_t count, DType t, int src, uint64_t shape_hash, int tag) {
  check_peer(src, "source");
  const size_t bytes = count * dtype_size(t);
  const Header h = calls_.recv(t, bytes, shape_hash, src, tag);
  jaccl::recv(*mesh_, h, static_cast<char*>(out), bytes, src);
}

void JacclGroup::sendrecv(const void* in, size_t send_count, int dst, uint64_t send_hash,
                          void* out, size_t recv_count, int src, uint64_t recv_hash, DType t,
                          int tag) {
  check_peer(dst, "destination");
  check_peer(src, "source");
  const size_t es = dtype_size(t);
  const auto h = calls_.sendrecv(t, send_count * es, send_hash, dst, recv_count * es, recv_hash, src, tag);
  jaccl::sendrecv(*mesh_, h.send, static_cast<const char*>(in), send_count * es, dst, h.recv,
                  static_cast<char*>(out), recv_count * es, src);
}

void JacclGroup::all_to_all(const void* in, const std::vector<size_t>& send_counts, void* out,
                            const std::vector<size_t>& recv_counts, DType t, uint64_t shape_hash) {
  if (ring_) return ring_->all_to_all(in, send_counts, out, recv_counts, t, shape_hash);
  const Header h = calls_.collective(OpCode::kAllToAll, t, ReduceOp::kSum, 0, shape_hash);
  const auto b = keep_own_block(in, send_counts, out, recv_counts, dtype_size(t), rank());
  jaccl::all_to_all(*mesh_, h, static_cast<const char*>(in), b.send_at, static_cast<char*>(out),
                    b.recv_at);
}

void JacclGroup::star(const Header& h, int root, const std::vector<Bytes>& to,
                      const std::vector<Bytes>& from) {
  if (ring_) return ring_->star(h, root, to, from);
  std::vector<std::pair<const void*, size_t>> out;
  std::vector<std::pair<void*, size_t>> in;
  for (int p = 0; p < size(); ++p) {
    out.emplace_back(to[p].data, to[p].len);
    in.emplace_back(const_cast<void*>(from[p].data), from[p].len);
  }
  jaccl::star(*mesh_, h, root, out, in);
}

void JacclGroup::barrier() {
  if (ring_) return ring_->barrier();
  const Header h = calls_.collective(OpCode::kBarrier, DType::kUInt8, ReduceOp::kSum, 0, 0);
  jaccl::all_gather(*mesh_, h, nullptr, nullptr, 0);
}

std::shared_ptr<Group> JacclGroup::split(int color, int key) {
  // The split itself runs on the control ring, which a peer inside another op never reads: first
  // the same header check as every op, on the data path, so a split against an all_sum raises
  // on both ranks at once, naming both calls, instead of waiting out the timeout.
  if (ring_) {
    ring_->gather_split(color, key);
  } else {
    const Header h = calls_.collective(OpCode::kSplit, DType::kInt32, ReduceOp::kSum, 8, 0);
    jaccl::all_gather(*mesh_, h, nullptr, nullptr, 0);
  }
  auto child = std::dynamic_pointer_cast<ring::RingGroup>(control_->split(color, key));
  return std::make_shared<JacclGroup>(std::move(child), opts_);
}

std::shared_ptr<Group> make_world(int rank, const std::vector<std::vector<std::string>>& hostfile,
                                  const std::vector<int>& listen_fds, ring::Options ring_opts,
                                  Options opts) {
  ring_opts.transport = "tcp";  // control only: the data goes over the queue pairs
  auto control = std::dynamic_pointer_cast<ring::RingGroup>(
      ring::make_world(rank, hostfile, listen_fds, ring_opts));
  return std::make_shared<JacclGroup>(std::move(control), std::move(opts));
}

}  // namespace mlxdist::jaccl
