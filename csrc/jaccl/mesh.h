// JACCL's algorithms for fully connected ranks, over verbs-style queue pairs: every rank talks
// to every other directly. Messages go through registered slots: each peer has `depth`
// receives posted at all times (so a send never waits for its receiver to be inside an op),
// and `depth` send slots. Every op's stream to a peer starts with the op's header, which the
// receiver checks before it touches any payload.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/header.h"
#include "core/transfer.h"
#include "transport/verbs.h"

namespace mlxdist::jaccl {

// What one op moves between this rank and one peer, in order.
struct Flow {
  int peer = 0;
  Header header;              // sent first; the peer's must match it (or `expected`'s)
  bool expects_other = false;  // the peer's header differs from ours (uneven all_to_all)
  Header expected;
  std::vector<Segment> send;  // the byte streams' vocabulary (core/transfer.h): a receive
  std::vector<Segment> recv;  // segment's on_done runs once it landed
  bool sends = true, receives = true;  // whether each direction runs (send/recv use one)
  // How arriving payload goes into recv (dst) from the slot (src): a copy when empty.
  std::function<void(char* dst, const char* src, size_t len)> land;
  bool with_header = true;  // false: the caller frames its own stream (the ring variant)
  // Send-only: the op may return before it is done (a send never waits for its receiver);
  // the mesh keeps what is left and moves it during later runs.
  bool background = false;
};

class Mesh {
 public:
  Mesh(verbs::QueuePairs& qp, int me, int n, size_t frame_bytes, int depth, double timeout_s,
       std::string me_name);
  ~Mesh();
  // Runs the flows (but background ones) to completion, sends pending from earlier runs moving
  // first. ordered: the k-th frame of flows[i] lands only after the k-th frame of every
  // earlier flow (a fixed reduction order, hence the same bits on every run).
  void run(std::vector<Flow>& flows, bool ordered);
  // Pending sends: whether any, moving them (waiting at most `wait` for a completion), and
  // delivering them all. Throw when a peer is lost or a send has not moved for the timeout.
  bool pending() const { return !pending_.empty(); }
  void progress(Clock::duration wait);
  void flush();

  int rank() const { return me_; }
  int size() const { return n_; }
  size_t small_bytes = 64 << 10;  // all-reduce at or below: everyone reduces everything in rank order

 private:
  struct Peer;
  struct Pending;
  // Runs foreground flows to completion; with none, waits at most until `idle_until`.
  void run_until(std::vector<Flow>& flows, bool ordered, Deadline idle_until);
  verbs::QueuePairs& qp_;
  int me_, n_;
  size_t frame_;
  int depth_;
  double timeout_s_;
  std::string me_name_;
  bool direct_;  // payload is sent from where it lies, not from a send slot
  std::vector<verbs::Buffer> slots_;  // per peer: depth receive slots, then depth send slots
  std::vector<Peer> peers_;
  std::deque<std::unique_ptr<Pending>> pending_;  // in the order they were sent
};

// The collectives (header: the op's, sent to every peer). out may alias in where noted.
void all_reduce(Mesh& m, const Header& h, const char* in, char* out, size_t count, DType t,
                ReduceOp op);  // out may be in
void all_gather(Mesh& m, const Header& h, const char* in, char* out, size_t bytes);
// in: size() blocks of count elements; out: this rank's block of the reduction.
void reduce_scatter(Mesh& m, const Header& h, const char* in, char* out, size_t count, DType t,
                    ReduceOp op);
void send(Mesh& m, const Header& h, const char* in, size_t bytes, int dst);
void recv(Mesh& m, const Header& h, char* out, size_t bytes, int src);
void sendrecv(Mesh& m, const Header& send_h, const char* in, size_t send_bytes, int dst,
              const Header& recv_h, char* out, size_t recv_bytes, int src);
// A rooted collective's exchange (core/group.h, Group::star): to[p]/from[p] for member p.
void star(Mesh& m, const Header& h, int root, const std::vector<std::pair<const void*, size_t>>& to,
          const std::vector<std::pair<void*, size_t>>& from);
// send_at/recv_at: byte offsets of each rank's block (size + 1 entries); the own block is the
// caller's to copy.
void all_to_all(Mesh& m, const Header& h, const char* in, const std::vector<size_t>& send_at,
                char* out, const std::vector<size_t>& recv_at);

}  // namespace mlxdist::jaccl
