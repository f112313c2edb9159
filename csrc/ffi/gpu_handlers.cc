// FFI handlers for arrays on CUDA GPUs. A group with stream ops (core/group.h: NCCL) enqueues
// the op on XLA's stream; otherwise the op takes the staged path (gpu/staging.h). Binding and
// names come from the op table (ffi/ops.h) shared with the CPU handlers.
#include <exception>
#include <memory>
#include <string>

#include "core/error.h"
#include "core/registry.h"
#include "ffi/decode.h"
#include "ffi/handlers.h"
#include "ffi/ops.h"
#include "gpu/cuda_runtime.h"
#include "gpu/staging.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mlxdist::ffi_handlers {
namespace {

using gpu::Chunk;
using gpu::kChunkBytes;

// The group's engine, and its stream ops when they run an op of dtype t reducing with op.
struct Target {
  std::shared_ptr<Engine> engine;  // keeps the group alive through the call
  StreamOps* streams = nullptr;
};

Target target_for(int64_t group, const std::string& what, DType t, ReduceOp op = ReduceOp::kSum) {
  auto engine = find_engine(group);
  if (!engine) fail(what, ": the group is closed or was never initialised");
  StreamOps* s = engine->group().stream_ops();
  return Target{engine, s && s->runs(t, op) ? s : nullptr};
}

// Runs body, turning what it throws into the error XLA reports (Python raises it as
// DistributedError). Stream ops name the op and group here, as the engine does for its own.
template <typename Body>
ffi::Error guarded(int64_t group, const std::string& what, DType t, ReduceOp op, Body&& body) {
  Target tg;
  try {
    if (t == DType::kCount) fail(what, ": unsupported dtype");
    tg = target_for(group, what, t, op);
    body(tg);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    const std::string where = tg.streams ? what + " on " + tg.engine->group().label() + ": " : "";
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(kPrefix) + where + e.what());
  }
}

void down(void* stream, void* h, const void* d, size_t bytes) {
  gpu::copy(stream, h, 0, d, 0, bytes, 1, gpu::kDeviceToHost);
}
void up(void* stream, void* d, const void* h, size_t bytes) {
  gpu::copy(stream, d, 0, h, 0, bytes, 1, gpu::kHostToDevice);
}

ffi::Error all_reduce_to(void* stream, ffi::AnyBuffer x, void* y, int64_t group, int64_t reduce) {
  const DType t = to_dtype(x.element_type());
  const ReduceOp op = ReduceOp(reduce);
  const std::string what = std::string("all_") + reduce_name(op);
  const size_t count = x.element_count(), bytes = x.size_bytes();
  const uint64_t h = shape_hash(x.dimensions());
  auto d_in = static_cast<const char*>(x.untyped_data());
  auto d_out = static_cast<char*>(y);
  return guarded(group, what, t, op, [&](Target& tg) {
    if (tg.streams) return tg.streams->all_reduce_on(stream, d_in, d_out, count, t, op, h);
    if (bytes <= kChunkBytes)
      return gpu::staged(stream, *tg.engine, group, what, d_in, bytes, d_out, bytes, true,
                         [=](Group& g, void* in, void* out) { g.all_reduce(in, out, count, t, op, h); });
    const size_t es = dtype_size(t);  // in place, chunk by chunk
    gpu::chunked(
        stream, *tg.engine, group, what, count, es, bytes, 0,
        [=](const Chunk& c) { down(stream, c.in + c.first * es, d_in + c.first * es, c.elems * es); },
        [=](Group& g, const Chunk& c) {
          g.all_reduce(c.in + c.first * es, c.in + c.first * es, c.elems, t, op, h);
        },
        [=](const Chunk& c) { up(stream, d_out + c.first * es, c.in + c.first * es, c.elems * es); });
  });
}

ffi::Error AllReduce(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group, int64_t reduce) {
  return all_reduce_to(stream, x, y->untyped_data(), group, reduce);
}

ffi::Error AllGather(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group) {
  const DType t = to_dtype(x.element_type());
  const size_t count = x.element_count();
  const uint64_t h = shape_hash(x.dimensions());
  auto d_in = static_cast<const char*>(x.untyped_data());
  auto d_out = static_cast<char*>(y->untyped_data());
  const size_t in_bytes = x.size_bytes(), out_bytes = y->size_bytes();
  // Bytes: any dtype runs on the stream.
  return guarded(group, "all_gather", t == DType::kCount ? t : DType::kUInt8, ReduceOp::kSum,
                 [&](Target& tg) {
    if (tg.streams) return tg.streams->all_gather_on(stream, d_in, d_out, count, t, h);
    if (in_bytes <= kChunkBytes)
      return gpu::staged(stream, *tg.engine, group, "all_gather", d_in, in_bytes, d_out,
                         out_bytes, false,
                         [=](Group& g, void* in, void* out) { g.all_gather(in, out, count, t, h); });
    const size_t es = dtype_size(t), n = out_bytes / in_bytes;  // chunk k of every rank: one block each
    gpu::chunked(
        stream, *tg.engine, group, "all_gather", count, es, in_bytes, out_bytes,
        [=](const Chunk& c) { down(stream, c.in + c.first * es, d_in + c.first * es, c.elems * es); },
        [=](Group& g, const Chunk& c) {
          g.all_gather(c.in + c.first * es, c.out + n * c.first * es, c.elems, t, h);
        },
        [=](const Chunk& c) {  // n rows of elems, into each rank's block of the output
          gpu::copy(stream, d_out + c.first * es, count * es, c.out + n * c.first * es,
                    c.elems * es, c.elems * es, n, gpu::kHostToDevice);
        });
  });
}

