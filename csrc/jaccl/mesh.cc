#include "jaccl/mesh.h"

#include <algorithm>
#include <cstring>
#include <deque>

#include "core/error.h"

namespace mlxdist::jaccl {
namespace {

uint64_t post_id(int peer, bool is_recv, int slot) {
  return (uint64_t(uint32_t(peer)) << 32) | (uint64_t(is_recv) << 16) | uint64_t(slot);
}
int id_slot(uint64_t id) { return int(id & 0xffff); }

size_t frames_of(const std::vector<Segment>& segments, size_t frame) {
  size_t k = 0;
  for (const Segment& s : segments) k += (s.len + frame - 1) / frame;
  return k;
}

// Walks segments frame by frame; a receive segment's on_done runs as it is finished, empty
// segments included.
struct Frames {
  const std::vector<Segment>* segments;
  bool receiving = false;
  size_t seg = 0, off = 0;
  void settle() {
    while (seg < segments->size() && off == (*segments)[seg].len) {
      if (receiving && (*segments)[seg].on_done) (*segments)[seg].on_done();
      ++seg, off = 0;
    }
  }
  // The next frame (at most `frame` bytes); false when none is left.
  bool next(size_t frame, char** data, size_t* len) {
    settle();
    if (seg == segments->size()) return false;
    const Segment& s = (*segments)[seg];
    *data = static_cast<char*>(s.data) + off;
    *len = std::min(frame, s.len - off);
    off += *len;
    return true;
  }
};

struct FlowState {
  Frames out, in;
  size_t to_send = 0, sent = 0;     // messages, the header included
  size_t to_land = 0, landed = 0;   // payload frames
  bool header_seen = false;
  size_t first_frame = 1;  // index of the first payload message (0 without a header)
  int in_flight = 0;       // its messages posted, not yet complete
  bool sent_all() const { return sent == to_send && in_flight == 0; }
};

void start(FlowState& st, Flow& f, size_t frame) {
  st.out.segments = &f.send;
  st.in.segments = &f.recv;
  st.in.receiving = true;
  const size_t head = f.with_header ? 1 : 0;
  st.first_frame = head;
  st.to_send = f.sends ? head + frames_of(f.send, frame) : 0;
  st.to_land = f.receives ? frames_of(f.recv, frame) : 0;
  st.header_seen = !f.receives || !f.with_header;
  if (f.receives) st.in.settle();  // leading empty segments
}

}  // namespace

struct Mesh::Peer {
  std::deque<std::pair<int, size_t>> arrived;  // (slot, bytes) received, not yet landed, in order
  std::vector<int> free_send;
  std::deque<FlowState*> owners;  // whose each posted send is, in post (= completion) order
};

struct Mesh::Pending {
  Flow flow;
  FlowState st;
  std::vector<std::vector<char>> copies;  // the bytes its segments point at
  Clock::time_point moved;
};

Mesh::Mesh(verbs::QueuePairs& qp, int me, int n, size_t frame_bytes, int depth,
           double timeout_s, std::string me_name)
    : qp_(qp), me_(me), n_(n), frame_(frame_bytes), depth_(depth), timeout_s_(timeout_s),
      me_name_(std::move(me_name)), direct_(qp.sends_from_any_memory()), slots_(n), peers_(n) {
  const size_t slot = std::max(frame_, sizeof(Header));
  for (int p = 0; p < n; ++p) {
    if (p == me) continue;
    slots_[p] = qp_.allocate(2 * depth * slot);
    for (int s = 0; s < depth; ++s) {
      qp_.post_recv(p, slots_[p], s * slot, slot, post_id(p, true, s));
      peers_[p].free_send.push_back(depth + s);
    }
  }
}

Mesh::~Mesh() = default;

void Mesh::run(std::vector<Flow>& flows, bool ordered) { run_until(flows, ordered, Deadline{}); }

void Mesh::progress(Clock::duration wait) {
  std::vector<Flow> none;
  run_until(none, false, Clock::now() + wait);
}

void Mesh::flush() {
  while (!pending_.empty()) progress(std::chrono::milliseconds(20));
}

void Mesh::run_until(std::vector<Flow>& flows, bool ordered, Deadline idle_until) {
  const size_t slot = std::max(frame_, sizeof(Header));
  const auto stall = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  // Sends pending from earlier ops first: their messages lead on their queue pairs.
  std::vector<Flow*> F;
  std::vector<FlowState*> S;
  std::vector<std::pair<size_t, int>> before;  // (sent, in flight): what counts as moving
  for (auto& p : pending_) {
    F.push_back(&p->flow);
    S.push_back(&p->st);
    before.emplace_back(p->st.sent, p->st.in_flight);
  }
  const size_t first_new = F.size();
  std::vector<FlowState> st(flows.size());
  bool foreground = false;
  for (size_t i = 0; i < flows.size(); ++i) {
    start(st[i], flows[i], frame_);
    F.push_back(&flows[i]);
    S.push_back(&st[i]);
    foreground = foreground || !flows[i].background;
  }
  auto landed_all = [&](size_t i) { return S[i]->header_seen && S[i]->landed == S[i]->to_land; };
  // ordered: frame k of flow i waits for frame k of every earlier flow.
  auto may_land = [&](size_t i) {
    for (size_t j = 0; j < i; ++j)
      if (S[j]->landed <= S[i]->landed && !landed_all(j)) return false;
    return true;
  };
  std::vector<verbs::Completion> done;
  std::vector<int> waiting;
  Deadline deadline = Clock::now() + stall;
  bool waited = false;  // no foreground: polled once
  for (;;) {
    for (size_t i = 0; i < F.size(); ++i) {  // fill free send slots
      Flow& f = *F[i];
      FlowState& fs = *S[i];
      Peer& P = peers_[f.peer];
      while (fs.sent < fs.to_send && !P.free_send.empty()) {
        const int s = P.free_send.back();  // also bounds the sends in flight per peer
        char* dst = slots_[f.peer].data + s * slot;
        size_t len = sizeof(Header);
        if (fs.sent < fs.first_frame) {
          std::memcpy(dst, &f.header, sizeof(Header));
          qp_.post_send(f.peer, slots_[f.peer], s * slot, len, post_id(f.peer, false, s));
        } else {
          char* src;
          fs.out.next(frame_, &src, &len);
          // The transport copies anyway: no staging, unless the op may return first (the
          // transport would read the caller's buffer later).
          if (direct_ && !f.background) {
            qp_.post_send(f.peer, verbs::Buffer{src, len, 0}, 0, len, post_id(f.peer, false, s));
          } else {
            std::memcpy(dst, src, len);
            qp_.post_send(f.peer, slots_[f.peer], s * slot, len, post_id(f.peer, false, s));
          }
        }
        P.free_send.pop_back();
        P.owners.push_back(&fs);
        ++fs.in_flight;
        ++fs.sent;
      }
    }
    for (size_t i = 0; i < F.size(); ++i) {  // land what arrived
      Flow& f = *F[i];
      FlowState& fs = *S[i];
      Peer& P = peers_[f.peer];
      while (!P.arrived.empty() && !landed_all(i)) {
        auto [s, len] = P.arrived.front();
        const char* src = slots_[f.peer].data + s * slot;
        if (!fs.header_seen) {
          if (len != sizeof(Header))
            fail("expected the header of ", describe(f.header), " from ", qp_.describe_peer(f.peer),
                 " but got ", len, " bytes of payload (the ranks are out of step)");
          Header theirs;
          std::memcpy(&theirs, src, sizeof(Header));
          check_header(f.expects_other ? f.expected : f.header, theirs, me_name_,
                       qp_.describe_peer(f.peer));
          fs.header_seen = true;
        } else {
          if (ordered && !may_land(i)) break;
          char* dst;
          size_t want;
          fs.in.next(frame_, &dst, &want);
          if (len != want)
            fail(describe(f.header), ": ", qp_.describe_peer(f.peer), " sent a frame of ", len,
                 " bytes where ", want, " were expected");
          if (f.land) f.land(dst, src, len);
          else std::memcpy(dst, src, len);
          ++fs.landed;
          fs.in.settle();  // finished segments run their callbacks now
        }
        P.arrived.pop_front();
        qp_.post_recv(f.peer, slots_[f.peer], s * slot, slot, post_id(f.peer, true, s));
      }
    }
    // Peers we still need something from: messages not yet arrived, or room for our sends.
    // (A peer whose last messages have all arrived may leave: that is no failure.)
    waiting.clear();
    bool finished = true;
    for (size_t i = 0; i < F.size(); ++i) {
      const Peer& P = peers_[F[i]->peer];
      const size_t due = (S[i]->header_seen ? 0 : 1) + S[i]->to_land - S[i]->landed;
      const bool sends_left = !S[i]->sent_all();
      if (i >= first_new && !F[i]->background) finished = finished && due == 0 && !sends_left;
      if (due > P.arrived.size() || sends_left) waiting.push_back(F[i]->peer);
    }
    if (finished && (foreground || waited || waiting.empty())) break;
    if (waiting.empty()) continue;  // all of it arrived: the next pass lands it
    done.clear();
    if (!qp_.poll(done, foreground ? deadline : idle_until, waiting)) {
      if (!foreground) {
        waited = true;
        continue;
      }
      std::string who;
      for (int p : waiting) who += (who.empty() ? "" : ", ") + qp_.describe_peer(p);
      fail("timed out after ", timeout_s_, " s (MLXDIST_TIMEOUT) waiting for ", who);
    }
    for (const auto& c : done) {
      Peer& P = peers_[c.peer];
      if (c.is_recv) {
        P.arrived.emplace_back(id_slot(c.id), c.len);
      } else {
        P.free_send.push_back(id_slot(c.id));
        --P.owners.front()->in_flight;
        P.owners.pop_front();
      }
    }
    deadline = Clock::now() + stall;  // the timeout bounds a stall, not the whole op
    if (!foreground) waited = true;
  }
  // Pending sends that moved restart their stall clock; finished ones leave.
  const auto now = Clock::now();
  for (size_t i = 0; i < first_new; ++i)
    if (before[i] != std::make_pair(S[i]->sent, S[i]->in_flight)) pending_[i]->moved = now;
  // This run's background sends not yet delivered are kept, with copies of what is unsent.
  for (size_t i = 0; i < flows.size(); ++i) {
    if (!flows[i].background || st[i].sent_all()) continue;
    auto p = std::make_unique<Pending>();
    p->flow = std::move(flows[i]);
    p->st = st[i];
    p->st.out.segments = &p->flow.send;
    p->st.in.segments = &p->flow.recv;
    for (size_t k = p->st.out.seg; k < p->flow.send.size(); ++k) {
      Segment& seg = p->flow.send[k];
      const char* from = static_cast<const char*>(seg.data);
      p->copies.emplace_back(from, from + seg.len);
      seg.data = p->copies.back().data();
    }
    for (auto& P : peers_)
      for (auto& owner : P.owners)
        if (owner == &st[i]) owner = &p->st;
    p->moved = now;
    pending_.push_back(std::move(p));
  }
  for (size_t i = pending_.size(); i-- > 0;)
    if (pending_[i]->st.sent_all()) pending_.erase(pending_.begin() + std::ptrdiff_t(i));
  for (const auto& p : pending_)
    if (now - p->moved > stall)
      fail("timed out after ", timeout_s_, " s (MLXDIST_TIMEOUT) sending to ",
           qp_.describe_peer(p->flow.peer), ": it did not receive (no matching recv)");
}

namespace {

std::vector<size_t> block_offsets(size_t count, int n) {
  std::vector<size_t> off(n + 1, 0);
  for (int i = 0; i < n; ++i) off[i + 1] = off[i] + count / n + (size_t(i) < count % n ? 1 : 0);
  return off;
}

Flow flow_with(int peer, const Header& h) {
  Flow f;
  f.peer = peer;
  f.header = h;
  return f;
}

// Flows to every peer in rank order.
std::vector<Flow> to_everyone(const Mesh& m, const Header& h) {
  std::vector<Flow> flows;
  for (int p = 0; p < m.size(); ++p)
    if (p != m.rank()) flows.push_back(flow_with(p, h));
  return flows;
}

// out's block `mine` becomes the reduction over ranks of in's (in: own input, rank order of
// peers after it), peers sending their copies of that block.
void reduce_blocks(Mesh& m, const Header& h, const char* in, char* out, const std::vector<size_t>& off,
                   size_t es, DType t, ReduceOp op, size_t in_stride_blocks) {
  const int me = m.rank();
  auto flows = to_everyone(m, h);
  char* mine = out + (in_stride_blocks ? 0 : off[me] * es);
  const char* own = in + off[me] * es;
  bool first = true;
  for (Flow& f : flows) {
    f.send = {Segment{const_cast<char*>(in) + off[f.peer] * es, (off[f.peer + 1] - off[f.peer]) * es}};
    f.recv = {Segment{mine, (off[me + 1] - off[me]) * es}};
    if (first)
      f.land = [=](char* dst, const char* src, size_t len) {
        reduce_to(dst, own + (dst - mine), src, len / es, t, op);
      };
    else
      f.land = [=](char* dst, const char* src, size_t len) { reduce_into(dst, src, len / es, t, op); };
    first = false;
  }
  m.run(flows, true);
}

}  // namespace

void all_reduce(Mesh& m, const Header& h, const char* in, char* out, size_t count, DType t,
                ReduceOp op) {
  const int n = m.size(), me = m.rank();
  const size_t es = dtype_size(t), bytes = count * es;
  if (bytes <= m.small_bytes) {
    // Everyone gets everything and reduces it in rank order: one round, the same bits.
    std::vector<char> all(n * bytes);
    std::memcpy(all.data() + me * bytes, in, bytes);
    auto flows = to_everyone(m, h);
    for (Flow& f : flows) {
      f.send = {Segment{const_cast<char*>(in), bytes}};
      f.recv = {Segment{all.data() + f.peer * bytes, bytes}};
    }
    m.run(flows, false);
    reduce_blocks(out, all.data(), n, count, t, op, false);  // halves arrive widened
    return;
  }
  const auto off = block_offsets(count, n);
  reduce_blocks(m, h, in, out, off, es, t, op, 0);
  auto flows = to_everyone(m, h);
  for (Flow& f : flows) {
    f.send = {Segment{out + off[me] * es, (off[me + 1] - off[me]) * es}};
    f.recv = {Segment{out + off[f.peer] * es, (off[f.peer + 1] - off[f.peer]) * es}};
  }
  m.run(flows, false);
}

void all_gather(Mesh& m, const Header& h, const char* in, char* out, size_t bytes) {
  if (bytes) std::memmove(out + m.rank() * bytes, in, bytes);
  auto flows = to_everyone(m, h);
  for (Flow& f : flows) {
    f.send = {Segment{out + m.rank() * bytes, bytes}};
    f.recv = {Segment{out + f.peer * bytes, bytes}};
  }
  m.run(flows, false);
}

void reduce_scatter(Mesh& m, const Header& h, const char* in, char* out, size_t count, DType t,
                    ReduceOp op) {
  std::vector<size_t> off(m.size() + 1);
  for (int i = 0; i <= m.size(); ++i) off[i] = i * count;
  reduce_blocks(m, h, in, out, off, dtype_size(t), t, op, 1);
}

void send(Mesh& m, const Header& h, const char* in, size_t bytes, int dst) {
  std::vector<Flow> flows{flow_with(dst, h)};
  flows[0].send = {Segment{const_cast<char*>(in), bytes}};
  flows[0].receives = false;
  flows[0].background = true;  // returns once its messages are posted or copied
  m.run(flows, false);
}

void sendrecv(Mesh& m, const Header& send_h, const char* in, size_t send_bytes, int dst,
              const Header& recv_h, char* out, size_t recv_bytes, int src) {
  std::vector<Flow> flows{flow_with(dst, send_h), flow_with(src, recv_h)};
  flows[0].send = {Segment{const_cast<char*>(in), send_bytes}};
  flows[0].receives = false;
  flows[1].recv = {Segment{out, recv_bytes}};
  flows[1].sends = false;
  m.run(flows, false);
}

void star(Mesh& m, const Header& h, int root, const std::vector<std::pair<const void*, size_t>>& to,
          const std::vector<std::pair<void*, size_t>>& from) {
  std::vector<Flow> flows;
  for (int p = 0; p < m.size(); ++p) {
    if (p == m.rank() || (m.rank() != root && p != root)) continue;
    flows.push_back(flow_with(p, h));
    flows.back().send = {Segment{const_cast<void*>(to[p].first), to[p].second}};
    flows.back().recv = {Segment{from[p].first, from[p].second}};
  }
  m.run(flows, false);
}

void all_to_all(Mesh& m, const Header& h, const char* in, const std::vector<size_t>& send_at,
                char* out, const std::vector<size_t>& recv_at) {
  auto flows = to_everyone(m, h);
  for (Flow& f : flows) {
    const size_t out_bytes = send_at[f.peer + 1] - send_at[f.peer];
    const size_t in_bytes = recv_at[f.peer + 1] - recv_at[f.peer];
    f.header.nbytes = out_bytes;
    f.expects_other = true;
    f.expected = h;
    f.expected.nbytes = in_bytes;
    f.send = {Segment{const_cast<char*>(in) + send_at[f.peer], out_bytes}};
    f.recv = {Segment{out + recv_at[f.peer], in_bytes}};
  }
  m.run(flows, false);
}

void recv(Mesh& m, const Header& h, char* out, size_t bytes, int src) {
  std::vector<Flow> flows{flow_with(src, h)};
  flows[0].recv = {Segment{out, bytes}};
  flows[0].sends = false;
  m.run(flows, false);
}

}  // namespace mlxdist::jaccl
