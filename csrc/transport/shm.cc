#include "transport/shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <thread>

#include "core/error.h"
#include "bootstrap/auth.h"

namespace mlxdist::shm {
namespace {

constexpr size_t kAlign = 128;  // keeps hot counters on their own lines

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, timeout, nullptr, 0);
}

// Every segment starts 8-aligned in the ring (both sides skip the same padding), so elements
// of up to 8 bytes never straddle the ring's end and can be combined in place.
inline uint64_t aligned(uint64_t pos) { return (pos + 7) & ~uint64_t(7); }

}  // namespace

void Doorbell::ring() {
  count.fetch_add(1, std::memory_order_acq_rel);
  if (sleepers.load(std::memory_order_acquire) > 0) futex(&count, FUTEX_WAKE, INT32_MAX, nullptr);
}

void Doorbell::wait(uint32_t seen, Clock::duration nap) {
  timespec ts{time_t(nap / std::chrono::seconds(1)),
              long((nap % std::chrono::seconds(1)) / std::chrono::nanoseconds(1))};
  sleepers.fetch_add(1, std::memory_order_acq_rel);
  futex(&count, FUTEX_WAIT, seen, &ts);
  sleepers.fetch_sub(1, std::memory_order_acq_rel);
}

void Farewell::say(const std::string& why) {
  if (said.load(std::memory_order_acquire)) return;
  len = uint32_t(std::min(why.size(), sizeof(text)));
  std::memcpy(text, why.data(), len);
  said.store(1, std::memory_order_release);
}

std::string Farewell::heard() const {
  if (!said.load(std::memory_order_acquire)) return "";
  return std::string(text, std::min<size_t>(len, sizeof(text)));
}

// Shared layout, identical in every process of the group: doorbell, farewell, rings.
static_assert(sizeof(Doorbell) == 2 * kAlign, "the doorbell heads every segment");
static_assert(sizeof(Farewell) % kAlign == 0, "the rings stay aligned");
constexpr size_t kRingsAt = sizeof(Doorbell) + sizeof(Farewell);
struct ShmLinks::RingHeader {
  alignas(kAlign) std::atomic<uint64_t> head;   // bytes ever written (producer only)
  alignas(kAlign) std::atomic<uint64_t> tail;   // bytes ever read (consumer only)
  alignas(kAlign) std::atomic<uint64_t> acked;  // direct reads done (consumer only)
};

namespace {

// In the ring in place of a large segment's bytes: where the sender holds them.
struct Descriptor {
  uint64_t magic;
  uint64_t address;
  uint64_t len;
};
constexpr uint64_t kDirectMagic = 0x6469726563746d6cull;

}  // namespace
static_assert(sizeof(std::atomic<uint64_t>) == 8 && std::atomic<uint64_t>::is_always_lock_free,
              "shared counters must be lock-free");

std::string host_identity() {
  std::string boot;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return boot + "/" + host;
}

bool all_on_this_host(const AllGather& exchange) {
  const std::string mine = host_identity();
  for (const auto& h : exchange(mine))
    if (h != mine) return false;
  return true;
}

