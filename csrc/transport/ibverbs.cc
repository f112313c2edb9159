#include "transport/ibverbs.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/library.h"

namespace mlxdist::ibverbs {
namespace {

// The subset of libibverbs.so.1's ABI used here (IBVERBS_1.1 symbols, rdma-core's stable
// layouts), declared by hand so that building needs no rdma-core headers. Structs we only get
// pointers to are declared up to the last field we read; structs we fill in are complete.
// ibv_post_send / ibv_post_recv / ibv_poll_cq are inline in the real header, calling through
// ibv_context::ops, so we do the same. Sizes and offsets were checked against
// <infiniband/verbs.h> (rdma-core 44) with static_asserts outside the project.
namespace abi {
struct Device;
struct PD;
struct Context;
union Gid {
  uint8_t raw[16];
  struct { uint64_t subnet_prefix, interface_id; } global;
};
struct CQ { Context* context; };  // prefix
struct QP {                        // prefix
  Context* context;
  void *qp_context, *pd, *send_cq, *recv_cq, *srq;
  uint32_t handle, qp_num;
};
struct MR { Context* context; PD* pd; void* addr; size_t length; uint32_t handle, lkey, rkey; };
struct Sge { uint64_t addr; uint32_t length, lkey; };
struct SendWr {
  uint64_t wr_id;
  SendWr* next;
  Sge* sg_list;
  int num_sge, opcode;
  unsigned send_flags;
  uint32_t imm_data;
  uint64_t wr[4];               // union rdma / atomic / ud
  uint32_t qp_type;             // union xrc
  alignas(8) uint64_t tail[6];  // union bind_mw / tso
};
struct RecvWr { uint64_t wr_id; RecvWr* next; Sge* sg_list; int num_sge; };
struct Wc {
  uint64_t wr_id;
  int status, opcode;
  uint32_t vendor_err, byte_len, imm_data, qp_num, src_qp;
  unsigned wc_flags;
  uint16_t pkey_index, slid;
  uint8_t sl, dlid_path_bits;
};
struct Ops {  // struct ibv_context_ops: 32 function pointers
  void* a[11];
  int (*poll_cq)(CQ*, int, Wc*);
  void* b[13];
  int (*post_send)(QP*, SendWr*, SendWr**);
  int (*post_recv)(QP*, RecvWr*, RecvWr**);
  void* c[5];
};
struct Context { Device* device; Ops ops; };  // prefix
// The exported ibv_query_port fills only the prefix through `flags` (its _compat struct);
// newer releases append active_speed_ex, kept here as room.
struct PortAttr {
  int state, max_mtu, active_mtu, gid_tbl_len;
  uint32_t port_cap_flags, max_msg_sz, bad_pkey_cntr, qkey_viol_cntr;
  uint16_t pkey_tbl_len, lid, sm_lid;
  uint8_t lmc, max_vl_num, sm_sl, subnet_timeout, init_type_reply, active_width, active_speed,
      phys_state, link_layer, flags;
  uint16_t port_cap_flags2;
  uint32_t active_speed_ex;
};
struct QpCap { uint32_t max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data; };
struct QpInitAttr {
  void* qp_context;
  CQ *send_cq, *recv_cq;
  void* srq;
  QpCap cap;
  int qp_type, sq_sig_all;
};
struct AhAttr {
  Gid dgid;  // struct ibv_global_route grh, flattened
  uint32_t flow_label;
  uint8_t sgid_index, hop_limit, traffic_class;
  uint16_t dlid;
  uint8_t sl, src_path_bits, static_rate, is_global, port_num;
};
struct QpAttr {
  int qp_state, cur_qp_state, path_mtu, path_mig_state;
  uint32_t qkey, rq_psn, sq_psn, dest_qp_num;
  unsigned qp_access_flags;
  QpCap cap;
  AhAttr ah_attr, alt_ah_attr;
  uint16_t pkey_index, alt_pkey_index;
  uint8_t en_sqd_async_notify, sq_draining, max_rd_atomic, max_dest_rd_atomic, min_rnr_timer,
      port_num, timeout, retry_cnt, rnr_retry, alt_port_num, alt_timeout;
  uint32_t rate_limit;
};
enum : int {
  kQptRc = 2, kWrSend = 2, kSendSignaled = 2, kAccessLocalWrite = 1,
  kQpsInit = 1, kQpsRtr = 2, kQpsRts = 3, kPortActive = 4, kLinkEthernet = 2,
  kWcLocLenErr = 1, kWcRetryExcErr = 12,
  kQpState = 1, kQpAccessFlags = 1 << 3, kQpPkeyIndex = 1 << 4, kQpPort = 1 << 5,
  kQpAv = 1 << 7, kQpPathMtu = 1 << 8, kQpTimeout = 1 << 9, kQpRetryCnt = 1 << 10,
  kQpRnrRetry = 1 << 11, kQpRqPsn = 1 << 12, kQpMaxQpRdAtomic = 1 << 13,
  kQpMinRnrTimer = 1 << 15, kQpSqPsn = 1 << 16, kQpMaxDestRdAtomic = 1 << 17,
  kQpDestQpn = 1 << 20,
};
}  // namespace abi

// Exported functions used: X(name without "ibv_", return type, parameters...).
#define MLXDIST_IBV_FUNCTIONS(X)                                    \
  X(get_device_list, abi::Device**, int*)                           \
  X(free_device_list, void, abi::Device**)                          \
  X(get_device_name, const char*, abi::Device*)                     \
  X(open_device, abi::Context*, abi::Device*)                       \
  X(close_device, int, abi::Context*)                               \
  X(alloc_pd, abi::PD*, abi::Context*)                              \
  X(dealloc_pd, int, abi::PD*)                                      \
  X(create_cq, abi::CQ*, abi::Context*, int, void*, void*, int)     \
  X(destroy_cq, int, abi::CQ*)                                      \
  X(reg_mr, abi::MR*, abi::PD*, void*, size_t, int)                 \
  X(dereg_mr, int, abi::MR*)                                        \
  X(create_qp, abi::QP*, abi::PD*, abi::QpInitAttr*)                \
  X(destroy_qp, int, abi::QP*)                                      \
  X(modify_qp, int, abi::QP*, abi::QpAttr*, int)                    \
  X(query_port, int, abi::Context*, uint8_t, abi::PortAttr*)        \
  X(query_gid, int, abi::Context*, uint8_t, int, abi::Gid*)         \
  X(wc_status_str, const char*, int)

struct Lib {
#define MLXDIST_IBV_FIELD(name, ret, ...) ret (*name)(__VA_ARGS__) = nullptr;
  MLXDIST_IBV_FUNCTIONS(MLXDIST_IBV_FIELD)
#undef MLXDIST_IBV_FIELD
};

// Loads path once and keeps it, never destroyed: providers hold state in the library, and queue
// pairs may outlive static destructors. nullptr with why on failure.
Lib* load(const std::string& path, std::string* why) {
  static std::mutex mu;
  static auto* libs = new std::map<std::string, Lib>();
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = libs->find(path); it != libs->end()) return &it->second;
  std::string tried;
  void* h = library::open_first({path}, false, &tried);
  if (!h) {
    *why = "libibverbs could not be loaded (" + tried.substr(3) +
           "); install rdma-core's libibverbs1 and the NIC's provider (ibverbs-providers)";
    return nullptr;
  }
  Lib lib;
  std::string missing;
  // dlsym binds the default symbol version (IBVERBS_1.1), as linking against -libverbs would.
#define MLXDIST_IBV_BIND(name, ret, ...) library::bind(h, "ibv_" #name, lib.name, &missing);
  MLXDIST_IBV_FUNCTIONS(MLXDIST_IBV_BIND)
#undef MLXDIST_IBV_BIND
  if (!missing.empty()) {
    *why = path + " is not a usable libibverbs (missing " + missing + ")";
    return nullptr;
  }
  return &libs->emplace(path, lib).first->second;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::vector<std::string> device_names(Lib& lib) {
  int n = 0;
  abi::Device** list = lib.get_device_list(&n);
  std::vector<std::string> names;
  if (!list) return names;  // ENOSYS: the kernel has no RDMA support, so no devices either
  for (int i = 0; i < n && list[i]; ++i) names.push_back(lib.get_device_name(list[i]));
  lib.free_device_list(list);
  return names;
}

constexpr uint32_t kDepth = 512;  // posts outstanding per peer and direction
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr auto kMaxNap = std::chrono::microseconds(200);

struct Address {  // what a rank tells a peer about the queue pair facing it
  uint32_t lid = 0, qpn = 0, psn = 0, mtu = 0;
  abi::Gid gid{};
};

class IbvQueuePairs : public verbs::QueuePairs {
 public:
  IbvQueuePairs(Lib& lib, int rank, int size, PeerNames names, LostPeers lost, int gid_index)
      : lib_(lib), rank_(rank), names_(std::move(names)), lost_(std::move(lost)),
        gid_index_(gid_index), peers_(size) {}
  ~IbvQueuePairs() override {
    close();
    for (auto& r : regs_) std::free(r.mem);
  }

