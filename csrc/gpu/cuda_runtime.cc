#include "gpu/cuda_runtime.h"

#include <dlfcn.h>

#include <mutex>
#include <string>

#include "core/error.h"

namespace mlxdist::gpu {
namespace {

template <typename T>
void bind(void* h, const char* name, T& out) {
  out = reinterpret_cast<T>(dlsym(h, name));
  if (!out) fail("the CUDA runtime lacks ", name);
}

}  // namespace

Cuda& cuda() {
  static std::once_flag once;
  static Cuda lib{};
  static std::string error;
  std::call_once(once, [] {
    void* h = nullptr;
    std::string tried;
    for (const char* name : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
      if ((h = dlopen(name, RTLD_NOW | RTLD_GLOBAL))) break;
      tried += std::string("\n  ") + dlerror();
    }
    if (!h) {
      error = "no CUDA runtime could be loaded:" + tried;
      return;
    }
    try {
      bind(h, "cudaMemcpyAsync", lib.MemcpyAsync);
      bind(h, "cudaMemcpy2DAsync", lib.Memcpy2DAsync);
      bind(h, "cudaStreamSynchronize", lib.StreamSynchronize);
      bind(h, "cudaMallocHost", lib.MallocHost);
      bind(h, "cudaFreeHost", lib.FreeHost);
      bind(h, "cudaGetErrorString", lib.GetErrorString);
      bind(h, "cudaMalloc", lib.Malloc);
      bind(h, "cudaFree", lib.Free);
      bind(h, "cudaSetDevice", lib.SetDevice);
      bind(h, "cudaDeviceGetPCIBusId", lib.DeviceGetPCIBusId);
      bind(h, "cudaEventCreateWithFlags", lib.EventCreateWithFlags);
      bind(h, "cudaEventRecord", lib.EventRecord);
      bind(h, "cudaEventQuery", lib.EventQuery);
      bind(h, "cudaEventDestroy", lib.EventDestroy);
      bind(h, "cudaEventSynchronize", lib.EventSynchronize);
    } catch (const DistError& e) {
      error = e.what();
    }
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
