// The extension module: group management for Python, and the FFI targets XLA calls.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/header.h"
#include "core/registry.h"
#include "mpi/mpi_group.h"
#include "nccl/nccl_group.h"
#include "nccl/nccl_lib.h"
#include "mpi/mpi_lib.h"
#include "bootstrap/rendezvous.h"
#include "ffi/handlers.h"
#include "ring/ring_group.h"
#include "jaccl/jaccl_group.h"
#include "transport/ibverbs.h"

namespace nb = nanobind;
using namespace mlxdist;

namespace {

std::shared_ptr<Engine> engine_or_throw(int64_t handle) {
  auto e = find_engine(handle);
  if (!e) throw DistError("the group is closed");
  return e;
}

// Connects a world with the GIL released (start-up waits on peers) and registers it.
template <typename Connect>
int64_t add_world(Connect&& connect) {
  std::shared_ptr<Group> g;
  {
    nb::gil_scoped_release release;
    g = connect();
  }
  return add_group(std::move(g));
}

// The ring's options for a world (also the control ring of JACCL and NCCL). Python validates
// MLXDIST_TIMEOUT; this guards direct callers, since a NaN or an enormous value would overflow
// the deadline arithmetic.
ring::Options ring_options(double timeout, const std::string& token, bool verbose,
                           const std::string& transport) {
  if (!(timeout > 0) || !std::isfinite(timeout))
    fail("init: the timeout must be a positive number of seconds, got ", timeout);
  ring::Options opts;
  opts.transport = transport;
  opts.timeout_s = std::min(timeout, ring::kMaxTimeout);
  opts.token = token;
  opts.verbose = verbose;
  return opts;
}

}  // namespace