  // Opens devices, creates a PD and CQ per device and a QP per peer, moved to INIT.
  void open(const std::vector<std::string>& devices) {
    std::vector<std::string> found = device_names(lib_);
    for (int p = 0; p < int(peers_.size()); ++p) {
      if (p == rank_) continue;
      const std::string& spec = devices[p];
      if (spec.empty()) fail("no RDMA device named for ", describe_peer(p), " (MLX_IBV_DEVICES)");
      size_t colon = spec.find(':');
      std::string name = spec.substr(0, colon);
      int port = colon == std::string::npos ? 1 : std::atoi(spec.c_str() + colon + 1);
      size_t d = 0;
      while (d < devs_.size() && !(devs_[d].name == name && devs_[d].port == port)) ++d;
      if (d == devs_.size()) open_device(name, port, found);
      peers_[p].dev = int(d);
      devs_[d].peers++;
    }
    for (auto& dev : devs_) {
      dev.cq = lib_.create_cq(dev.ctx, int(2 * kDepth * dev.peers), nullptr, nullptr, 0);
      if (!dev.cq)
        fail(dev.what(), "cannot create a completion queue (", std::strerror(errno), ")");
    }
    for (int p = 0; p < int(peers_.size()); ++p) {
      if (p == rank_) continue;
      Dev& dev = devs_[peers_[p].dev];
      abi::QpInitAttr init{};
      init.send_cq = init.recv_cq = dev.cq;
      init.cap = {kDepth, kDepth, 1, 1, 0};
      init.qp_type = abi::kQptRc;
      peers_[p].qp = lib_.create_qp(dev.pd, &init);
      if (!peers_[p].qp)
        fail(dev.what(), "cannot create a queue pair for ", describe_peer(p), " (",
             std::strerror(errno), ")");
      peers_[p].psn = std::random_device()() & 0xffffff;
      abi::QpAttr a{};
      a.qp_state = abi::kQpsInit;
      a.port_num = uint8_t(dev.port);
      a.qp_access_flags = abi::kAccessLocalWrite;  // sends and receives only, no RDMA writes
      modify(p, a, abi::kQpState | abi::kQpPkeyIndex | abi::kQpPort | abi::kQpAccessFlags, "INIT");
    }
  }

