// XLA hands us fresh output buffers; faulting their pages in with one call is much cheaper
// than one fault per page while the data lands (large outputs otherwise spend most of their
// time there). Best effort: kernels before 5.14 lack MADV_POPULATE_WRITE.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace mlxdist {

inline void prefault(void* p, size_t bytes) {
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE
  if (bytes < (1u << 20)) return;
  const uintptr_t page = 4096, start = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(page - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, kPopulateWrite);
}

}  // namespace mlxdist
