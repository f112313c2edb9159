#include "transport/nccl_lib.h"

#include <dlfcn.h>

#include <map>
#include <memory>
#include <mutex>

#include "core/error.h"

namespace mlxdist::nccl {
namespace {

template <typename T>
void bind(void* h, const char* name, T& out) {
  out = reinterpret_cast<T>(dlsym(h, name));
  if (!out) fail("the NCCL library lacks ", name, " (NCCL 2.18 or newer is needed)");
}

std::mutex mu;
Lib* loaded = nullptr;                        // the first library loaded serves the process
std::map<std::string, std::string> failures;  // path -> why it could not be loaded

Lib* try_load(const std::string& path, std::string* why) {
  std::lock_guard<std::mutex> lock(mu);
  if (loaded) return loaded;
  if (auto f = failures.find(path); f != failures.end()) {
    *why = f->second;
    return nullptr;
  }
  const std::string name = path.empty() ? "libnccl.so.2" : path;
  void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    *why = failures[path] = "NCCL could not be loaded (" + std::string(dlerror()) +
                            "); install nvidia-nccl-cu13 or nvidia-nccl-cu12, or set MLXDIST_NCCL_LIB";
    return nullptr;
  }
  auto lib = std::make_unique<Lib>();
  lib->path = name;
  try {
    bind(h, "ncclGetVersion", lib->GetVersion);
    bind(h, "ncclGetUniqueId", lib->GetUniqueId);
    bind(h, "ncclCommInitRank", lib->CommInitRank);
    bind(h, "ncclCommSplit", lib->CommSplit);
    bind(h, "ncclCommAbort", lib->CommAbort);
    bind(h, "ncclCommDestroy", lib->CommDestroy);
    bind(h, "ncclCommGetAsyncError", lib->CommGetAsyncError);
    bind(h, "ncclGetErrorString", lib->GetErrorString);
    bind(h, "ncclGetLastError", lib->GetLastError);
    bind(h, "ncclAllReduce", lib->AllReduce);
    bind(h, "ncclAllGather", lib->AllGather);
    bind(h, "ncclReduceScatter", lib->ReduceScatter);
    bind(h, "ncclSend", lib->Send);
    bind(h, "ncclRecv", lib->Recv);
    bind(h, "ncclGroupStart", lib->GroupStart);
    bind(h, "ncclGroupEnd", lib->GroupEnd);
  } catch (const DistError& e) {
    *why = failures[path] = name + ": " + e.what();
    return nullptr;
  }
  lib->GetVersion(&lib->version);
  loaded = lib.release();  // lives as long as the process, as the library does
  return loaded;
}

}  // namespace

Lib& load(const std::string& path) {
  std::string why;
  Lib* lib = try_load(path, &why);
  if (!lib) fail(why);
  return *lib;
}

bool available(const std::string& path, std::string* why) { return try_load(path, why) != nullptr; }

void check(int rc, const char* call, Comm comm) {
  if (rc == 0) return;
  Lib& lib = load("");
  std::string detail = comm ? lib.GetLastError(comm) : "";
  fail(call, " failed: ", lib.GetErrorString(rc), detail.empty() ? "" : " (", detail,
       detail.empty() ? "" : ")");
}

}  // namespace mlxdist::nccl