SharedSegments share_segments(int me, int n, size_t bytes, const AllGather& exchange,
                              const PeerNames& names) {
  SharedSegments out;
  out.segments.resize(n);
  // What a peer reads to learn whether it can read this process's memory directly.
  static const uint64_t probe = 0x70726f6265ull;
  std::string mine;
  try {
    out.segments[me] = Mapping::create(bytes);
    mine = "ok\n" + host_identity() + "\n" + out.segments[me]->name() + "\n" +
           std::to_string(getpid()) + " " + std::to_string(reinterpret_cast<uintptr_t>(&probe));
  } catch (const DistError& e) {
    out.why = e.what();
    mine = "no\n" + out.why;
  }
  // Round 1: every member's host, segment and process; each pair decides from both records.
  auto all = exchange(mine);
  const std::string host = host_identity();
  bool readable = true;  // every peer's memory, through process_vm_readv
  out.pids.assign(n, 0);
  out.pids[me] = getpid();
  for (int p = 0; p < n && out.why.empty(); ++p) {
    if (p == me) continue;
    const std::string& rec = all[p];
    if (rec.rfind("ok\n", 0) != 0) {
      out.why = names(p) + " has no shared memory: " + rec.substr(3);
      break;
    }
    const size_t nl = rec.find('\n', 3), nl2 = rec.find('\n', nl + 1);
    if (rec.substr(3, nl - 3) != host) {
      out.why = names(p) + " runs on another host";
      break;
    }
    try {
      out.segments[p] = Mapping::open(rec.substr(nl + 1, nl2 - nl - 1), bytes);
    } catch (const DistError& e) {
      out.why = e.what();
    }
    char* rest = nullptr;
    out.pids[p] = int(std::strtol(rec.c_str() + nl2 + 1, &rest, 10));
    const uintptr_t where = std::strtoull(rest, nullptr, 10);
    uint64_t seen = 0;
    iovec local{&seen, sizeof(seen)}, remote{reinterpret_cast<void*>(where), sizeof(seen)};
    readable = readable && process_vm_readv(out.pids[p], &local, 1, &remote, 1, 0) == 8 &&
               seen == probe;
  }
  // Round 2: shared memory only if every pair could; one copy only if every pair can.
  auto oks = exchange(!out.why.empty() ? out.why : readable ? "ok" : "ok, copying");
  if (out.segments[me]) out.segments[me]->unlink();  // nothing stays behind in /dev/shm
  out.direct = true;
  for (int p = 0; p < n && out.why.empty(); ++p) {
    if (oks[p] != "ok" && oks[p] != "ok, copying") out.why = names(p) + ": " + oks[p];
    out.direct = out.direct && oks[p] == "ok";
  }
  if (!out.why.empty()) out.segments.clear();
  return out;
}

size_t Mapping::bytes_for(int peers, int links, size_t ring_bytes) {
  return kRingsAt + size_t(peers) * links * (sizeof(ShmLinks::RingHeader) + ring_bytes);
}

std::unique_ptr<Mapping> Mapping::create(size_t bytes) {
  auto nonce = auth::random_nonce();
  char name[64];
  snprintf(name, sizeof(name), "/mlxdist-%d-%02x%02x%02x%02x%02x%02x", int(getpid()), nonce[0],
           nonce[1], nonce[2], nonce[3], nonce[4], nonce[5]);
  int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) fail("shm_open(", name, "): ", std::strerror(errno));
  // Reserve the memory now: a full /dev/shm must fail here, not as SIGBUS on first touch.
  int rc = posix_fallocate(fd, 0, off_t(bytes));
  void* p = rc == 0 ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  ::close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name);
    fail("cannot allocate ", bytes, " bytes of shared memory: ", std::strerror(rc ? rc : errno));
  }
  return std::unique_ptr<Mapping>(new Mapping(name, static_cast<char*>(p), bytes, true));
}

std::unique_ptr<Mapping> Mapping::open(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) fail("shm_open(", name, "): ", std::strerror(errno));
  struct stat st {};
  void* p = (fstat(fd, &st) == 0 && size_t(st.st_size) == bytes)
                ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                : MAP_FAILED;
  ::close(fd);
  if (p == MAP_FAILED) fail("cannot map the shared segment ", name);
  return std::unique_ptr<Mapping>(new Mapping(name, static_cast<char*>(p), bytes, false));
}

void Mapping::unlink() {
  if (owner_ && linked_) shm_unlink(name_.c_str());
  linked_ = false;
}

Mapping::~Mapping() {
  unlink();
  munmap(base_, bytes_);
}

ShmLinks::ShmLinks(std::unique_ptr<tcp::TcpLinks> tcp, int me, SharedSegments shared, int links,
                   size_t ring_bytes, double timeout_s)
    : tcp_(std::move(tcp)), me_(me), n_(int(shared.segments.size())),
      segments_(std::move(shared.segments)), links_(links), ring_bytes_(ring_bytes),
      timeout_s_(timeout_s), direct_(shared.direct), pids_(std::move(shared.pids)),
      posted_(size_t(n_) * links), acks_seen_(size_t(n_) * links),
      // The host's cores shared by its ranks (all of them are here: shared memory).
      threads_(std::max(1, std::min(8, int(std::thread::hardware_concurrency()) / std::max(n_, 1)))) {
  if (ring_bytes_ % 8 != 0) fail("internal: shared ring size ", ring_bytes_, " is not a multiple of 8");
}

