// Libraries loaded at run time (dlopen), so that one build serves machines with and without
// them (MPI, NCCL, the CUDA runtime, libibverbs, libcrypto). Every loader goes through here.
#pragma once

#include <dlfcn.h>

#include <string>
#include <vector>

namespace mlxdist::library {

// The first of names that loads (global: its symbols serve libraries it loads in turn, as Open
// MPI's plug-ins need), or nullptr with each dlopen error appended to *tried ("\n  ...").
inline void* open_first(const std::vector<std::string>& names, bool global, std::string* tried) {
  for (const auto& name : names) {
    if (void* h = dlopen(name.c_str(), RTLD_NOW | (global ? RTLD_GLOBAL : RTLD_LOCAL))) return h;
    const char* e = dlerror();  // names the file itself
    *tried += "\n  " + (e ? std::string(e) : name + ": not found");
  }
  return nullptr;
}

// Binds out to the library's symbol name; a missing one is added to *missing ("a, b").
template <typename T>
void bind(void* h, const char* name, T& out, std::string* missing) {
  out = reinterpret_cast<T>(dlsym(h, name));
  if (!out) *missing += std::string(missing->empty() ? "" : ", ") + name;
}

}  // namespace mlxdist::library
