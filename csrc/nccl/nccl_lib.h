// NVIDIA's NCCL, loaded at run time (from the nvidia-nccl-cu12/cu13 wheels or the system), so
// CPU-only installs neither build nor load it. Only the C ABI of nccl.h is used.
#pragma once

#include <string>

#include "core/dtype.h"

namespace mlxdist::nccl {

using Comm = void*;  // ncclComm_t
struct UniqueId {
  char internal[128];
};
constexpr int kSplitNoColor = -1;  // NCCL_SPLIT_NOCOLOR

// ncclDataType_t and ncclRedOp_t values.
enum DataType : int {
  kInt8 = 0, kUInt8, kInt32, kUInt32, kInt64, kUInt64, kFloat16, kFloat32, kFloat64, kBFloat16
};
enum RedOp : int { kSum = 0, kProd, kMax, kMin };

struct Lib {
  std::string path;
  int version = 0;  // e.g. 22805 for 2.28.5
  int (*GetVersion)(int*);
  int (*GetUniqueId)(UniqueId*);
  int (*CommInitRank)(Comm*, int nranks, UniqueId id, int rank);
  int (*CommSplit)(Comm, int color, int key, Comm* out, void* config);
  int (*CommAbort)(Comm);
  int (*CommDestroy)(Comm);
  int (*CommGetAsyncError)(Comm, int* result);
  const char* (*GetErrorString)(int);
  const char* (*GetLastError)(Comm);
  int (*AllReduce)(const void*, void*, size_t, int type, int op, Comm, void* stream);
  int (*AllGather)(const void*, void*, size_t sendcount, int type, Comm, void* stream);
  int (*ReduceScatter)(const void*, void*, size_t recvcount, int type, int op, Comm, void* stream);
  int (*Send)(const void*, size_t, int type, int peer, Comm, void* stream);
  int (*Recv)(void*, size_t, int type, int peer, Comm, void* stream);
  int (*GroupStart)();
  int (*GroupEnd)();
};

// Loads (once) path, or libnccl.so.2 from the library path when empty. Throws DistError
// naming what was tried.
Lib& load(const std::string& path);
// Whether NCCL can be loaded; why says what failed.
bool available(const std::string& path, std::string* why);
// Throws DistError with NCCL's message (and comm's last error, when given) unless rc is 0.
void check(int rc, const char* call, Comm comm = nullptr);

}  // namespace mlxdist::nccl
