#include "jaccl/ring_links.h"

#include <algorithm>
#include <map>

namespace mlxdist::jaccl {

void RingLinks::run(std::vector<Transfer>& transfers, Deadline) {  // the mesh bounds stalls itself
  std::vector<Transfer*> order;
  for (auto& t : transfers) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const Transfer* a, const Transfer* b) {
    return a->peer != b->peer ? a->peer < b->peer : a->link < b->link;
  });
  std::map<int, size_t> index;  // peer -> its flow
  std::vector<Flow> flows;
  for (Transfer* t : order) {
    auto [it, fresh] = index.emplace(t->peer, flows.size());
    if (fresh) {
      flows.emplace_back();
      flows.back().peer = t->peer;
      flows.back().with_header = false;  // the ring frames every chunk with its own header
      flows.back().sends = flows.back().receives = false;
    }
    Flow& f = flows[it->second];
    for (auto& seg : t->segments) (t->is_send ? f.send : f.recv).push_back(seg);
    (t->is_send ? f.sends : f.receives) = true;
  }
  mesh_.run(flows, false);
}

}  // namespace mlxdist::jaccl
