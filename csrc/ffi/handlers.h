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
// The same targets for CUDA: arrays staged through pinned host memory (gpu_handlers.cc).
std::vector<std::pair<std::string, void*>> gpu_targets();
// Frees a closed group's pinned buffers.
void release_gpu_staging(int64_t group);

}  // namespace mlxdist::ffi_handlers
