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
#include "core/settings.h"
#include "mpi/mpi_group.h"
#include "nccl/nccl_group.h"
#include "nccl/nccl_lib.h"
#include "mpi/mpi_lib.h"
#include "bootstrap/rendezvous.h"
#include "ffi/handlers.h"
#include "gpu/staging.h"
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

// The ring's options for a world (also the control ring of JACCL and NCCL). Python checks the
// timeout; this guards direct callers, since a NaN or an enormous value would overflow the
// deadline arithmetic.
ring::Options ring_options(const Settings& s, const std::string& transport) {
  if (!(s.timeout_s > 0) || !std::isfinite(s.timeout_s))
    fail("init: the timeout must be a positive number of seconds, got ", s.timeout_s);
  ring::Options opts;
  opts.transport = transport;
  opts.timeout_s = std::min(s.timeout_s, ring::kMaxTimeout);
  opts.token = s.token;
  opts.verbose = s.verbose;
  return opts;
}

std::shared_ptr<Group> connect(const std::string& backend, int rank,
                               const std::vector<std::vector<std::string>>& hostfile,
                               const std::vector<int>& listen_fds, const Settings& s,
                               const std::vector<std::string>& devices) {
  if (backend == "ring")
    return ring::make_world(rank, hostfile, listen_fds, ring_options(s, s.transport));
  if (backend == "jaccl") {
    jaccl::Options opts;
    opts.transport = s.jaccl_transport;
    opts.devices = devices;
    if (!s.ibverbs_lib.empty()) opts.ibverbs_lib = s.ibverbs_lib;
    opts.gid_index = s.ibv_gid_index;
    opts.ring = s.jaccl_ring;
    // The control ring over TCP: the data goes over the queue pairs.
    return jaccl::make_world(rank, hostfile, listen_fds, ring_options(s, "tcp"), opts);
  }
  if (backend == "nccl") {
    nccl::Options opts;
    opts.lib = s.nccl_lib;
    opts.device = s.nccl_device;
    opts.check = s.nccl_check;
    return nccl::make_world(rank, hostfile, listen_fds, ring_options(s, s.transport), opts);
  }
  if (backend == "mpi") return mpi::make_world(s.mpi_lib, ring_options(s, "tcp").timeout_s);
  fail("unknown backend \"", backend, "\"");
}

}  // namespace

NB_MODULE(_C, m) {
  nb::exception<DistError>(m, "DistError");

  nb::class_<Settings>(m, "Settings", "A world's configuration (built by _config.settings()).")
      .def(nb::init<>())
      .def_rw("timeout_s", &Settings::timeout_s)
      .def_rw("token", &Settings::token)
      .def_rw("verbose", &Settings::verbose)
      .def_rw("transport", &Settings::transport)
      .def_rw("jaccl_transport", &Settings::jaccl_transport)
      .def_rw("jaccl_ring", &Settings::jaccl_ring)
      .def_rw("ibverbs_lib", &Settings::ibverbs_lib)
      .def_rw("ibv_gid_index", &Settings::ibv_gid_index)
      .def_rw("nccl_lib", &Settings::nccl_lib)
      .def_rw("nccl_device", &Settings::nccl_device)
      .def_rw("nccl_check", &Settings::nccl_check)
      .def_rw("mpi_lib", &Settings::mpi_lib);

  m.def(
      "connect",
      [](const std::string& backend, int rank, const std::vector<std::vector<std::string>>& hostfile,
         const std::vector<int>& listen_fds, const Settings& settings,
         const std::vector<std::string>& devices) {
        return add_world([&] { return connect(backend, rank, hostfile, listen_fds, settings, devices); });
      },
      nb::arg("backend"), nb::arg("rank"), nb::arg("hostfile"), nb::arg("listen_fds"),
      nb::arg("settings"), nb::arg("devices") = std::vector<std::string>(),
      "Connect this rank's world on backend ring, jaccl, nccl or mpi (mpi ignores the hostfile); "
      "returns a group handle.");
  m.def("ibverbs_available", [](const std::string& lib) {
    return ibverbs::available(lib.empty() ? "libibverbs.so.1" : lib);
  });

  m.def("nccl_available", [](const std::string& lib) {
    std::string why;
    bool ok = nccl::available(lib, &why);
    return std::make_pair(ok, why);
  });

  m.def(
      "rendezvous",
      [](const std::string& coordinator, int rank, int size, int listen_fd, const Settings& s) {
        const ring::Options opts = ring_options(s, "tcp");
        nb::gil_scoped_release release;
        return tcp::rendezvous(coordinator, rank, size, listen_fd, opts.timeout_s, opts.token,
                               opts.verbose);
      },
      nb::arg("coordinator"), nb::arg("rank"), nb::arg("size"), nb::arg("listen_fd"),
      nb::arg("settings"), "Meet at the coordinator (rank 0's address); returns every rank's address.");

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
    gpu::release_staging(handle);
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