NB_MODULE(_C, m) {
  nb::exception<DistError>(m, "DistError");

  m.def(
      "init_ring",
      [](int rank, const std::vector<std::vector<std::string>>& hostfile,
         const std::vector<int>& listen_fds, double timeout, const std::string& token,
         const std::string& transport, bool verbose) {
        ring::Options opts = ring_options(timeout, token, verbose, transport);
        return add_world([&] { return ring::make_world(rank, hostfile, listen_fds, opts); });
      },
      nb::arg("rank"), nb::arg("hostfile"), nb::arg("listen_fds"), nb::arg("timeout"),
      nb::arg("token") = "", nb::arg("transport") = "auto", nb::arg("verbose") = false, "Connect this rank to the ring; returns a group handle.");

  m.def(
      "init_jaccl",
      [](int rank, const std::vector<std::vector<std::string>>& hostfile,
         const std::vector<int>& listen_fds, double timeout, const std::string& token,
         bool verbose, const std::string& transport, const std::vector<std::string>& devices,
         const std::string& ibverbs_lib, bool ring) {
        ring::Options ring_opts = ring_options(timeout, token, verbose, "tcp");
        jaccl::Options opts;
        opts.transport = transport;
        opts.devices = devices;
        if (!ibverbs_lib.empty()) opts.ibverbs_lib = ibverbs_lib;
        opts.ring = ring;
        return add_world(
            [&] { return jaccl::make_world(rank, hostfile, listen_fds, ring_opts, opts); });
      },
      nb::arg("rank"), nb::arg("hostfile"), nb::arg("listen_fds"), nb::arg("timeout"),
      nb::arg("token") = "", nb::arg("verbose") = false, nb::arg("transport") = "auto",
      nb::arg("devices") = std::vector<std::string>(), nb::arg("ibverbs_lib") = "",
      nb::arg("ring") = false,
      "Connect this rank's JACCL group (control over TCP, data over queue pairs).");
  m.def("ibverbs_available", [](const std::string& lib) {
    return ibverbs::available(lib.empty() ? "libibverbs.so.1" : lib);
  });

  m.def(
      "init_nccl",
      [](int rank, const std::vector<std::vector<std::string>>& hostfile,
         const std::vector<int>& listen_fds, double timeout, const std::string& token,
         const std::string& transport, bool verbose, const std::string& lib, int device,
         bool check) {
        ring::Options ring_opts = ring_options(timeout, token, verbose, transport);
        nccl::Options opts;
        opts.lib = lib;
        opts.device = device;
        opts.check = check;
        return add_world(
            [&] { return nccl::make_world(rank, hostfile, listen_fds, ring_opts, opts); });
      },
      nb::arg("rank"), nb::arg("hostfile"), nb::arg("listen_fds"), nb::arg("timeout"),
      nb::arg("token"), nb::arg("transport"), nb::arg("verbose"), nb::arg("lib"),
      nb::arg("device"), nb::arg("check"),
      "Connect this rank's NCCL group on CUDA device `device` (control over the TCP ring).");
  m.def("nccl_available", [](const std::string& lib) {
    std::string why;
    bool ok = nccl::available(lib, &why);
    return std::make_pair(ok, why);
  });

  m.def(
      "rendezvous",
      [](const std::string& coordinator, int rank, int size, int listen_fd, double timeout,
         const std::string& token, bool verbose) {
        if (!(timeout > 0) || !std::isfinite(timeout))
          fail("init: the timeout must be a positive number of seconds, got ", timeout);
        nb::gil_scoped_release release;
        return tcp::rendezvous(coordinator, rank, size, listen_fd,
                               std::min(timeout, ring::kMaxTimeout), token, verbose);
      },
      nb::arg("coordinator"), nb::arg("rank"), nb::arg("size"), nb::arg("listen_fd") = -1,
      nb::arg("timeout") = 300.0, nb::arg("token") = "", nb::arg("verbose") = false,
      "Meet at the coordinator (rank 0's address); returns every rank's address.");

  m.def(
      "init_mpi",
      [](const std::string& lib, double timeout) {
        if (!(timeout > 0) || !std::isfinite(timeout))
          fail("init: the timeout must be a positive number of seconds, got ", timeout);
        return add_world(
            [&] { return mpi::make_world(lib, std::min(timeout, ring::kMaxTimeout)); });
      },
      nb::arg("lib") = "", nb::arg("timeout") = 300.0,
      "Join MPI's world (loading the MPI library); returns a group handle.");
  m.def("mpi_available", [](const std::string& lib) {
    std::string why;
    bool ok = mpi::available(lib, &why);
    return std::make_pair(ok, why);
  });
  m.def("mpi_finalize", [] {
    nb::gil_scoped_release release;
    mpi::finalize();
  });

  m.def("group_info", [](int64_t handle) {
    auto e = engine_or_throw(handle);
    return std::make_tuple(e->group().rank(), e->group().size());
  });

  m.def("split", [](int64_t handle, int color, int key) {
    auto e = engine_or_throw(handle);
    std::shared_ptr<Group> child;
    {
      nb::gil_scoped_release release;
      e->run_sync("split", [&](Group& g) { child = g.split(color, key); });
    }
    return add_group(std::move(child));
  });

  // Returns once the ops queued on the group's engine have run; raises if the group failed.
  m.def("drain", [](int64_t handle) {
    nb::gil_scoped_release release;
    if (auto engine = find_engine(handle))
      engine->run_sync("waiting for earlier collectives", [](Group&) {});
  });

  // Returns a failure found after its op had returned (NCCL's watchdog) that nothing raised.
  m.def("close_group", [](int64_t handle) {
    nb::gil_scoped_release release;
    auto engine = find_engine(handle);
    remove_group(handle);  // the group is closed on its engine's thread, pending work done
    ffi_handlers::release_gpu_staging(handle);
    return engine ? engine->group().unreported_failure() : std::string();
  });

  // Test hook for the wire-header decoder: compares two raw 40-byte headers as a receiver
  // does (mine: expected, theirs: received); returns None or raises DistError.
  m.def(
      "_check_header",
      [](nb::bytes mine, nb::bytes theirs) {
        if (mine.size() != sizeof(Header) || theirs.size() != sizeof(Header))
          fail("a header is ", sizeof(Header), " bytes, got ", mine.size(), " and ", theirs.size());
        Header a, b;
        std::memcpy(&a, mine.c_str(), sizeof(Header));
        std::memcpy(&b, theirs.c_str(), sizeof(Header));
        check_header(a, b, "this rank", "the peer");
      },
      nb::arg("mine"), nb::arg("theirs"));

  m.def(
      "ffi_targets",
      [](const std::string& platform) {
        nb::dict d;
        auto targets = platform == "cuda" ? ffi_handlers::gpu_targets() : ffi_handlers::cpu_targets();
        for (auto& [name, fn] : targets) d[name.c_str()] = nb::capsule(fn);
        return d;
      },
      nb::arg("platform") = "cpu");
}