  Address address(int p) const {
    const Dev& dev = devs_[peers_[p].dev];
    return {dev.lid, peers_[p].qp->qp_num, peers_[p].psn, dev.mtu, dev.gid};
  }

  // INIT -> RTR -> RTS, aimed at the peer's queue pair.
  void connect_peer(int p, const Address& to) {
    const Dev& dev = devs_[peers_[p].dev];
    abi::QpAttr a{};
    a.qp_state = abi::kQpsRtr;
    a.path_mtu = int(std::min(dev.mtu, to.mtu));
    a.dest_qp_num = to.qpn;
    a.rq_psn = to.psn;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 12;  // 0.64 ms before a sender retries a receive not yet posted
    a.ah_attr.dlid = uint16_t(to.lid);
    a.ah_attr.port_num = uint8_t(dev.port);
    if (dev.ethernet || to.lid == 0) {  // RoCE has no LIDs: route by GID
      a.ah_attr.is_global = 1;
      a.ah_attr.dgid = to.gid;
      a.ah_attr.sgid_index = uint8_t(dev.gid_index);
      a.ah_attr.hop_limit = 64;
    }
    modify(p, a, abi::kQpState | abi::kQpAv | abi::kQpPathMtu | abi::kQpDestQpn | abi::kQpRqPsn |
                     abi::kQpMaxDestRdAtomic | abi::kQpMinRnrTimer, "RTR");
    a = abi::QpAttr{};
    a.qp_state = abi::kQpsRts;
    a.timeout = 14;   // 4.096 us * 2^14 = 67 ms per try, 8 tries: a dead peer shows in ~0.5 s
    a.retry_cnt = 7;
    a.rnr_retry = 7;  // infinite: a receive not posted yet is waited for, not an error
    a.sq_psn = peers_[p].psn;
    a.max_rd_atomic = 1;
    modify(p, a, abi::kQpState | abi::kQpTimeout | abi::kQpRetryCnt | abi::kQpRnrRetry |
                     abi::kQpSqPsn | abi::kQpMaxQpRdAtomic, "RTS");
  }

