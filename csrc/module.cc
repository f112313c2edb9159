// The extension module: group management for Python, and the FFI targets XLA calls.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <thread>
#include <cstring>

#include "core/error.h"
#include "core/flight_dump.h"
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
#include "transport/memory.h"

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

  // Observability (core/recorder.h): per-op-kind totals, the group's recent ops as JSON, and
  // every live group's, on request or on SIGUSR1.
  m.def("group_stats", [](int64_t handle) {
    std::map<std::string, std::tuple<uint64_t, uint64_t, uint64_t, int64_t, int64_t, int64_t>> out;
    for (auto& [kind, t] : engine_or_throw(handle)->recorder().totals())
      out[kind] = {t.ops, t.failed, t.bytes, t.queued_ns, t.waiting_ns, t.moving_ns};
    return out;
  });
  m.def("group_record", [](int64_t handle) {
    auto e = engine_or_throw(handle);
    return e->recorder().json(e->group().label());
  });
  m.def("flight_record", [](int rank) { return flight_record_json(rank); });
  m.def("dump_flight_record_on_signal", &dump_flight_record_on_signal);
  m.def("set_op_log", &set_op_log);
  m.def("set_recording", &set_recording);

  // Returns once the ops queued on the group's engine have run; raises if the group failed.
  m.def("drain", [](int64_t handle) {
    nb::gil_scoped_release release;
    if (auto engine = find_engine(handle))
      engine->run_sync("drain (waiting for earlier collectives)", [](Group&) {});
  });

  // Returns a failure found after its op had returned (a send its receiver never took, NCCL's
  // watchdog) that nothing raised.
  m.def("close_group", [](int64_t handle) {
    nb::gil_scoped_release release;
    auto engine = find_engine(handle);
    remove_group(handle);  // the group is closed on its engine's thread, pending work done
    gpu::release_staging(handle);
    if (!engine) return std::string();
    if (!engine->unreported_failure().empty()) return engine->unreported_failure();
    return engine->group().unreported_failure();
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

  // Test hook: the ring algorithms for n ranks that are threads of this process, over
  // in-memory pipes of pipe_bytes each (transport/memory.h). op: all_reduce, all_gather,
  // reduce_scatter, ring_pass (send to the next rank, receive from the previous), sendrecv
  // (the same pass in one call) or all_to_all (even blocks);
  // inputs[r] is rank r's bytes. Returns each rank's output bytes.
  m.def(
      "_ring_in_memory",
      [](const std::string& op, const std::vector<nb::bytes>& given, int dtype, int reduce,
         size_t chunk_bytes, size_t small_bytes, size_t pipe_bytes) {
        std::vector<std::string> inputs;
        for (const auto& b : given) inputs.emplace_back(b.c_str(), b.size());
        const int n = int(inputs.size());
        const DType t = DType(dtype);
        const size_t es = dtype_size(t);
        std::vector<std::string> outputs(n), errors(n);
        for (int r = 0; r < n; ++r) {
          const size_t bytes = inputs[r].size();
          outputs[r].resize(op == "all_gather" ? n * bytes
                            : op == "reduce_scatter" ? bytes / std::max(n, 1) : bytes);
        }
        {
          nb::gil_scoped_release release;
          auto hub = std::make_shared<memory::Hub>(pipe_bytes);
          std::vector<std::thread> ranks;
          for (int r = 0; r < n; ++r)
            ranks.emplace_back([&, r] {
              ring::Options opts;
              opts.timeout_s = 30;
              opts.chunk_bytes = chunk_bytes;
              opts.small_bytes = small_bytes;
              ring::RingGroup g(0x7465737400ull, r, n,
                                std::make_unique<memory::MemoryLinks>(hub, r, 2, opts.timeout_s),
                                opts);
              try {
                const char* in = inputs[r].data();
                char* out = outputs[r].data();
                const size_t bytes = inputs[r].size(), out_bytes = outputs[r].size();
                if (op == "all_reduce") g.all_reduce(in, out, bytes / es, t, ReduceOp(reduce), 1);
                else if (op == "all_gather") g.all_gather(in, out, bytes / es, t, 1);
                else if (op == "reduce_scatter") g.reduce_scatter(in, out, out_bytes / es, t, ReduceOp(reduce), 1);
                else if (op == "ring_pass") {
                  g.send(in, bytes / es, t, (r + 1) % n, 1, 0);
                  g.recv(out, bytes / es, t, (r + n - 1) % n, 1, 0);
                } else if (op == "sendrecv") {
                  g.sendrecv(in, bytes / es, (r + 1) % n, 1, out, bytes / es, (r + n - 1) % n, 1, t, 0);
                } else if (op == "all_to_all") {
                  std::vector<size_t> counts(n, bytes / es / n);
                  g.all_to_all(in, counts, out, counts, t, 1);
                } else fail("unknown op ", op);
                g.flush_sends();  // as the engine does before a group closes
              } catch (const std::exception& e) {
                errors[r] = e.what();
                g.abort(e.what());  // as the engine does: the other ranks stop waiting on it
              }
            });
          for (auto& th : ranks) th.join();
        }
        for (int r = 0; r < n; ++r)
          if (!errors[r].empty()) fail("rank ", r, ": ", errors[r]);
        std::vector<nb::bytes> out;
        for (auto& o : outputs) out.emplace_back(o.data(), o.size());
        return out;
      },
      nb::arg("op"), nb::arg("inputs"), nb::arg("dtype"), nb::arg("reduce") = 0,
      nb::arg("chunk_bytes") = 512 << 10, nb::arg("small_bytes") = 64 << 10,
      nb::arg("pipe_bytes") = 1 << 20);

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
