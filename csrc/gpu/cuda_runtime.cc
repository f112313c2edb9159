#include "gpu/cuda_runtime.h"

#include <mutex>
#include <string>

#include "core/error.h"
#include "core/library.h"

namespace mlxdist::gpu {
Cuda& cuda() {
  static std::once_flag once;
  static Cuda lib{};
  static std::string error;
  std::call_once(once, [] {
    std::string tried, missing;
    void* h = library::open_first({"libcudart.so.13", "libcudart.so.12", "libcudart.so"}, true,
                                  &tried);
    if (!h) {
      error = "no CUDA runtime could be loaded:" + tried;
      return;
    }
    {
      using library::bind;
      bind(h, "cudaMemcpyAsync", lib.MemcpyAsync, &missing);
      bind(h, "cudaMemcpy2DAsync", lib.Memcpy2DAsync, &missing);
      bind(h, "cudaStreamSynchronize", lib.StreamSynchronize, &missing);
      bind(h, "cudaMallocHost", lib.MallocHost, &missing);
      bind(h, "cudaFreeHost", lib.FreeHost, &missing);
      bind(h, "cudaGetErrorString", lib.GetErrorString, &missing);
      bind(h, "cudaMalloc", lib.Malloc, &missing);
      bind(h, "cudaFree", lib.Free, &missing);
      bind(h, "cudaSetDevice", lib.SetDevice, &missing);
      bind(h, "cudaDeviceGetPCIBusId", lib.DeviceGetPCIBusId, &missing);
      bind(h, "cudaEventCreateWithFlags", lib.EventCreateWithFlags, &missing);
      bind(h, "cudaEventRecord", lib.EventRecord, &missing);
      bind(h, "cudaEventQuery", lib.EventQuery, &missing);
      bind(h, "cudaEventDestroy", lib.EventDestroy, &missing);
      bind(h, "cudaEventSynchronize", lib.EventSynchronize, &missing);
    }
    if (!missing.empty()) error = "the CUDA runtime lacks " + missing;
  });
  if (!error.empty()) fail(error);
  return lib;
}

void check(int err, const char* call) {
  if (err != 0) fail(call, " failed: ", cuda().GetErrorString(err), " (CUDA error ", err, ")");
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_) cuda().FreeHost(ptr_);
}

void* PinnedBuffer::get(size_t bytes) {
  if (bytes > size_) {
    if (ptr_) cuda().FreeHost(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    check(cuda().MallocHost(&ptr_, bytes), "cudaMallocHost");
    size_ = bytes;
  }
  return ptr_;
}

}  // namespace mlxdist::gpu
