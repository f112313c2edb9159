// The CUDA runtime, loaded at run time (the JAX CUDA plugin has loaded it already in any
// process with GPU arrays), so one build serves CPU-only and GPU machines.
#pragma once

#include <cstddef>

namespace mlxdist::gpu {

struct Cuda {
  int (*MemcpyAsync)(void* dst, const void* src, size_t bytes, int kind, void* stream);
  int (*Memcpy2DAsync)(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                       size_t height, int kind, void* stream);
  int (*StreamSynchronize)(void* stream);
  int (*MallocHost)(void** ptr, size_t bytes);
  int (*FreeHost)(void* ptr);
  const char* (*GetErrorString)(int err);
  int (*Malloc)(void** ptr, size_t bytes);
  int (*Free)(void* ptr);
  int (*SetDevice)(int device);
  int (*DeviceGetPCIBusId)(char* id, int len, int device);
  int (*EventCreateWithFlags)(void** event, unsigned flags);
  int (*EventRecord)(void* event, void* stream);
  int (*EventQuery)(void* event);  // 0: done, kNotReady: pending
  int (*EventDestroy)(void* event);
  int (*EventSynchronize)(void* event);
};

constexpr int kHostToDevice = 1, kDeviceToHost = 2, kDeviceToDevice = 3;
constexpr int kNotReady = 600;            // cudaErrorNotReady
constexpr unsigned kDisableTiming = 2;     // cudaEventDisableTiming

// Throws DistError when no CUDA runtime can be loaded.
Cuda& cuda();
// Throws DistError naming call and CUDA's message when err is not cudaSuccess.
void check(int err, const char* call);

// A pinned host buffer that grows on demand (never shrinks) and is freed with its owner.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* get(size_t bytes);

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace mlxdist::gpu