  verbs::Buffer allocate(size_t bytes) override {
    if (closed_) fail("RDMA queue pairs are closed");
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    size_t len = (std::max<size_t>(bytes, 1) + page - 1) / page * page;
    void* mem = nullptr;
    if (posix_memalign(&mem, page, len) != 0) fail("cannot allocate ", len, " bytes for RDMA");
    std::memset(mem, 0, len);  // touch the pages before pinning them
    regs_.push_back({mem, {}});  // owns mem from here on, also when registering fails
    for (auto& dev : devs_) {
      abi::MR* mr = lib_.reg_mr(dev.pd, mem, len, abi::kAccessLocalWrite);
      if (!mr)
        fail(dev.what(), "cannot register ", len, " bytes (", std::strerror(errno),
             "; is ulimit -l too low?)");
      regs_.back().mrs.push_back(mr);
    }
    return {static_cast<char*>(mem), bytes, uint64_t(regs_.size() - 1)};
  }

  void post_send(int peer, const verbs::Buffer& buf, size_t off, size_t len, uint64_t id) override {
    abi::Sge sge = sge_for(peer, buf, off, len, false);
    abi::SendWr wr{}, *bad = nullptr;
    wr.wr_id = take_slot(peer, false, id, len);
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = abi::kWrSend;
    wr.send_flags = abi::kSendSignaled;
    abi::QP* qp = peers_[peer].qp;
    if (int rc = qp->context->ops.post_send(qp, &wr, &bad)) {
      release(wr.wr_id);
      fail("RDMA send to ", describe_peer(peer), " could not be posted (", std::strerror(rc), ")");
    }
  }

  void post_recv(int peer, const verbs::Buffer& buf, size_t off, size_t len, uint64_t id) override {
    abi::Sge sge = sge_for(peer, buf, off, len, true);
    abi::RecvWr wr{}, *bad = nullptr;
    wr.wr_id = take_slot(peer, true, id, len);
    wr.sg_list = &sge;
    wr.num_sge = 1;
    abi::QP* qp = peers_[peer].qp;
    if (int rc = qp->context->ops.post_recv(qp, &wr, &bad)) {
      release(wr.wr_id);
      fail("RDMA receive from ", describe_peer(peer), " could not be posted (", std::strerror(rc),
           ")");
    }
  }

  bool poll(std::vector<verbs::Completion>& done, Deadline deadline,
            const std::vector<int>& waiting_on) override {
    if (closed_) fail("RDMA queue pairs are closed");
    const size_t before = done.size();
    const auto start = Clock::now();
    auto nap = std::chrono::microseconds(10);
    for (;;) {
      drain(&done);
      if (done.size() > before) return true;
      if (outstanding_ == 0)
        fail("RDMA poll with nothing posted (waiting for ", who(waiting_on), ")");
      const auto now = Clock::now();
      if (now - start < kSpin && now < deadline) continue;
      // Past the spin: nap between looks, so a long wait does not burn a core.
      if (std::string lost = lost_ ? lost_(waiting_on) : ""; !lost.empty()) {
        drain(&done);  // what it completed before leaving still counts
        if (done.size() > before) return true;
        fail(lost, " closed the connection");
      }
      if (now >= deadline) return false;
      std::this_thread::sleep_for(std::min<Clock::duration>(nap, deadline - now));
      nap = std::min(nap * 2, kMaxNap);
    }
  }

  std::string describe_peer(int peer) const override {
    return names_ ? names_(peer) : "rank " + std::to_string(peer);
  }

