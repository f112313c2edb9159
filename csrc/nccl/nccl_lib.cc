#include "nccl/nccl_lib.h"

#include <map>
#include <memory>
#include <mutex>

#include "core/error.h"
#include "core/library.h"

namespace mlxdist::nccl {
namespace {

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
  std::string tried, missing;
  void* h = library::open_first({name}, false, &tried);
  if (!h) {
    *why = failures[path] = "NCCL could not be loaded (" + tried.substr(3) +
                            "); install nvidia-nccl-cu13 or nvidia-nccl-cu12, or set MLXDIST_NCCL_LIB";
    return nullptr;
  }
  auto lib = std::make_unique<Lib>();
  lib->path = name;
  {
    using library::bind;
    bind(h, "ncclGetVersion", lib->GetVersion, &missing);
    bind(h, "ncclGetUniqueId", lib->GetUniqueId, &missing);
    bind(h, "ncclCommInitRank", lib->CommInitRank, &missing);
    bind(h, "ncclCommSplit", lib->CommSplit, &missing);
    bind(h, "ncclCommAbort", lib->CommAbort, &missing);
    bind(h, "ncclCommDestroy", lib->CommDestroy, &missing);
    bind(h, "ncclCommGetAsyncError", lib->CommGetAsyncError, &missing);
    bind(h, "ncclGetErrorString", lib->GetErrorString, &missing);
    bind(h, "ncclGetLastError", lib->GetLastError, &missing);
    bind(h, "ncclAllReduce", lib->AllReduce, &missing);
    bind(h, "ncclAllGather", lib->AllGather, &missing);
    bind(h, "ncclReduceScatter", lib->ReduceScatter, &missing);
    bind(h, "ncclSend", lib->Send, &missing);
    bind(h, "ncclRecv", lib->Recv, &missing);
    bind(h, "ncclGroupStart", lib->GroupStart, &missing);
    bind(h, "ncclGroupEnd", lib->GroupEnd, &missing);
  }
  if (!missing.empty()) {
    *why = failures[path] = name + ": the NCCL library lacks " + missing +
                            " (NCCL 2.18 or newer is needed)";
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
