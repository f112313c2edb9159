#include "core/registry.h"

#include <map>
#include <mutex>

namespace mlxdist {
namespace {

std::mutex mu;
std::map<int64_t, std::shared_ptr<Engine>>& table() {
  static auto* t = new std::map<int64_t, std::shared_ptr<Engine>>();  // outlives static teardown
  return *t;
}
int64_t next_handle = 1;

}  // namespace

int64_t add_group(std::shared_ptr<Group> group) {
  auto engine = std::make_shared<Engine>(std::move(group));
  std::lock_guard<std::mutex> lock(mu);
  table()[next_handle] = std::move(engine);
  return next_handle++;
}

std::shared_ptr<Engine> find_engine(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = table().find(handle);
  return it == table().end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<Engine>> live_engines() {
  std::lock_guard<std::mutex> lock(mu);
  std::vector<std::shared_ptr<Engine>> out;
  for (auto& [handle, engine] : table()) out.push_back(engine);
  return out;
}

void remove_group(int64_t handle) {
  std::shared_ptr<Engine> engine;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = table().find(handle);
    if (it == table().end()) return;
    engine = std::move(it->second);
    table().erase(it);
  }
  engine->shutdown();
}

}  // namespace mlxdist
