// Process-wide table of live groups, by the handle Python and the FFI attributes use.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/engine.h"

namespace mlxdist {

int64_t add_group(std::shared_ptr<Group> group);  // starts the group's engine
std::shared_ptr<Engine> find_engine(int64_t handle);  // null when unknown or closed
// Finishes queued work, closes the connections and forgets the handle.
void remove_group(int64_t handle);
// Every live group's engine, in handle order (for flight-recorder dumps).
std::vector<std::shared_ptr<Engine>> live_engines();

}  // namespace mlxdist