Doorbell* ShmLinks::mailbox(int owner) const {
  return reinterpret_cast<Doorbell*>(segments_[owner]->base());
}

ShmLinks::RingHeader* ShmLinks::ring(int owner, int from, int link) const {
  size_t slot = size_t(from) * links_ + size_t(link);
  char* p = segments_[owner]->base() + kRingsAt + slot * (sizeof(RingHeader) + ring_bytes_);
  return reinterpret_cast<RingHeader*>(p);
}

Farewell* ShmLinks::farewell(int owner) const {
  return reinterpret_cast<Farewell*>(segments_[owner]->base() + sizeof(Doorbell));
}

void ShmLinks::check_farewell(int peer) const {
  if (!farewell(peer)->said.load(std::memory_order_acquire)) return;  // the common case
  fail(describe_peer(peer), " left the group after an error: ", farewell(peer)->heard());
}

void ShmLinks::close() {
  tcp_->close();  // peers notice at their next liveness check
}

void ShmLinks::reset(const std::string& why) {
  farewell(me_)->say(why.empty() ? "it left during an op" : why);
  for (int p = 0; p < n_; ++p)
    if (p != me_) mailbox(p)->ring();  // a peer asleep waiting for us wakes and reads it
  tcp_->reset(why);
}

// Both halves copy across the ring's end where they meet it.
static void ring_copy_in(char* data, size_t ring_bytes, uint64_t pos, const void* from, size_t n) {
  const size_t at = pos % ring_bytes, first = std::min(n, ring_bytes - at);
  std::memcpy(data + at, from, first);
  std::memcpy(data, static_cast<const char*>(from) + first, n - first);
}
static void ring_copy_out(const char* data, size_t ring_bytes, uint64_t pos, void* to, size_t n) {
  const size_t at = pos % ring_bytes, first = std::min(n, ring_bytes - at);
  std::memcpy(to, data + at, first);
  std::memcpy(static_cast<char*>(to) + first, data, n - first);
}

bool ShmLinks::direct_send(Cursor& c, int peer, int link) {
  const size_t slot = size_t(peer) * links_ + size_t(link);
  RingHeader* r = ring(peer, me_, link);
  Segment& s = c.t->segments[c.t->seg];
  if (posted_[slot] > acks_seen_[slot]) {  // ours is out: done once the receiver acknowledged
    if (r->acked.load(std::memory_order_acquire) <= acks_seen_[slot]) return false;
    ++acks_seen_[slot];
    c.t->off = s.len;
    return true;
  }
  const uint64_t head = aligned(r->head.load(std::memory_order_relaxed));
  const uint64_t tail = r->tail.load(std::memory_order_acquire);
  const uint64_t used = head > tail ? head - tail : 0;
  if (ring_bytes_ - std::min<uint64_t>(used, ring_bytes_) < sizeof(Descriptor)) return false;
  const Descriptor d{kDirectMagic, reinterpret_cast<uintptr_t>(s.data), s.len};
  ring_copy_in(reinterpret_cast<char*>(r) + sizeof(RingHeader), ring_bytes_, head, &d, sizeof(d));
  r->head.store(head + sizeof(d), std::memory_order_release);
  ++posted_[slot];
  mailbox(peer)->ring();
  return true;
}

namespace {

// Reads len bytes at `from` in process pid into `to`; false (errno set) if the peer is gone.
bool read_from(int pid, char* to, uint64_t from, size_t len) {
  for (size_t got = 0; got < len;) {
    iovec local{to + got, len - got};
    iovec remote{reinterpret_cast<void*>(from + got), len - got};
    const ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n <= 0) return false;
    got += size_t(n);
  }
  return true;
}

// Large reads in pieces on several threads: one thread's copy is bounded by its core (pages
// pinned and copied one by one), and the host has cores to spare when few ranks share it.
constexpr size_t kPieceBytes = 4 << 20;