ffi::Error SumScatter(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::Token>, int64_t group) {
  const DType t = to_dtype(x.element_type());
  const size_t count = y->element_count();
  const uint64_t h = shape_hash(x.dimensions());
  auto d_in = static_cast<const char*>(x.untyped_data());
  auto d_out = static_cast<char*>(y->untyped_data());
  const size_t in_bytes = x.size_bytes(), out_bytes = y->size_bytes();
  return guarded(group, "sum_scatter", t, ReduceOp::kSum, [&](Target& tg) {
    if (tg.streams)
      return tg.streams->reduce_scatter_on(stream, d_in, d_out, count, t, ReduceOp::kSum, h);
    if (out_bytes <= kChunkBytes)
      return gpu::staged(stream, *tg.engine, group, "sum_scatter", d_in, in_bytes, d_out,
                         out_bytes, false, [=](Group& g, void* in, void* out) {
                           g.reduce_scatter(in, out, count, t, ReduceOp::kSum, h);
                         });
    const size_t es = dtype_size(t), n = in_bytes / out_bytes;  // chunk k of every block together
    gpu::chunked(
        stream, *tg.engine, group, "sum_scatter", count, es, in_bytes, out_bytes,
        [=](const Chunk& c) {  // n rows of elems, from each rank's block of the input
          gpu::copy(stream, c.in + n * c.first * es, c.elems * es, d_in + c.first * es,
                    count * es, c.elems * es, n, gpu::kDeviceToHost);
        },
        [=](Group& g, const Chunk& c) {
          g.reduce_scatter(c.in + n * c.first * es, c.out + c.first * es, c.elems, t,
                           ReduceOp::kSum, h);
        },
        [=](const Chunk& c) { up(stream, d_out + c.first * es, c.out + c.first * es, c.elems * es); });
  });
}

// The output aliases x on the device, so nothing comes back.
ffi::Error Send(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer>,
                ffi::Result<ffi::Token>, int64_t group, int64_t dst, int64_t tag) {
  const DType t = to_dtype(x.element_type());
  const size_t count = x.element_count();
  const uint64_t h = shape_hash(x.dimensions());
  const std::string what = "send to rank " + std::to_string(dst);
  const void* d_in = x.untyped_data();
  return guarded(group, what, t == DType::kCount ? t : DType::kUInt8, ReduceOp::kSum,
                 [&](Target& tg) {
    if (tg.streams) return tg.streams->send_on(stream, d_in, count, t, int(dst), h, int(tag));
    gpu::staged(stream, *tg.engine, group, what, d_in, x.size_bytes(), nullptr, 0, false,
                [=](Group& g, void* in, void*) { g.send(in, count, t, int(dst), h, int(tag)); });
  });
}

ffi::Error Recv(void* stream, ffi::Token, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Token>,
                int64_t group, int64_t src, int64_t tag) {
  const DType t = to_dtype(y->element_type());
  const size_t count = y->element_count();
  const uint64_t h = shape_hash(y->dimensions());
  const std::string what = "recv from rank " + std::to_string(src);
  void* d_out = y->untyped_data();
  return guarded(group, what, t == DType::kCount ? t : DType::kUInt8, ReduceOp::kSum,
                 [&](Target& tg) {
    if (tg.streams) return tg.streams->recv_on(stream, d_out, count, t, int(src), h, int(tag));
    gpu::staged(stream, *tg.engine, group, what, nullptr, 0, d_out, y->size_bytes(), false,
                [=](Group& g, void*, void* out) { g.recv(out, count, t, int(src), h, int(tag)); });
  });
}

ffi::Error SendRecv(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                    ffi::Result<ffi::Token>, int64_t group, int64_t dst, int64_t src, int64_t tag) {
  const DType t = to_dtype(x.element_type());
  const size_t send_count = x.element_count(), recv_count = y->element_count();
  const uint64_t hs = shape_hash(x.dimensions()), hr = shape_hash(y->dimensions());
  const void* d_in = x.untyped_data();
  void* d_out = y->untyped_data();
  return guarded(group, "sendrecv", t == DType::kCount ? t : DType::kUInt8, ReduceOp::kSum,
                 [&](Target& tg) {
    if (tg.streams)
      return tg.streams->sendrecv_on(stream, d_in, send_count, int(dst), hs, d_out, recv_count,
                                     int(src), hr, t, int(tag));
    gpu::staged(stream, *tg.engine, group, "sendrecv", d_in, x.size_bytes(), d_out,
                y->size_bytes(), false, [=](Group& g, void* in, void* out) {
                  g.sendrecv(in, send_count, int(dst), hs, out, recv_count, int(src), hr, t, int(tag));
                });
  });
}