  void close() override {
    if (closed_) return;
    closed_ = true;
    // Graceful: give posted sends a moment to be delivered (bounded; errors are moot now).
    const auto until = Clock::now() + std::chrono::seconds(1);
    auto sending = [&] {
      return std::any_of(peers_.begin(), peers_.end(), [](const Peer& p) { return p.sends > 0; });
    };
    try {
      while (sending() && Clock::now() < until) {
        drain(nullptr);
        std::this_thread::sleep_for(kMaxNap);
      }
    } catch (const DistError&) {
    }
    // Dependents first: QPs use CQs and the PD, MRs use the PD, all use the context.
    for (auto& p : peers_)
      if (p.qp) lib_.destroy_qp(std::exchange(p.qp, nullptr));
    for (auto& r : regs_)
      for (abi::MR* mr : std::exchange(r.mrs, {})) lib_.dereg_mr(mr);
    for (auto& d : devs_) {
      if (d.cq) lib_.destroy_cq(std::exchange(d.cq, nullptr));
      if (d.pd) lib_.dealloc_pd(std::exchange(d.pd, nullptr));
      if (d.ctx) lib_.close_device(std::exchange(d.ctx, nullptr));
    }
  }

 private:
  struct Dev {
    std::string name;
    int port = 1, peers = 0, gid_index = 0;
    abi::Context* ctx = nullptr;
    abi::PD* pd = nullptr;
    abi::CQ* cq = nullptr;
    uint32_t lid = 0, mtu = 0;
    bool ethernet = false;
    abi::Gid gid{};
    std::string what() const { return "RDMA device \"" + name + "\": "; }
  };
  struct Peer {
    int dev = -1;
    abi::QP* qp = nullptr;
    uint32_t psn = 0, sends = 0, recvs = 0;  // sends, recvs: posted, not yet completed
  };
  struct Reg {
    void* mem;
    std::vector<abi::MR*> mrs;  // one per device, indexed as devs_
  };
  struct Slot {  // a posted work request; its wr_id is the slot's index
    uint64_t id;
    size_t len;
    int peer;
    bool is_recv;
  };

  void open_device(const std::string& name, int port, const std::vector<std::string>& found) {
    if (std::find(found.begin(), found.end(), name) == found.end())
      fail("no RDMA device \"", name, "\" on this host (found: ",
           found.empty() ? "none" : join(found),
           "); JACCL needs an RDMA NIC (InfiniBand or RoCE) or ranks on one host (shared memory)");
    int n = 0;
    abi::Device** list = lib_.get_device_list(&n);
    abi::Context* ctx = nullptr;
    for (int i = 0; list && i < n && !ctx; ++i)
      if (name == lib_.get_device_name(list[i])) ctx = lib_.open_device(list[i]);
    int err = errno;
    if (list) lib_.free_device_list(list);  // an open context keeps its device
    if (!ctx) fail("RDMA device \"", name, "\" cannot be opened (", std::strerror(err), ")");
    Dev& dev = devs_.emplace_back();
    dev.name = name, dev.port = port, dev.ctx = ctx;
    dev.pd = lib_.alloc_pd(ctx);
    if (!dev.pd)
      fail(dev.what(), "cannot allocate a protection domain (", std::strerror(errno), ")");
    abi::PortAttr pa{};
    if (int rc = lib_.query_port(ctx, uint8_t(port), &pa))
      fail(dev.what(), "cannot query port ", port, " (", std::strerror(rc > 0 ? rc : errno), ")");
    static const char* states[] = {"NOP", "DOWN", "INIT", "ARMED", "ACTIVE", "ACTIVE_DEFER"};
    if (pa.state != abi::kPortActive)
      fail(dev.what(), "port ", port, " is not active (state ",
           pa.state >= 0 && pa.state < 6 ? states[pa.state] : "unknown", ")");
    dev.lid = pa.lid, dev.mtu = uint32_t(pa.active_mtu);
    dev.ethernet = pa.link_layer == abi::kLinkEthernet;
    dev.gid_index = pick_gid(dev, pa.gid_tbl_len);
    if (lib_.query_gid(ctx, uint8_t(port), dev.gid_index, &dev.gid) && dev.ethernet)
      fail(dev.what(), "cannot read GID ", dev.gid_index, " of port ", port);
  }

  // RoCE needs a GID: MLXDIST_IBV_GID_INDEX, else RoCE v2 with an IPv4 address (routable, what
  // RoCE deployments use), else any non-zero one. InfiniBand routes by LID.
  int pick_gid(const Dev& dev, int table_len) {
    if (gid_index_ >= 0) return gid_index_;
    if (!dev.ethernet) return 0;
    int best = 0, best_score = -1;
    for (int i = 0; i < table_len && i < 256; ++i) {
      abi::Gid g{};
      if (lib_.query_gid(dev.ctx, uint8_t(dev.port), i, &g) ||
          (g.global.subnet_prefix == 0 && g.global.interface_id == 0))
        continue;
      std::ifstream f("/sys/class/infiniband/" + dev.name + "/ports/" + std::to_string(dev.port) +
                      "/gid_attrs/types/" + std::to_string(i));
      std::string type;
      std::getline(f, type);
      bool v4 = std::all_of(g.raw, g.raw + 10, [](uint8_t b) { return b == 0; }) &&
                g.raw[10] == 0xff && g.raw[11] == 0xff;
      int score = (type.find("v2") != std::string::npos ? 2 : 0) + (v4 ? 1 : 0);
      if (score > best_score) best = i, best_score = score;
    }
    return best;
  }