bool read_in_parallel(int pid, char* to, uint64_t from, size_t len, int threads) {
  const size_t k = std::min<size_t>(threads, len / kPieceBytes);
  if (k < 2) return read_from(pid, to, from, len);
  const size_t each = (len / k + 4095) & ~size_t(4095);
  std::vector<std::thread> helpers;
  std::atomic<bool> ok{true};
  std::atomic<int> error{0};
  for (size_t i = 1; i < k; ++i) {
    const size_t at = std::min(len, i * each), n = std::min(len, at + each) - at;
    helpers.emplace_back([&, at, n] {
      if (!read_from(pid, to + at, from + at, n)) {
        error = errno;
        ok = false;
      }
    });
  }
  if (!read_from(pid, to, from, std::min(len, each))) {
    error = errno;
    ok = false;
  }
  for (auto& t : helpers) t.join();
  errno = error;
  return ok;
}

}  // namespace

bool ShmLinks::direct_recv(Cursor& c, int peer, int link) {
  RingHeader* r = ring(me_, peer, link);
  Segment& s = c.t->segments[c.t->seg];
  const uint64_t tail = aligned(r->tail.load(std::memory_order_relaxed));
  const uint64_t head = r->head.load(std::memory_order_acquire);
  if (head < tail + sizeof(Descriptor)) return false;
  Descriptor d;
  ring_copy_out(reinterpret_cast<char*>(r) + sizeof(RingHeader), ring_bytes_, tail, &d, sizeof(d));
  if (d.magic != kDirectMagic || d.len != s.len)
    fail("expected ", s.len, " bytes from ", describe_peer(peer),
         " in one piece but the stream is out of step");
  check_farewell(peer);  // a peer that gave up may no longer hold the bytes
  // Straight from the sender's memory: into place, or through a landing buffer to combine.
  const size_t piece = s.combine ? kDirectBytes - kDirectBytes % s.grain : s.len;
  if (s.combine && landing_.size() < piece) landing_.resize(piece);
  for (size_t done = 0; done < s.len;) {
    const size_t want = std::min(piece, s.len - done);
    char* to = s.combine ? landing_.data() : static_cast<char*>(s.data) + done;
    if (!read_in_parallel(pids_[peer], to, d.address + done, want, s.combine ? 1 : threads_)) {
      check_farewell(peer);
      fail("cannot read from ", describe_peer(peer), ": ", std::strerror(errno),
           " (it left during the transfer)");
    }
    if (s.combine) s.combine(static_cast<char*>(s.data) + done, landing_.data(), want);
    done += want;
  }
  r->tail.store(tail + sizeof(d), std::memory_order_release);
  r->acked.store(r->acked.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  mailbox(peer)->ring();  // the sender waits for the acknowledgement
  c.t->off = s.len;
  return true;
}

void ShmLinks::run(std::vector<Transfer>& transfers, Deadline deadline) {
  // One FIFO per ring (peer, link, direction), as on TCP, so both sides agree on byte order.
  std::map<std::tuple<bool, int, int>, std::vector<Cursor>> queues;
  std::map<std::tuple<bool, int, int>, size_t> heads;
  for (auto& t : transfers) {
    if (t.peer < 0 || t.peer >= n_ || t.peer == me_) fail("internal: bad peer ", t.peer);
    queues[{!t.is_send, t.peer, t.link % links_}].push_back(Cursor{&t});
  }
  const auto stall = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  Doorbell* mine = mailbox(me_);
  auto idle_since = Clock::now();
  bool rechecked = false;  // looked at the rings again after seeing a peer gone
  const bool foreground = has_foreground(transfers);
  bool waited = false;  // background only: slept once on the doorbell
  for (;;) {
    const uint32_t bell = mine->seen();
    bool progressed = false, pending = false;
    std::string waiting;  // for the timeout message
    std::vector<int> waiting_on;
    for (auto& [key, q] : queues) {
      auto [is_recv, peer, link] = key;
      size_t& h = heads[key];
      while (h < q.size()) {
        Cursor& c = q[h];
        c.settle();
        if (c.done()) { ++h; continue; }
        mlxdist::Segment& s = c.t->segments[c.t->seg];
        if (direct_ && s.len >= kDirectBytes) {
          // A background send's memory is the caller's until the outbox keeps a copy: nothing
          // may point at it before then.
          const bool may = is_recv || !c.t->background || c.t->kept;
          if (may && (is_recv ? direct_recv(c, peer, link) : direct_send(c, peer, link))) {
            progressed = true;
            continue;
          }
          pending = true;
          waiting_on.push_back(peer);
          waiting += (waiting.empty() ? "" : ", ") +
                     std::string(is_recv ? "receiving from " : "sending to ") + describe_peer(peer);
          break;
        }
        char* p = static_cast<char*>(s.data) + c.t->off;
        size_t want = s.len - c.t->off;
        RingHeader* r = is_recv ? ring(me_, peer, link) : ring(peer, me_, link);
        char* data = reinterpret_cast<char*>(r) + sizeof(RingHeader);
        uint64_t head = r->head.load(std::memory_order_acquire);
        uint64_t tail = r->tail.load(std::memory_order_acquire);
        if (c.t->off == 0) (is_recv ? tail : head) = aligned(is_recv ? tail : head);
        const uint64_t used = head > tail ? head - tail : 0;  // head < tail: padding not yet written
        size_t n = is_recv ? std::min<uint64_t>(want, used)
                           : std::min<uint64_t>(want, ring_bytes_ - std::min<uint64_t>(used, ring_bytes_));
        if (is_recv && s.combine) n -= n % s.grain;
        if (n == 0) {
          pending = true;
          waiting_on.push_back(peer);
          waiting += (waiting.empty() ? "" : ", ") +
                     std::string(is_recv ? "receiving from " : "sending to ") + describe_peer(peer);
          break;
        }
        uint64_t pos = (is_recv ? tail : head) % ring_bytes_;
        size_t first = std::min<size_t>(n, ring_bytes_ - pos);
        if (is_recv) {
          if (s.combine) {
            // Whole elements only: one wider than the 8-byte alignment (complex128) may
            // straddle the ring's end, and is put together first.
            const size_t whole = first - first % s.grain, cut = first - whole;
            s.combine(p, data + pos, whole);
            size_t at = first;
            if (cut) {
              char element[64];
              ring_copy_out(data, ring_bytes_, pos + whole, element, s.grain);
              s.combine(p + whole, element, s.grain);
              at = whole + s.grain;
            }
            if (n > at) s.combine(p + at, data + (at - first), n - at);
          } else {
            ring_copy_out(data, ring_bytes_, pos, p, n);
          }
          r->tail.store(tail + n, std::memory_order_release);
          mailbox(peer)->ring();  // the sender may be waiting for space
        } else {
          ring_copy_in(data, ring_bytes_, pos, p, n);
          r->head.store(head + n, std::memory_order_release);
          mailbox(peer)->ring();  // the receiver may be waiting for data
        }
        c.t->off += n;
        progressed = true;
      }
    }
    if (!pending || (!foreground_left(transfers) && (foreground || progressed || waited))) {
      // What the peers left is used only if none of them abandoned this call.
      for (auto& [key, q] : queues) check_farewell(std::get<1>(key));
      return;
    }
    auto now = Clock::now();
    if (progressed) {
      rechecked = false;
      idle_since = now;
      deadline = std::max(deadline, now + stall);
      continue;
    }
    if (foreground && now - idle_since < kSpin) {
      cpu_relax();
      continue;
    }
    // Nothing moved for a while: sleep on our doorbell, waking to check peers are alive.
    for (int p : waiting_on) check_farewell(p);
    std::string lost = tcp_->lost_peers(waiting_on);  // only peers we wait for: others may be done
    if (!lost.empty()) {
      // A peer may write its last bytes and exit between our look at its ring and this check:
      // look once more before calling it lost.
      if (!rechecked) {
        rechecked = true;
        continue;
      }
      fail(lost, " closed the connection");
    }
    if (!foreground) {  // background only: one nap, bounded by the deadline
      if (now < deadline) mine->wait(bell, std::min<Clock::duration>(kNap, deadline - now));
      waited = true;
      continue;
    }
    if (now >= deadline) fail("timed out after ", timeout_s_, " s (MLXDIST_TIMEOUT) ", waiting);
    mine->wait(bell, std::min<Clock::duration>(kNap, deadline - now));
  }
}

}  // namespace mlxdist::shm
