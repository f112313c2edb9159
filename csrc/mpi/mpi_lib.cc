#include "mpi/mpi_lib.h"

#include <dlfcn.h>

#include <cstdint>
#include <vector>

#include "core/error.h"
#include "core/library.h"

namespace mlxdist::mpi {
namespace {

// Open MPI 3 to 5, then the MPICH ABI's library (MPICH, Intel MPI, MVAPICH).
const std::vector<std::string> kNames = {"libmpi.so.40", "libmpi.so.12", "libmpi.so"};

void* open_library(const std::string& path, std::string* why) {
  std::string tried;
  // Global: Open MPI's plug-ins resolve their symbols against libmpi.
  if (void* h = library::open_first(path.empty() ? kNames : std::vector<std::string>{path}, true,
                                    &tried))
    return h;
  *why = "no MPI library could be loaded (install Open MPI or MPICH, or set MLXDIST_MPI_LIB):" +
         tried;
  return nullptr;
}

Lib* loaded = nullptr;
std::mutex load_mu;

std::string library_version(void* h) {
  int (*version)(char*, int*) = nullptr;
  std::string unused;
  library::bind(h, "MPI_Get_library_version", version, &unused);  // callable before MPI_Init
  if (!version) return "";
  char buf[8192] = {};
  int len = 0;
  version(buf, &len);
  std::string text(buf, size_t(std::max(0, std::min(len, int(sizeof(buf))))));
  auto nl = text.find('\n');
  if (nl != std::string::npos) text.resize(nl);
  return text;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// The MPICH ABI's predefined handles (mpi.h of MPICH 3 to 5; Intel MPI and MVAPICH share them).
void resolve_mpich(Lib* lib) {
  auto h = [](uintptr_t v) { return reinterpret_cast<Handle>(v); };
  lib->abi = Abi::kMpich;
  lib->status_ignore = h(1);
  lib->comm_world = h(0x44000000);
  lib->errors_return = h(0x54000001);
  lib->request_null = h(0x2c000000);
  lib->byte = h(0x4c00010d);
  lib->max = h(0x58000001);
  lib->min = h(0x58000002);
  lib->sum = h(0x58000003);
  lib->prod = h(0x58000004);
  lib->band = h(0x58000006);
  lib->bor = h(0x58000008);
  lib->bxor = h(0x5800000a);
  auto type = [&](DType t, uintptr_t v) { lib->types[size_t(t)] = h(v); };
  type(DType::kBool, 0x4c00013b);  // uint8_t: 0/1 bytes, OR and AND as bitwise ops
  type(DType::kInt8, 0x4c000137);
  type(DType::kInt16, 0x4c000238);
  type(DType::kInt32, 0x4c000439);
  type(DType::kInt64, 0x4c00083a);
  type(DType::kUInt8, 0x4c00013b);
  type(DType::kUInt16, 0x4c00023c);
  type(DType::kUInt32, 0x4c00043d);
  type(DType::kUInt64, 0x4c00083e);
  type(DType::kFloat32, 0x4c00040a);
  type(DType::kFloat64, 0x4c00080b);
  type(DType::kComplex64, 0x4c000840);  // MPI_C_FLOAT_COMPLEX
  type(DType::kComplex128, 0x4c001041);  // MPI_C_DOUBLE_COMPLEX
}

// Open MPI's predefined handles: its objects, by name.
void resolve_open_mpi(void* h, Lib* lib, std::string& missing) {
  auto obj = [&](const char* name) {
    void* p = dlsym(h, name);
    if (!p) missing += std::string(missing.empty() ? "" : ", ") + name;
    return p;
  };
  lib->comm_world = obj("ompi_mpi_comm_world");
  lib->errors_return = obj("ompi_mpi_errors_return");
  lib->request_null = obj("ompi_request_null");
  lib->byte = obj("ompi_mpi_byte");
  lib->sum = obj("ompi_mpi_op_sum");
  lib->max = obj("ompi_mpi_op_max");
  lib->min = obj("ompi_mpi_op_min");
  lib->prod = obj("ompi_mpi_op_prod");
  lib->band = obj("ompi_mpi_op_band");
  lib->bor = obj("ompi_mpi_op_bor");
  lib->bxor = obj("ompi_mpi_op_bxor");
  auto type = [&](DType t, const char* name) { lib->types[size_t(t)] = obj(name); };
  type(DType::kBool, "ompi_mpi_uint8_t");  // 0/1 bytes: OR and AND as bitwise ops
  type(DType::kInt8, "ompi_mpi_int8_t");
  type(DType::kInt16, "ompi_mpi_int16_t");
  type(DType::kInt32, "ompi_mpi_int32_t");
  type(DType::kInt64, "ompi_mpi_int64_t");
  type(DType::kUInt8, "ompi_mpi_uint8_t");
  type(DType::kUInt16, "ompi_mpi_uint16_t");
  type(DType::kUInt32, "ompi_mpi_uint32_t");
  type(DType::kUInt64, "ompi_mpi_uint64_t");
  type(DType::kFloat32, "ompi_mpi_float");
  type(DType::kFloat64, "ompi_mpi_double");
  type(DType::kComplex64, "ompi_mpi_c_float_complex");
  type(DType::kComplex128, "ompi_mpi_c_double_complex");
}

Lib* resolve(void* h, const std::string& path, std::string* why) {
  auto* lib = new Lib();
  lib->path = path;
  lib->version = library_version(h);
  std::string missing;
  const bool open_mpi = dlsym(h, "ompi_mpi_comm_world") != nullptr;
  const auto& v = lib->version;
  if (!open_mpi) {
    if (!(starts_with(v, "MPICH") || starts_with(v, "Intel(R) MPI") ||
          starts_with(v, "MVAPICH") || starts_with(v, "CRAY MPICH"))) {
      *why = path + " is neither Open MPI nor of the MPICH ABI (MPICH, Intel MPI, MVAPICH, Cray "
             "MPICH); its version: " + (v.empty() ? "unknown" : v);
      delete lib;
      return nullptr;
    }
    resolve_mpich(lib);
  } else {
    resolve_open_mpi(h, lib, missing);
  }
  library::bind(h, "MPI_Initialized", lib->Initialized, &missing);
  library::bind(h, "MPI_Finalized", lib->Finalized, &missing);
  library::bind(h, "MPI_Init_thread", lib->Init_thread, &missing);
  library::bind(h, "MPI_Finalize", lib->Finalize, &missing);
  library::bind(h, "MPI_Comm_rank", lib->Comm_rank, &missing);
  library::bind(h, "MPI_Comm_size", lib->Comm_size, &missing);
  library::bind(h, "MPI_Comm_dup", lib->Comm_dup, &missing);
  library::bind(h, "MPI_Comm_split", lib->Comm_split, &missing);
  library::bind(h, "MPI_Comm_free", lib->Comm_free, &missing);
  library::bind(h, "MPI_Comm_set_errhandler", lib->Comm_set_errhandler, &missing);
  library::bind(h, "MPI_Error_string", lib->Error_string, &missing);
  library::bind(h, "MPI_Op_create", lib->Op_create, &missing);
  library::bind(h, "MPI_Iallreduce", lib->Iallreduce, &missing);
  library::bind(h, "MPI_Iallgather", lib->Iallgather, &missing);
  library::bind(h, "MPI_Ireduce_scatter_block", lib->Ireduce_scatter_block, &missing);
  library::bind(h, "MPI_Isend", lib->Isend, &missing);
  library::bind(h, "MPI_Irecv", lib->Irecv, &missing);
  library::bind(h, "MPI_Ibarrier", lib->Ibarrier, &missing);
  library::bind(h, "MPI_Test", lib->Test, &missing);
  library::bind(h, "MPI_Iprobe", lib->Iprobe, &missing);
  if (!missing.empty()) {
    *why = path + " lacks " + missing + " (an MPI-3 library is needed)";
    delete lib;
    return nullptr;
  }
  return lib;
}

Lib* open_and_resolve(const std::string& path, std::string* why) {
  void* h = open_library(path, why);
  if (!h) return nullptr;
  Dl_info info{};
  std::string where = path.empty() ? kNames[0] : path;
  if (void* sym = dlsym(h, "MPI_Init_thread"); sym && dladdr(sym, &info) && info.dli_fname)
    where = info.dli_fname;
  return resolve(h, where, why);
}

}  // namespace

void check(Lib& lib, int rc, const char* call) {
  if (rc == 0) return;
  char msg[1024] = {};
  int len = 0;
  if (lib.Error_string(rc, msg, &len) != 0) len = 0;
  lib.failed = true;
  fail(call, " failed: ", std::string(msg, size_t(std::max(0, std::min(len, 1023)))),
       " (MPI error ", rc, ")");
}

bool available(const std::string& path, std::string* why) {
  std::lock_guard<std::mutex> lock(load_mu);
  if (loaded) return true;
  Lib* lib = open_and_resolve(path, why);
  if (!lib) return false;
  loaded = lib;  // kept: loading twice is harmless but pointless
  return true;
}

Lib& load(const std::string& path) {
  std::string why;
  if (!available(path, &why)) fail("MPI backend: ", why);
  Lib& lib = *loaded;
  std::lock_guard<std::mutex> lock(lib.mu);
  int done = 0;
  lib.Finalized(&done);
  if (done) fail("MPI backend: MPI was already finalised in this process");
  int ready = 0;
  lib.Initialized(&ready);
  if (!ready) {
    int provided = 0;
    check(lib, lib.Init_thread(nullptr, nullptr, kThreadMultiple, &provided), "MPI_Init_thread");
    lib.initialized_here = true;
    if (provided < kThreadSerialized)
      fail("MPI backend: ", lib.path, " offers thread level ", provided,
           "; at least MPI_THREAD_SERIALIZED is needed");
  }
  return lib;
}

void finalize() {
  std::lock_guard<std::mutex> guard(load_mu);
  if (!loaded || !loaded->initialized_here || loaded->failed) return;
  std::lock_guard<std::mutex> lock(loaded->mu);
  int done = 0;
  loaded->Finalized(&done);
  if (!done) loaded->Finalize();
}

}  // namespace mlxdist::mpi
