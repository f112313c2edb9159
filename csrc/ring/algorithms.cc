#include "ring/algorithms.h"

#include <algorithm>
#include <cstring>

namespace mlxdist::ring {
namespace {

int mod(int a, int n) { return ((a % n) + n) % n; }

// Payload bytes per frame, a whole number of elements so chunks can be reduced as they land.
size_t frame_bytes(const Context& ctx, size_t esize) {
  return std::max<size_t>(1, ctx.chunk_bytes / esize) * esize;
}

// h: the header each frame carries (default: the op's).
void add_send(std::vector<Transfer>& ts, Context& ctx, int peer, int link, const char* data,
              size_t bytes, size_t chunk, const Header* h = nullptr) {
  if (!h) h = &ctx.header;
  Transfer t{peer, link, true, {}};
  size_t frames = bytes == 0 ? 1 : (bytes + chunk - 1) / chunk;  // empty ops still send a header
  for (size_t f = 0; f < frames; ++f) {
    size_t off = f * chunk;
    t.segments.push_back(Segment{const_cast<Header*>(h), sizeof(Header), nullptr});
    t.segments.push_back(Segment{const_cast<char*>(data) + off, std::min(chunk, bytes - off), nullptr});
  }
  ts.push_back(std::move(t));
}

using OnChunk = std::function<void(char* data, size_t len)>;

// hdr receives each frame's header; it is checked against `expect` (default: the op's)
// before the payload is read.
void add_recv(std::vector<Transfer>& ts, Context& ctx, int peer, int link, char* dst, size_t bytes,
              size_t chunk, Header* hdr, const OnChunk& on_chunk, const Header* expect = nullptr) {
  if (!expect) expect = &ctx.header;
  Transfer t{peer, link, false, {}};
  std::string peer_name = ctx.links.describe_peer(peer);
  auto check = [&ctx, hdr, expect, peer_name] { check_header(*expect, *hdr, ctx.me, peer_name); };
  size_t frames = bytes == 0 ? 1 : (bytes + chunk - 1) / chunk;
  for (size_t f = 0; f < frames; ++f) {
    size_t off = f * chunk, len = std::min(chunk, bytes - off);
    t.segments.push_back(Segment{hdr, sizeof(Header), check});
    std::function<void()> done;
    if (on_chunk) done = [on_chunk, p = dst + off, len] { on_chunk(p, len); };
    t.segments.push_back(Segment{dst + off, len, std::move(done)});
  }
  ts.push_back(std::move(t));
}

// One ring step. The timeout bounds a stall, not the whole op: each step gets a fresh
// window, or a long op whose earlier steps used up the first one would fail a step that
// merely had nothing to read at its first poll.
void run_step(Context& ctx, std::vector<Transfer>& ts) {
  ctx.deadline = std::max(ctx.deadline, Clock::now() + ctx.stall);
  ctx.links.run(ts, ctx.deadline);
}

}  // namespace

Layout Layout::split_halves(size_t count, int nblocks) {
  Layout l;
  size_t first = (count + 1) / 2;
  for (int d = 0; d < 2; ++d) {
    size_t base = d == 0 ? 0 : first, len = d == 0 ? first : count - first;
    for (int i = 0; i < nblocks; ++i) {
      size_t c = len / nblocks + (size_t(i) < len % nblocks ? 1 : 0);
      l.off[d].push_back(base);
      l.cnt[d].push_back(c);
      base += c;
    }
  }
  return l;
}

Layout Layout::blocks_of(size_t block_count, int nblocks) {
  Layout l;
  size_t first = (block_count + 1) / 2;
  for (int i = 0; i < nblocks; ++i) {
    l.off[0].push_back(i * block_count);
    l.cnt[0].push_back(first);
    l.off[1].push_back(i * block_count + first);
    l.cnt[1].push_back(block_count - first);
  }
  return l;
}

// Direction d sends to rank + sign and receives from rank - sign. At step s it passes on the
// partial sum of block rank - sign*(s+1) (from in at the first step, from out later) and
// folds block rank - sign*(s+2) of in into the partial sum it receives, writing out; after
// size-1 steps out holds the full reduction of this rank's own block. Where the transport
// can combine, the fold reads its buffer directly; otherwise chunks land in scratch first.
void reduce_scatter(Context& ctx, const char* in, char* out, DType wire, ReduceOp op,
                    const Layout& layout, std::vector<char>& scratch) {
  const int n = ctx.size, r = ctx.rank;
  const size_t es = dtype_size(wire), chunk = frame_bytes(ctx, es);
  const bool direct = ctx.links.can_combine();
  size_t region = 0;
  for (int d = 0; d < 2; ++d)
    for (size_t c : layout.cnt[d]) region = std::max(region, c * es);
  if (!direct && scratch.size() < 2 * region) scratch.resize(2 * region);
  Header hdr[2];
  std::vector<Transfer> ts;
  for (int s = 0; s + 1 < n; ++s) {
    ts.clear();
    for (int d = 0; d < 2; ++d) {
      const int sign = d == 0 ? 1 : -1;
      const int sb = mod(r - sign * (s + 1), n), rb = mod(r - sign * (s + 2), n);
      add_send(ts, ctx, mod(r + sign, n), d, (s == 0 ? in : out) + layout.off[d][sb] * es,
               layout.cnt[d][sb] * es, chunk);
      const size_t at = layout.off[d][rb] * es, bytes = layout.cnt[d][rb] * es;
      char* dst = out + at;
      const char* own = in + at;
      if (direct) {
        add_recv(ts, ctx, mod(r - sign, n), d, dst, bytes, chunk, &hdr[d], nullptr);
        for (auto& seg : ts.back().segments) {
          if (seg.data == &hdr[d]) continue;
          seg.grain = es;
          seg.combine = [=](char* p, const char* src, size_t len) {
            reduce_to(p, own + (p - dst), src, len / es, wire, op);
          };
        }
      } else {
        char* landing = scratch.data() + d * region;
        add_recv(ts, ctx, mod(r - sign, n), d, landing, bytes, chunk, &hdr[d],
                 [=](char* p, size_t len) {
                   reduce_to(dst + (p - landing), own + (p - landing), p, len / es, wire, op);
                 });
      }
    }
    run_step(ctx, ts);
  }
}

// Direction d forwards block rank - sign*s and receives block rank - sign*(s+1).
void all_gather(Context& ctx, char* buf, size_t es, const Layout& layout) {
  const int n = ctx.size, r = ctx.rank;
  const size_t chunk = frame_bytes(ctx, es);
  Header hdr[2];
  std::vector<Transfer> ts;
  for (int s = 0; s + 1 < n; ++s) {
    ts.clear();
    for (int d = 0; d < 2; ++d) {
      const int sign = d == 0 ? 1 : -1;
      const int sb = mod(r - sign * s, n), rb = mod(r - sign * (s + 1), n);
      add_send(ts, ctx, mod(r + sign, n), d, buf + layout.off[d][sb] * es, layout.cnt[d][sb] * es, chunk);
      add_recv(ts, ctx, mod(r - sign, n), d, buf + layout.off[d][rb] * es, layout.cnt[d][rb] * es,
               chunk, &hdr[d], nullptr);
    }
    run_step(ctx, ts);
  }
}

void send(Context& ctx, const void* buf, size_t bytes, int dst) {
  std::vector<Transfer> ts;
  add_send(ts, ctx, dst, 0, static_cast<const char*>(buf), bytes, std::max<size_t>(bytes, 1));
  ts.back().background = true;  // what the transport cannot take now moves on after the op
  ctx.links.run(ts, Clock::now());
}

void sendrecv(Context& ctx, const Header& send_h, const void* in, size_t send_bytes, int dst,
              const Header& recv_h, void* out, size_t recv_bytes, int src) {
  std::vector<Transfer> ts;
  Header hdr;
  add_send(ts, ctx, dst, 0, static_cast<const char*>(in), send_bytes,
           std::max<size_t>(send_bytes, 1), &send_h);
  add_recv(ts, ctx, src, 0, static_cast<char*>(out), recv_bytes, std::max<size_t>(recv_bytes, 1),
           &hdr, nullptr, &recv_h);
  run_step(ctx, ts);
}

void star(Context& ctx, int root, const std::vector<std::pair<const void*, size_t>>& to,
          const std::vector<std::pair<void*, size_t>>& from) {
  const int n = ctx.size, me = ctx.rank;
  std::vector<Header> got(n);
  std::vector<Transfer> ts;
  for (int p = 0; p < n; ++p) {
    if (p == me || (me != root && p != root)) continue;
    add_send(ts, ctx, p, 0, static_cast<const char*>(to[p].first), to[p].second,
             std::max<size_t>(to[p].second, 1));
    add_recv(ts, ctx, p, 0, static_cast<char*>(from[p].first), from[p].second,
             std::max<size_t>(from[p].second, 1), &got[p], nullptr);
  }
  run_step(ctx, ts);
}

void all_to_all(Context& ctx, const char* in, const std::vector<size_t>& send_at, char* out,
                const std::vector<size_t>& recv_at) {
  const int n = ctx.size, me = ctx.rank;
  // Each pair's header carries the bytes of its own message, so uneven splits that do not
  // match what the peer expects fail on both sides, naming both calls.
  std::vector<Header> sent(n, ctx.header), expected(n, ctx.header), got(n);
  std::vector<Transfer> ts;
  for (int k = 1; k < n; ++k) {  // every pair at once: each has its own connection
    const int to = (me + k) % n, from = (me - k + n) % n;
    const size_t out_bytes = send_at[to + 1] - send_at[to], in_bytes = recv_at[from + 1] - recv_at[from];
    sent[to].nbytes = out_bytes;
    expected[from].nbytes = in_bytes;
    add_send(ts, ctx, to, 0, in + send_at[to], out_bytes, std::max<size_t>(out_bytes, 1), &sent[to]);
    add_recv(ts, ctx, from, 0, out + recv_at[from], in_bytes, std::max<size_t>(in_bytes, 1),
             &got[from], nullptr, &expected[from]);
  }
  run_step(ctx, ts);
}

void recv(Context& ctx, void* buf, size_t bytes, int src) {
  std::vector<Transfer> ts;
  Header hdr;
  add_recv(ts, ctx, src, 0, static_cast<char*>(buf), bytes, std::max<size_t>(bytes, 1), &hdr, nullptr);
  run_step(ctx, ts);
}

}  // namespace mlxdist::ring
