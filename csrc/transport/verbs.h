// A verbs-style transport, shaped like an RDMA NIC's interface: memory registered up front,
// sends and receives posted against it and matched in order per peer (one reliable connected
// queue pair per peer), completions polled. JACCL's algorithms are written against it; shared
// memory (ranks on one host) and libibverbs (InfiniBand / RoCE) implement it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/transfer.h"
#include "transport/setup.h"

namespace mlxdist::verbs {

// Registered memory. key is the implementation's handle (an ibverbs lkey, a segment offset).
struct Buffer {
  char* data = nullptr;
  size_t len = 0;
  uint64_t key = 0;
};

struct Completion {
  uint64_t id;    // as given when posted
  int peer;
  bool is_recv;
  size_t len;     // bytes received (receives) or sent
};

class QueuePairs {
 public:
  virtual ~QueuePairs() = default;
  // Registered memory for posts; valid until the queue pairs are destroyed.
  virtual Buffer allocate(size_t bytes) = 0;
  // Whether sends may come from any memory of this process (Buffer{data, len} unregistered):
  // true where the transport copies anyway (shared memory), so callers can skip staging.
  virtual bool sends_from_any_memory() const { return false; }
  // len bytes at buf.data + off go to peer, landing in the oldest receive it posted for us.
  // A message longer than that receive is an error on both sides.
  virtual void post_send(int peer, const Buffer& buf, size_t off, size_t len, uint64_t id) = 0;
  // Room for the next message from peer.
  virtual void post_recv(int peer, const Buffer& buf, size_t off, size_t len, uint64_t id) = 0;
  // Appends what completed since the last call; waits until something did (true) or the
  // deadline passed (false). Throws DistError when one of the peers the caller waits on is
  // lost (naming them).
  virtual bool poll(std::vector<Completion>& done, Deadline deadline,
                    const std::vector<int>& waiting_on) = 0;
  virtual std::string describe_peer(int peer) const = 0;
  // Graceful: messages already posted are still delivered.
  virtual void close() = 0;
  // After a failure: leave why for the peers where the transport can, so none of them
  // completes a call this rank abandoned (its messages already placed notwithstanding).
  virtual void abort(const std::string& why) { (void)why; }
};

}  // namespace mlxdist::verbs