  void modify(int p, abi::QpAttr& a, int mask, const char* state) {
    if (int rc = lib_.modify_qp(peers_[p].qp, &a, mask))
      fail(devs_[peers_[p].dev].what(), "the queue pair for ", describe_peer(p),
           " cannot move to ", state, " (", std::strerror(rc > 0 ? rc : errno), ")");
  }

  abi::Sge sge_for(int peer, const verbs::Buffer& buf, size_t off, size_t len, bool recv) {
    if (closed_) fail("RDMA queue pairs are closed");
    if (peer < 0 || peer >= int(peers_.size()) || !peers_[peer].qp)
      fail("RDMA post for peer ", peer, ", which has no queue pair");
    if (buf.key >= regs_.size() || buf.data != regs_[buf.key].mem || off > buf.len ||
        len > buf.len - off || len > UINT32_MAX)
      fail("RDMA post for ", describe_peer(peer), ": buffer not from allocate() or out of range");
    if ((recv ? peers_[peer].recvs : peers_[peer].sends) >= kDepth)
      fail("RDMA ", recv ? "receives from " : "sends to ", describe_peer(peer), ": more than ",
           kDepth, " outstanding");
    abi::MR* mr = regs_[buf.key].mrs[size_t(peers_[peer].dev)];
    return {uint64_t(uintptr_t(buf.data + off)), uint32_t(len), mr->lkey};
  }

  uint64_t take_slot(int peer, bool is_recv, uint64_t id, size_t len) {
    if (free_.empty()) free_.push_back(slots_.size()), slots_.emplace_back();
    uint64_t s = free_.back();
    free_.pop_back();
    slots_[s] = {id, len, peer, is_recv};
    (is_recv ? peers_[peer].recvs : peers_[peer].sends)++;
    outstanding_++;
    return s;
  }

  Slot release(uint64_t s) {
    free_.push_back(s);
    (slots_[s].is_recv ? peers_[slots_[s].peer].recvs : peers_[slots_[s].peer].sends)--;
    outstanding_--;
    return slots_[s];
  }

  // Reaps every CQ into done (nullptr: discards). Throws on a completion with an error.
  void drain(std::vector<verbs::Completion>* done) {
    abi::Wc wc[32];
    for (auto& dev : devs_) {
      int n;
      while (dev.cq && (n = dev.cq->context->ops.poll_cq(dev.cq, 32, wc)) != 0) {
        if (n < 0) fail(dev.what(), "polling the completion queue failed");
        for (int i = 0; i < n; ++i) {
          if (wc[i].wr_id >= slots_.size()) fail(dev.what(), "completion of an unknown request");
          Slot s = release(wc[i].wr_id);
          if (wc[i].status != 0)
            fail("RDMA ", s.is_recv ? "receive from " : "send to ", describe_peer(s.peer),
                 " failed: ", lib_.wc_status_str(wc[i].status), " (status ", wc[i].status,
                 ", vendor error ", wc[i].vendor_err, ")",
                 wc[i].status == abi::kWcLocLenErr ? "; the message did not fit the receive" : "",
                 wc[i].status == abi::kWcRetryExcErr ? "; the peer is unreachable or gone" : "");
          if (done) done->push_back({s.id, s.peer, s.is_recv, s.is_recv ? wc[i].byte_len : s.len});
        }
      }
    }
  }

  std::string who(const std::vector<int>& waiting_on) const {
    std::string s;
    for (int p = 0; p < int(peers_.size()); ++p)
      if (waiting_on.empty() ? peers_[p].sends + peers_[p].recvs > 0
                             : std::count(waiting_on.begin(), waiting_on.end(), p) > 0)
        s += (s.empty() ? "" : ", ") + describe_peer(p) + " (" + std::to_string(peers_[p].sends) +
             " sends, " + std::to_string(peers_[p].recvs) + " receives posted)";
    return s.empty() ? "no peer" : s;
  }

