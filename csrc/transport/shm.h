// Shared-memory byte movers for ranks on one host: every rank owns a segment holding one
// single-producer ring per (peer, link) it receives from, plus a doorbell futex. Senders copy
// into the receiver's ring; nothing crosses a socket on the data path. The group's TCP
// connections stay open beside it: they carry the set-up and reveal a peer that died.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/transfer.h"
#include "transport/setup.h"
#include "transport/tcp.h"

namespace mlxdist::shm {

// "boot id/hostname": ranks with equal identities share a kernel, hence /dev/shm.
std::string host_identity();

// How waiting ranks behave: spin this long, then sleep on their doorbell, waking at least this
// often to check that peers are alive. Spinning briefly never starves JAX's threads.
constexpr auto kSpin = std::chrono::microseconds(30);
constexpr auto kNap = std::chrono::milliseconds(20);

// A futex doorbell in shared memory: peers ring it after data or space appears for its owner.
struct Doorbell {
  alignas(128) std::atomic<uint32_t> count;
  alignas(128) std::atomic<uint32_t> sleepers;  // >0 while the owner sleeps on count
  uint32_t seen() const { return count.load(std::memory_order_acquire); }
  void ring();
  // Sleeps until rung after `seen` was read, or for at most nap.
  void wait(uint32_t seen, Clock::duration nap);
};

// Where a rank that failed leaves why, in its own segment, before it drops its connections.
// Bytes a peer left in shared memory stay readable after it failed or exited, so a survivor
// looks here before it completes a call with that peer: a call the peer abandoned raises.
struct Farewell {
  alignas(128) std::atomic<uint32_t> said;
  uint32_t len;
  char text[4088];
  void say(const std::string& why);
  std::string heard() const;  // "" while the owner has not failed
};

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// One rank's shared-memory segment, mapped: created (and later unlinked) by its owner, opened
// by its peers. (Not a Segment of a byte stream, core/transfer.h.)
class Mapping {
 public:
  ~Mapping();
  const std::string& name() const { return name_; }
  void unlink();  // after every peer has mapped it: nothing is left behind in /dev/shm
  char* base() const { return base_; }
  // Bytes for `peers` x `links` incoming rings of ring_bytes each (ShmLinks' layout).
  static size_t bytes_for(int peers, int links, size_t ring_bytes);
  // A zeroed segment, and opening one (its size must match).
  static std::unique_ptr<Mapping> create(size_t bytes);
  static std::unique_ptr<Mapping> open(const std::string& name, size_t bytes);

 private:
  Mapping(std::string name, char* base, size_t bytes, bool owner)
      : name_(std::move(name)), base_(base), bytes_(bytes), owner_(owner) {}
  std::string name_;
  char* base_;
  size_t bytes_;
  bool owner_;
  bool linked_ = true;
};

// How each pair of members reaches the other (as NCCL's canConnect): through shared memory
// when both run on one kernel and each mapped the other's segment, else over the network.
// A group takes shared memory only when every pair can (one progress loop per group), so
// every rank learns the same answer: segments of `bytes` (created here, opened for peers) or,
// in `why`, the first pair that cannot. The own segment is unlinked once all have tried.
struct SharedSegments {
  std::vector<std::unique_ptr<Mapping>> segments;  // [p]: rank p's segment, mapped here
  std::string why;                                 // "" when shared memory joins every pair
  // Whether every member can read every other's memory (process_vm_readv: same user, no
  // ptrace restriction), and their process ids: large messages then cross in one copy.
  bool direct = false;
  std::vector<int> pids;
};
SharedSegments share_segments(int me, int n, size_t bytes, const AllGather& exchange,
                              const PeerNames& names);

// Whether every member runs on this host (one exchange of host identities).
bool all_on_this_host(const AllGather& exchange);

// Segments of at least this many bytes cross in one copy where the ranks can read each other's
// memory: the sender puts a descriptor (address, length) in the ring, the receiver reads the
// bytes straight from the sender's memory and acknowledges. Smaller ones (collective chunks,
// headers) go through the ring.
constexpr size_t kDirectBytes = 1 << 20;

class ShmLinks : public Links {
 public:
  // shared.segments[p] is rank p's segment (our own at me); tcp stays open for liveness.
  ShmLinks(std::unique_ptr<tcp::TcpLinks> tcp, int me, SharedSegments shared, int links,
           size_t ring_bytes, double timeout_s);
  int links_per_peer() const override { return links_; }
  bool can_combine() const override { return true; }
  void run(std::vector<Transfer>& transfers, Deadline deadline) override;
  std::string describe_peer(int peer) const override { return tcp_->describe_peer(peer); }
  std::string lost_peers(const std::vector<int>& which) const override {
    return tcp_->lost_peers(which);  // a peer's process is gone when its sockets are
  }
  void close() override;
  void reset(const std::string& why) override;

  struct RingHeader;  // shared layout, in shm.cc

 private:
  RingHeader* ring(int owner, int from, int link) const;
  Doorbell* mailbox(int owner) const;
  Farewell* farewell(int owner) const;
  // Throws if peer left a farewell.
  void check_farewell(int peer) const;
  // One step of a segment that crosses in one copy (kDirectBytes); false while it waits.
  bool direct_send(Cursor& c, int peer, int link);
  bool direct_recv(Cursor& c, int peer, int link);

  std::unique_ptr<tcp::TcpLinks> tcp_;
  int me_;
  int n_;
  std::vector<std::unique_ptr<Mapping>> segments_;
  int links_;
  size_t ring_bytes_;
  double timeout_s_;
  bool direct_;
  std::vector<int> pids_;
  // Per (peer, link) we send on: descriptors posted, and acknowledgements seen.
  std::vector<uint64_t> posted_, acks_seen_;
  std::vector<char> landing_;  // direct receives that combine: the bytes land here first
  int threads_;                // threads a large direct read is split over
};

}  // namespace mlxdist::shm
