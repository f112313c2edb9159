// What algorithms ask of a transport: move byte segments to and from peers. Algorithms never
// see sockets; transports never see dtypes or headers.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace mlxdist {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

struct Segment {
  void* data;                    // source for sends, destination for receives
  size_t len;
  std::function<void()> on_done;  // receives only: runs when the segment has arrived (may throw)
  // Receives only, on transports that can_combine(): fold the arriving bytes into data
  // (combine(dst, src, len), len a multiple of grain) instead of copying them, reading
  // straight from the transport's own buffer.
  std::function<void(char* dst, const char* src, size_t len)> combine = nullptr;
  size_t grain = 1;
};

// A byte stream to or from one peer on one of its links. Transfers on the same (peer, link,
// direction) run in the order given, so both sides can agree on the byte order of a stream.
struct Transfer {
  int peer;
  int link;
  bool is_send;
  std::vector<Segment> segments;
  // Sends only: the op may return before this is done (a send never waits for its receiver).
  // run() moves it when it can but does not wait for it; it keeps its place in later runs.
  bool background = false;
  bool kept = false;        // its memory outlives the op (the outbox's copy): may be lent out
  size_t seg = 0, off = 0;  // progress so far, kept across runs

  bool done() const { return seg == segments.size(); }
  // Steps past finished (and empty) segments, running receive callbacks as they complete.
  void settle() {
    while (!done() && off == segments[seg].len) {
      if (!is_send && segments[seg].on_done) segments[seg].on_done();
      ++seg;
      off = 0;
    }
  }
};

inline bool has_foreground(const std::vector<Transfer>& ts) {
  for (const auto& t : ts)
    if (!t.background) return true;
  return false;
}
inline bool foreground_left(const std::vector<Transfer>& ts) {
  for (const auto& t : ts)
    if (!t.background && !t.done()) return true;
  return false;
}

// A transport's handle on one transfer in its queues.
struct Cursor {
  Transfer* t;
  bool done() const { return t->done(); }
  void settle() { t->settle(); }
};

class Links {
 public:
  virtual ~Links() = default;
  virtual int links_per_peer() const = 0;
  // Whether run() honours Segment::combine (the data sits in memory both sides can read).
  virtual bool can_combine() const { return false; }
  // Progress all transfers concurrently until every one not in the background is done;
  // throws DistError on a closed connection, an error from a segment callback, or the
  // deadline. With background transfers only, it moves what it can, waits at most until the
  // deadline for one of them to become able to move (no error then), moves that, and returns.
  virtual void run(std::vector<Transfer>& transfers, Deadline deadline) = 0;
  // "rank 3 (10.0.0.2:5000)", for error messages.
  virtual std::string describe_peer(int peer) const = 0;
  // Names of those of the given peers whose connections are gone ("" when none, or when the
  // transport cannot tell).
  virtual std::string lost_peers(const std::vector<int>& which) const { return ""; }
  virtual void close() = 0;  // graceful: bytes already handed over are still delivered
  // After a failure: drop everything now, so peers fail at once even when unsent bytes (which
  // would hold back a graceful close's FIN behind a full window) are queued.
  // why: the failure, left for the peers where the transport can (a farewell); "" for none.
  virtual void reset(const std::string& why) { (void)why; close(); }
};

}  // namespace mlxdist