  Lib& lib_;
  int rank_;
  PeerNames names_;
  LostPeers lost_;
  int gid_index_;  // >= 0: MLXDIST_IBV_GID_INDEX
  std::vector<Peer> peers_;
  std::vector<Dev> devs_;
  std::vector<Reg> regs_;
  std::vector<Slot> slots_;
  std::vector<uint64_t> free_;
  size_t outstanding_ = 0;
  bool closed_ = false;
};

// Each round's blob is "ok\n..." or "error\n<message>". Throws, on every rank, when any failed.
void check_round(const std::vector<std::string>& blobs, int rank, int size,
                 const std::string& mine, const PeerNames& names) {
  if (!mine.empty()) fail("rank ", rank, ": ", mine);
  if (int(blobs.size()) != size)
    fail("RDMA set-up got ", blobs.size(), " blobs for ", size, " ranks");
  for (int r = 0; r < size; ++r)
    if (blobs[r].rfind("ok\n", 0) != 0)
      fail(names ? names(r) : "rank " + std::to_string(r), " could not set up RDMA: ",
           blobs[r].rfind("error\n", 0) == 0 ? blobs[r].substr(6) : "malformed set-up message");
}

}  // namespace

std::pair<bool, std::string> available(const std::string& lib_path) {
  std::string why;
  Lib* lib = load(lib_path, &why);
  if (!lib) return {false, why};
  std::vector<std::string> names = device_names(*lib);
  if (names.empty()) return {false, "no RDMA device on this host (libibverbs lists none)"};
  return {true, join(names)};
}

std::unique_ptr<verbs::QueuePairs> connect(int rank, int size,
                                           const std::vector<std::string>& devices,
                                           const AllGather& exchange,
                                           PeerNames names, LostPeers lost, int gid_index,
                                           const std::string& lib_path) {
  std::unique_ptr<IbvQueuePairs> qps;
  std::string err;
  // Round 1, "ok\n" then a row per rank: "lid qpn psn mtu gid-hex" (empty for oneself).
  std::ostringstream mine;
  try {
    if (int(devices.size()) != size)
      fail("RDMA devices listed for ", devices.size(), " ranks, the group has ", size);
    Lib* lib = load(lib_path, &err);
    if (!lib) fail(err);
    qps = std::make_unique<IbvQueuePairs>(*lib, rank, size, names, lost, gid_index);
    qps->open(devices);
    mine << "ok\n";
    for (int p = 0; p < size; ++p) {
      if (p != rank) {
        Address a = qps->address(p);
        mine << a.lid << ' ' << a.qpn << ' ' << a.psn << ' ' << a.mtu << ' ' << std::hex;
        for (uint8_t b : a.gid.raw) mine << (b >> 4) << (b & 15);
        mine << std::dec;
      }
      mine << '\n';
    }
  } catch (const std::exception& e) {  // DistError, or bad_alloc: still take part below
    err = e.what();
  }
  // Every rank takes part in both rounds, failed or not, so a failure anywhere fails everyone.
  std::vector<std::string> all = exchange(err.empty() ? mine.str() : "error\n" + err);
  check_round(all, rank, size, err, names);
  try {
    for (int p = 0; p < size; ++p) {
      if (p == rank) continue;
      std::istringstream rows(all[p]);
      std::string row, gid;
      for (int i = 0; i <= rank + 1; ++i) std::getline(rows, row);  // "ok", then up to ours
      std::istringstream fields(row);
      Address a;
      if (!(fields >> a.lid >> a.qpn >> a.psn >> a.mtu >> gid) || gid.size() != 32 ||
          gid.find_first_not_of("0123456789abcdef") != std::string::npos)
        fail("malformed RDMA address from ", qps->describe_peer(p));
      for (int i = 0; i < 16; ++i) a.gid.raw[i] = uint8_t(std::stoi(gid.substr(2 * i, 2), 0, 16));
      qps->connect_peer(p, a);
    }
  } catch (const std::exception& e) {  // DistError, or bad_alloc: still take part below
    err = e.what();
  }
  // Round 2 doubles as a barrier: nobody sends before every queue pair can receive.
  check_round(exchange(err.empty() ? "ok\n" : "error\n" + err), rank, size, err, names);
  return qps;
}

}  // namespace mlxdist::ibverbs