ffi::Error AllToAll(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                    ffi::Result<ffi::Token>, int64_t group, ffi::Span<const int64_t> send_sizes,
                    ffi::Span<const int64_t> recv_sizes) {
  const DType t = to_dtype(x.element_type());
  const size_t row = row_elements(x.dimensions());
  const auto sends = row_counts(send_sizes, row), recvs = row_counts(recv_sizes, row);
  const uint64_t h = shape_hash(x.dimensions(), 1);
  const void* d_in = x.untyped_data();
  void* d_out = y->untyped_data();
  return guarded(group, "all_to_all", t == DType::kCount ? t : DType::kUInt8, ReduceOp::kSum,
                 [&](Target& tg) {
    if (tg.streams) return tg.streams->all_to_all_on(stream, d_in, sends, d_out, recvs, t, h);
    gpu::staged(stream, *tg.engine, group, "all_to_all", d_in, x.size_bytes(), d_out,
                y->size_bytes(), false, [=](Group& g, void* in, void* out) {
                  g.all_to_all(in, sends, out, recvs, t, h);
                });
  });
}

// Many arrays: each one through the GPU path of all_reduce.
ffi::Error AllReduceMany(void* stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                         int64_t group, int64_t reduce) {
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    auto x = args.get<ffi::AnyBuffer>(i);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (!x.has_value() || !y.has_value())
      return ffi::Error(ffi::ErrorCode::kInternal, std::string(kPrefix) + "all_reduce: bad operands");
    ffi::Error e = all_reduce_to(stream, *x, (*y)->untyped_data(), group, reduce);
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

// Rooted collectives take the staged path on every backend.
template <typename Work>
ffi::Error rooted(void* stream, const std::string& name, ffi::AnyBuffer& x,
                  ffi::Result<ffi::AnyBuffer>& y, int64_t group, Work work) {
  const DType t = to_dtype(x.element_type());
  const void* d_in = x.untyped_data();
  void* d_out = y->untyped_data();
  return guarded(group, name, t == DType::kCount ? t : DType::kUInt8, ReduceOp::kSum,
                 [&](Target& tg) {
    gpu::staged(stream, *tg.engine, group, name, d_in, x.size_bytes(), d_out, y->size_bytes(),
                false, work);
  });
}

using Rooted = void (Group::*)(const void*, void*, size_t, DType, int, uint64_t);

ffi::Error rooted_op(void* stream, const char* name, Rooted op, ffi::AnyBuffer& x,
                     ffi::Result<ffi::AnyBuffer>& y, int64_t group, int64_t root,
                     bool block_is_output) {
  const DType t = to_dtype(x.element_type());
  const RootedBlock b = rooted_block(x, *y, block_is_output);
  return rooted(stream, name, x, y, group, [=](Group& g, void* in, void* out) {
    (g.*op)(in, out, b.count, t, int(root), b.hash);
  });
}

ffi::Error Broadcast(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group, int64_t root) {
  return rooted_op(stream, "broadcast", &Group::broadcast, x, y, group, root, false);
}

ffi::Error Gather(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                  ffi::Result<ffi::Token>, int64_t group, int64_t root) {
  return rooted_op(stream, "gather", &Group::gather, x, y, group, root, false);
}

ffi::Error Scatter(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::Token>, int64_t group, int64_t root) {
  return rooted_op(stream, "scatter", &Group::scatter, x, y, group, root, true);
}

ffi::Error Reduce(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                  ffi::Result<ffi::Token>, int64_t group, int64_t root, int64_t reduce) {
  const DType t = to_dtype(x.element_type());
  const size_t count = x.element_count();
  const uint64_t h = shape_hash(x.dimensions());
  return rooted(stream, std::string("reduce_") + reduce_name(ReduceOp(reduce)), x, y, group,
                [=](Group& g, void* in, void* out) {
                  g.reduce(in, out, count, t, ReduceOp(reduce), int(root), h);
                });
}

ffi::Error Barrier(void* stream, ffi::Token, ffi::Result<ffi::Token>, int64_t group) {
  return guarded(group, "barrier", DType::kUInt8, ReduceOp::kSum, [&](Target& tg) {
    if (tg.streams) return tg.streams->barrier_on(stream);  // waits for the group's work first
    gpu::staged(stream, *tg.engine, group, "barrier", nullptr, 0, nullptr, 0, false,
                [](Group& g, void*, void*) { g.barrier(); });
  });
}

}  // namespace

#define MLXDIST_GPU_HANDLER(fn, target, binding) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpu##fn, fn,    \
                                ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>() binding);
MLXDIST_FFI_OPS(MLXDIST_GPU_HANDLER)

std::vector<std::pair<std::string, void*>> gpu_targets() {
#define MLXDIST_GPU_TARGET(fn, target, binding) {target, reinterpret_cast<void*>(kGpu##fn)},
  return {MLXDIST_FFI_OPS(MLXDIST_GPU_TARGET)};
}

}  // namespace mlxdist::ffi_handlers
