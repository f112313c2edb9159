// The machine's MPI library, loaded at run time (no build dependency), in either of the two
// ABIs in use: Open MPI's (handles are pointers to its predefined objects, found by name) and
// MPICH's (MPICH, Intel MPI, MVAPICH, Cray MPICH: handles are ints with fixed values). Handle
// holds either; an int handle travels in the low half of a pointer-sized argument, as the
// x86-64 and AArch64 calling conventions pass it, and outputs land in zeroed slots.
#pragma once

#include <mutex>
#include <string>

#include "core/dtype.h"

namespace mlxdist::mpi {

using Handle = void*;  // MPI_Comm, MPI_Datatype, MPI_Op, MPI_Request, MPI_Errhandler
using UserFn = void (*)(void* in, void* inout, int* len, Handle* type);

enum class Abi { kOpenMpi, kMpich };

struct Lib {
  std::string path, version;
  Abi abi = Abi::kOpenMpi;
  void* status_ignore = nullptr;  // MPI_STATUS_IGNORE: NULL in Open MPI, 1 in MPICH
  // Predefined objects.
  Handle comm_world, errors_return, request_null, byte;
  Handle types[size_t(DType::kCount)] = {};  // nullptr: no builtin type for this dtype
  Handle sum, max, min, prod, band, bor, bxor;
  // Functions (as in mpi.h, with every handle a pointer).
  int (*Initialized)(int*);
  int (*Finalized)(int*);
  int (*Init_thread)(int*, char***, int, int*);
  int (*Finalize)();
  int (*Comm_rank)(Handle, int*);
  int (*Comm_size)(Handle, int*);
  int (*Comm_dup)(Handle, Handle*);
  int (*Comm_split)(Handle, int, int, Handle*);
  int (*Comm_free)(Handle*);
  int (*Comm_set_errhandler)(Handle, Handle);
  int (*Error_string)(int, char*, int*);
  int (*Op_create)(UserFn, int, Handle*);
  int (*Iallreduce)(const void*, void*, int, Handle, Handle, Handle, Handle*);
  int (*Iallgather)(const void*, int, Handle, void*, int, Handle, Handle, Handle*);
  int (*Ireduce_scatter_block)(const void*, void*, int, Handle, Handle, Handle, Handle*);
  int (*Isend)(const void*, int, Handle, int, int, Handle, Handle*);
  int (*Irecv)(void*, int, Handle, int, int, Handle, Handle*);
  int (*Ibarrier)(Handle, Handle*);
  int (*Test)(Handle*, int*, void*);
  int (*Iprobe)(int, int, Handle, int*, void*);

  // Every call into MPI holds this: groups run on their own threads, and a library that
  // offers less than MPI_THREAD_MULTIPLE must see one call at a time.
  std::mutex mu;
  bool initialized_here = false;
  bool failed = false;  // an op failed or timed out: requests may be pending forever
};

// Loads (once) path, or MLX's usual names when empty; initialises MPI unless the program did.
// Throws DistError naming what is missing.
Lib& load(const std::string& path);
// Whether a usable MPI library can be loaded (does not initialise MPI).
bool available(const std::string& path, std::string* why);
// MPI_Finalize if this module initialised MPI and nothing is left pending.
void finalize();
// Throws DistError with MPI's own message when rc is not MPI_SUCCESS.
void check(Lib& lib, int rc, const char* call);

constexpr int kThreadSerialized = 2, kThreadMultiple = 3;

}  // namespace mlxdist::mpi
