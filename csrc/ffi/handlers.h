// XLA FFI handlers, one per op. Each decodes its buffers and attributes, posts the op to the
// group's engine and returns a future, so no XLA thread waits on the network.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mlxdist::ffi_handlers {

// (custom-call target name, XLA_FFI_Handler*) for the CPU platform.
std::vector<std::pair<std::string, void*>> cpu_targets();
// The same targets for CUDA: on the group's device streams, or staged (gpu_handlers.cc).
std::vector<std::pair<std::string, void*>> gpu_targets();

}  // namespace mlxdist::ffi_handlers
