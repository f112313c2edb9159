#include "transport/shm_verbs.h"

#include <unistd.h>

#include <cstring>

#include "core/error.h"

namespace mlxdist::shm {
namespace {

constexpr size_t kQueue = 64;          // receives a rank may have posted per peer
constexpr uint64_t kTooLong = ~0ull;   // a receive's result when the message did not fit
constexpr size_t kPage = 4096;

struct Slot {
  uint64_t offset;                // in the owner's segment
  uint64_t len;                   // room
  std::atomic<uint64_t> result;   // bytes placed by the sender, or kTooLong
};

// Receives the owner posted for one peer: the owner writes slots then bumps posted; the peer
// fills them in order and bumps filled.
struct RecvQueue {
  alignas(128) std::atomic<uint64_t> posted;
  alignas(128) std::atomic<uint64_t> filled;
  Slot slots[kQueue];
};

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

}  // namespace

struct ShmQueuePairs::Postings {
  Doorbell bell;
  Farewell farewell;
  RecvQueue queue[1];  // one per rank (the owner's own is unused); the arena follows
};

namespace {

size_t arena_offset(int n) {
  return round_up(sizeof(Doorbell) + sizeof(Farewell) + n * sizeof(RecvQueue), kPage);
}

}  // namespace

ShmQueuePairs::ShmQueuePairs(int me, int n, size_t arena_bytes, const AllGather& exchange,
                             PeerNames names, LostPeers lost)
    : names_(std::move(names)), lost_(std::move(lost)), me_(me), n_(n), arena_bytes_(round_up(arena_bytes, kPage)),
      sends_(n), recv_ids_(n) {
  auto shared = share_segments(me, n, arena_offset(n) + arena_bytes_, exchange,
                               [this](int p) { return describe_peer(p); });
  if (!shared.why.empty()) fail("shared memory is not usable: ", shared.why);
  segments_ = std::move(shared.segments);
}

ShmQueuePairs::~ShmQueuePairs() { close(); }

void ShmQueuePairs::close() {}  // the segments stay mapped until destruction: peers may still read

void ShmQueuePairs::abort(const std::string& why) {
  postings(me_)->farewell.say(why.empty() ? "it left during an op" : why);
  for (int p = 0; p < n_; ++p)
    if (p != me_) ring_bell(p);  // a peer asleep waiting for us wakes and reads it
}

void ShmQueuePairs::check_farewell(int peer) const {
  std::string why = postings(peer)->farewell.heard();
  if (!why.empty()) fail(describe_peer(peer), " left the group after an error: ", why);
}

ShmQueuePairs::Postings* ShmQueuePairs::postings(int owner) const {
  return reinterpret_cast<Postings*>(segments_[owner]->base());
}

void ShmQueuePairs::ring_bell(int owner) const { postings(owner)->bell.ring(); }

verbs::Buffer ShmQueuePairs::allocate(size_t bytes) {
  bytes = round_up(bytes, 64);
  if (arena_used_ + bytes > arena_bytes_)
    fail("internal: registered memory exhausted (", arena_used_, " + ", bytes, " > ", arena_bytes_, ")");
  const size_t off = arena_offset(n_) + arena_used_;
  arena_used_ += bytes;
  return verbs::Buffer{segments_[me_]->base() + off, bytes, off};
}

void ShmQueuePairs::post_recv(int peer, const verbs::Buffer& buf, size_t off, size_t len,
                              uint64_t id) {
  RecvQueue& q = postings(me_)->queue[peer];
  const uint64_t posted = q.posted.load(std::memory_order_relaxed);
  if (posted - q.filled.load(std::memory_order_acquire) >= kQueue)
    fail("internal: more than ", kQueue, " receives posted for ", describe_peer(peer));
  Slot& s = q.slots[posted % kQueue];
  s.offset = buf.key + off;
  s.len = len;
  s.result.store(0, std::memory_order_relaxed);
  q.posted.store(posted + 1, std::memory_order_release);
  recv_ids_[peer].push_back(id);
  ring_bell(peer);  // it may be waiting to send
}

void ShmQueuePairs::post_send(int peer, const verbs::Buffer& buf, size_t off, size_t len,
                              uint64_t id) {
  sends_[peer].push_back(PendingSend{buf.data + off, len, id});
}

bool ShmQueuePairs::progress(std::vector<verbs::Completion>& done) {
  bool any = false;
  for (int p = 0; p < n_; ++p) {
    if (p == me_) continue;
    // Our sends to p land in the receives p posted for us.
    RecvQueue& theirs = postings(p)->queue[me_];
    while (!sends_[p].empty()) {
      const uint64_t filled = theirs.filled.load(std::memory_order_relaxed);
      if (filled == theirs.posted.load(std::memory_order_acquire)) break;
      Slot& s = theirs.slots[filled % kQueue];
      PendingSend snd = sends_[p].front();
      sends_[p].pop_front();
      const bool fits = snd.len <= s.len;
      if (fits) std::memcpy(segments_[p]->base() + s.offset, snd.data, snd.len);
      s.result.store(fits ? snd.len : kTooLong, std::memory_order_relaxed);
      theirs.filled.store(filled + 1, std::memory_order_release);
      ring_bell(p);
      if (!fits)
        fail("a message of ", snd.len, " bytes to ", describe_peer(p),
             " is longer than the receive it posted (", s.len, " bytes)");
      check_farewell(p);  // placed in a receive it posted, but it abandoned the call
      done.push_back(verbs::Completion{snd.id, p, false, snd.len});
      any = true;
    }
    // Receives p filled for us, in the order we posted them.
    RecvQueue& ours = postings(me_)->queue[p];
    const uint64_t filled = ours.filled.load(std::memory_order_acquire);
    const uint64_t posted = ours.posted.load(std::memory_order_relaxed);
    uint64_t first = posted - recv_ids_[p].size();  // oldest not yet completed
    if (first < filled) check_farewell(p);  // it placed them, but then abandoned the call
    for (; first < filled; ++first) {
      const uint64_t got = ours.slots[first % kQueue].result.load(std::memory_order_relaxed);
      if (got == kTooLong)
        fail(describe_peer(p), " sent a message longer than the receive posted for it");
      done.push_back(verbs::Completion{recv_ids_[p].front(), p, true, size_t(got)});
      recv_ids_[p].pop_front();
      any = true;
    }
  }
  return any;
}

bool ShmQueuePairs::poll(std::vector<verbs::Completion>& done, Deadline deadline,
                         const std::vector<int>& waiting_on) {
  Doorbell& bell = postings(me_)->bell;
  const auto start = Clock::now();
  bool rechecked = false;
  for (;;) {
    const uint32_t seen = bell.seen();
    if (progress(done)) return true;
    const auto now = Clock::now();
    if (now - start < kSpin && now < deadline) {
      cpu_relax();
      continue;
    }
    for (int p : waiting_on) check_farewell(p);
    std::string lost = lost_(waiting_on);
    if (!lost.empty()) {
      // A peer may place its last message and exit between our look and this check.
      if (!rechecked) {
        rechecked = true;
        continue;
      }
      fail(lost, " closed the connection");
    }
    if (now >= deadline) return false;
    bell.wait(seen, std::min<Clock::duration>(kNap, deadline - now));
  }
}

}  // namespace mlxdist::shm
