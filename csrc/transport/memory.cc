#include "transport/memory.h"

#include <algorithm>

#include "core/error.h"

namespace mlxdist::memory {

void MemoryLinks::run(std::vector<Transfer>& transfers, Deadline deadline) {
  // One FIFO per (direction, peer, link), as on the other transports: only its head moves.
  std::map<std::tuple<bool, int, int>, std::vector<Cursor>> queues;
  std::map<std::tuple<bool, int, int>, size_t> heads;
  for (auto& t : transfers) queues[{!t.is_send, t.peer, t.link % links_}].push_back(Cursor{&t});
  std::unique_lock<std::mutex> lock(hub_->mu_);
  const bool foreground = has_foreground(transfers);
  bool waited = false;
  for (;;) {
    bool progressed = false, pending = false;
    for (auto& [key, q] : queues) {
      auto [is_recv, peer, link] = key;
      auto& pipe = hub_->pipes_[is_recv ? std::make_tuple(peer, me_, link)
                                        : std::make_tuple(me_, peer, link)];
      size_t& h = heads[key];
      while (h < q.size()) {
        Cursor& c = q[h];
        lock.unlock();  // receive callbacks (header checks, reductions) run outside the lock
        c.settle();
        lock.lock();
        if (c.done()) { ++h; continue; }
        Segment& s = c.t->segments[c.t->seg];
        char* p = static_cast<char*>(s.data) + c.t->off;
        const size_t n = is_recv ? std::min(s.len - c.t->off, pipe.size())
                                 : std::min(s.len - c.t->off, hub_->capacity_ - std::min(hub_->capacity_, pipe.size()));
        if (n == 0) {
          pending = true;
          break;
        }
        if (is_recv) {
          std::copy_n(pipe.begin(), n, p);
          pipe.erase(pipe.begin(), pipe.begin() + std::ptrdiff_t(n));
        } else {
          pipe.insert(pipe.end(), p, p + n);
        }
        c.t->off += n;
        progressed = true;
      }
    }
    if (progressed) hub_->moved_.notify_all();
    if (!pending) return;
    for (auto& [key, q] : queues)
      if (auto it = hub_->left_.find(std::get<1>(key)); heads[key] < q.size() && it != hub_->left_.end())
        fail(describe_peer(it->first), " left the group after an error: ", it->second);
    if (!foreground_left(transfers) && (foreground || progressed || waited)) return;
    if (progressed) continue;
    const bool timed_out = hub_->moved_.wait_until(lock, deadline) == std::cv_status::timeout;
    waited = true;
    if (timed_out && foreground)
      fail("timed out after ", timeout_s_, " s (MLXDIST_TIMEOUT) in an in-memory transfer");
  }
}

void MemoryLinks::reset(const std::string& why) {
  std::lock_guard<std::mutex> lock(hub_->mu_);
  hub_->left_[me_] = why.empty() ? "it left during an op" : why;
  hub_->moved_.notify_all();
}

}  // namespace mlxdist::memory
