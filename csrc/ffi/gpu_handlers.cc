// FFI handlers for arrays on CUDA GPUs. On an NCCL group the op is enqueued on XLA's stream
// (nccl/nccl_group.h). Otherwise, over any backend that moves host memory (ring, JACCL, MPI,
// and NCCL for what it lacks): the input is copied to pinned host memory on XLA's stream, the op
// runs on the group's engine, and the result is copied back on the same stream. Pinned buffers
// persist per group.
#include <algorithm>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "core/registry.h"
#include "ffi/decode.h"
#include "ffi/handlers.h"
#include "gpu/cuda_runtime.h"
#include "nccl/nccl_group.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mlxdist::ffi_handlers {
namespace {

struct Staging {
  std::mutex mu;  // one op at a time per group
  gpu::PinnedBuffer in, out;
  std::vector<void*> events;  // one per chunk in flight (all_reduce's pipeline)
  ~Staging() {
    for (void* e : events) gpu::cuda().EventDestroy(e);
  }
};

// Ops above this many bytes per rank run in chunks, so copies overlap the network (chunked()).
constexpr size_t kChunkBytes = 4 << 20;

std::mutex stagings_mu;
std::map<int64_t, std::shared_ptr<Staging>> stagings;

std::shared_ptr<Staging> staging(int64_t group) {
  std::lock_guard<std::mutex> lock(stagings_mu);
  auto& s = stagings[group];
  if (!s) s = std::make_shared<Staging>();
  return s;
}

using Work = std::function<void(Group&, void* host_in, void* host_out)>;

std::shared_ptr<Engine> engine_for(int64_t group, const std::string& what) {
  auto engine = find_engine(group);
  if (!engine) fail(what, ": the group is closed or was never initialised");
  return engine;
}

ffi::Error error(const std::exception& e) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(kPrefix) + e.what());
}

// The group's NCCL communicator when it has one and NCCL runs this dtype/op itself.
std::shared_ptr<nccl::NcclGroup> nccl_for(int64_t group, DType t, ReduceOp op = ReduceOp::kSum) {
  auto engine = find_engine(group);
  auto g = engine ? std::dynamic_pointer_cast<nccl::NcclGroup>(engine->group_ptr()) : nullptr;
  return g && nccl::NcclGroup::native(t, op) ? g : nullptr;
}

// Runs an enqueue on an NCCL group, naming the op and group in errors as the engine does.
template <typename Enqueue>
ffi::Error on_stream(const std::shared_ptr<nccl::NcclGroup>& g, const std::string& what, Enqueue&& enqueue) {
  try {
    enqueue(*g);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string(kPrefix) + what + " on " + g->label() + ": " + e.what());
  }
}

// in_bytes of d_in go to the host, work runs, out_bytes come back to d_out. in_place: the
// result is written over the staged input (one pinned buffer).
ffi::Error staged(void* stream, int64_t group, const std::string& what, const void* d_in,
                  size_t in_bytes, void* d_out, size_t out_bytes, bool in_place, Work work) {
  try {
    auto engine = engine_for(group, what);
    auto st = staging(group);
    std::lock_guard<std::mutex> lock(st->mu);
    gpu::Cuda& cuda = gpu::cuda();
    void* h_in = in_bytes ? st->in.get(in_bytes) : nullptr;
    void* h_out = in_place ? h_in : (out_bytes ? st->out.get(out_bytes) : nullptr);
    if (in_bytes) {
      gpu::check(cuda.MemcpyAsync(h_in, d_in, in_bytes, gpu::kDeviceToHost, stream), "cudaMemcpyAsync");
      gpu::check(cuda.StreamSynchronize(stream), "cudaStreamSynchronize");
    }
    engine->run_sync(what, [&](Group& g) { work(g, h_in, h_out); });
    if (out_bytes) {
      gpu::check(cuda.MemcpyAsync(d_out, h_out, out_bytes, gpu::kHostToDevice, stream), "cudaMemcpyAsync");
      // The pinned buffer is reused by the next op: the copy must be done before we return.
      gpu::check(cuda.StreamSynchronize(stream), "cudaStreamSynchronize");
    }
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return error(e);
  }
}

// One chunk: elements [first, first + elems) of every rank's block, and the staged buffers.
struct Chunk {
  size_t first, elems;
  char *in, *out;
};
using Step = std::function<void(const Chunk&)>;
using ChunkWork = std::function<void(Group&, const Chunk&)>;

// An op in chunks of kChunkBytes per rank through pinned buffers (out_bytes 0: in place):
// every chunk's copy down is queued at once, each chunk runs on the engine as soon as its copy
// lands, and its copy back is queued right after, so both copies overlap the network instead
// of adding to it.
ffi::Error chunked(void* stream, int64_t group, const std::string& what, size_t count,
                   size_t width, size_t in_bytes, size_t out_bytes, Step down, ChunkWork work,
                   Step up) {
  try {
    auto engine = engine_for(group, what);
    auto st = staging(group);
    std::lock_guard<std::mutex> lock(st->mu);
    gpu::Cuda& cuda = gpu::cuda();
    const size_t per_chunk = kChunkBytes / width, chunks = (count + per_chunk - 1) / per_chunk;
    char* in = static_cast<char*>(st->in.get(in_bytes));
    char* out = out_bytes ? static_cast<char*>(st->out.get(out_bytes)) : in;
    while (st->events.size() < chunks) {
      void* e = nullptr;
      gpu::check(cuda.EventCreateWithFlags(&e, gpu::kDisableTiming), "cudaEventCreateWithFlags");
      st->events.push_back(e);
    }
    auto chunk = [&](size_t k) {
      return Chunk{k * per_chunk, std::min(per_chunk, count - k * per_chunk), in, out};
    };
    std::exception_ptr failed;
    try {
      for (size_t k = 0; k < chunks; ++k) {
        down(chunk(k));
        gpu::check(cuda.EventRecord(st->events[k], stream), "cudaEventRecord");
      }
    } catch (...) {
      failed = std::current_exception();
    }
    for (size_t k = 0; k < chunks && !failed; ++k) {
      try {
        gpu::check(cuda.EventSynchronize(st->events[k]), "cudaEventSynchronize");
        engine->run_sync(what, [&](Group& g) { work(g, chunk(k)); });
        up(chunk(k));
      } catch (...) {
        failed = std::current_exception();
      }
    }
    // The pinned buffers are reused by the next op: every queued copy must be done first.
    int rc = cuda.StreamSynchronize(stream);
    if (failed) std::rethrow_exception(failed);
    gpu::check(rc, "cudaStreamSynchronize");
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return error(e);
  }
}

// Copies on stream; rows > 1: a block of `rows` rows of `bytes`, strided by the pitches.
void copy(void* stream, void* dst, size_t dpitch, const void* src, size_t spitch, size_t bytes,
          size_t rows, int kind) {
  gpu::Cuda& cuda = gpu::cuda();
  if (rows == 1)
    gpu::check(cuda.MemcpyAsync(dst, src, bytes, kind, stream), "cudaMemcpyAsync");
  else
    gpu::check(cuda.Memcpy2DAsync(dst, dpitch, src, spitch, bytes, rows, kind, stream),
               "cudaMemcpy2DAsync");
}

ffi::Error bad_dtype(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(kPrefix) + what + ": unsupported dtype");
}

ffi::Error AllReduce(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group, int64_t reduce) {
  DType t = to_dtype(x.element_type());
  std::string what = std::string("all_") + reduce_name(ReduceOp(reduce));
  if (t == DType::kCount) return bad_dtype(what);
  size_t count = x.element_count(), bytes = x.size_bytes();
  uint64_t h = shape_hash(x.dimensions());
  if (auto g = nccl_for(group, t, ReduceOp(reduce)))
    return on_stream(g, what, [&](nccl::NcclGroup& n) {
      n.all_reduce_on(stream, x.untyped_data(), y->untyped_data(), count, t, ReduceOp(reduce), h);
    });
  if (bytes > kChunkBytes) {  // in place, chunk by chunk
    const size_t es = dtype_size(t);
    auto d_in = static_cast<const char*>(x.untyped_data());
    auto d_out = static_cast<char*>(y->untyped_data());
    return chunked(
        stream, group, what, count, es, bytes, 0,
        [=](const Chunk& c) {
          copy(stream, c.in + c.first * es, 0, d_in + c.first * es, 0, c.elems * es, 1,
               gpu::kDeviceToHost);
        },
        [=](Group& g, const Chunk& c) {
          g.all_reduce(c.in + c.first * es, c.in + c.first * es, c.elems, t, ReduceOp(reduce), h);
        },
        [=](const Chunk& c) {
          copy(stream, d_out + c.first * es, 0, c.in + c.first * es, 0, c.elems * es, 1,
               gpu::kHostToDevice);
        });
  }
  return staged(stream, group, what, x.untyped_data(), bytes, y->untyped_data(), bytes, true,
                [=](Group& g, void* in, void* out) { g.all_reduce(in, out, count, t, ReduceOp(reduce), h); });
}

ffi::Error AllGather(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return bad_dtype("all_gather");
  size_t count = x.element_count();
  uint64_t h = shape_hash(x.dimensions());
  if (auto g = nccl_for(group, DType::kUInt8))  // bytes: any dtype
    return on_stream(g, "all_gather", [&](nccl::NcclGroup& n) {
      n.all_gather_on(stream, x.untyped_data(), y->untyped_data(), count, t, h);
    });
  if (x.size_bytes() > kChunkBytes) {  // chunk k of every rank lands as one block per rank
    const size_t es = dtype_size(t), n = y->size_bytes() / x.size_bytes();
    auto d_in = static_cast<const char*>(x.untyped_data());
    auto d_out = static_cast<char*>(y->untyped_data());
    return chunked(
        stream, group, "all_gather", count, es, x.size_bytes(), y->size_bytes(),
        [=](const Chunk& c) {
          copy(stream, c.in + c.first * es, 0, d_in + c.first * es, 0, c.elems * es, 1,
               gpu::kDeviceToHost);
        },
        [=](Group& g, const Chunk& c) {
          g.all_gather(c.in + c.first * es, c.out + n * c.first * es, c.elems, t, h);
        },
        [=](const Chunk& c) {  // n rows of elems, into each rank's block of the output
          copy(stream, d_out + c.first * es, count * es, c.out + n * c.first * es, c.elems * es,
               c.elems * es, n, gpu::kHostToDevice);
        });
  }
  return staged(stream, group, "all_gather", x.untyped_data(), x.size_bytes(), y->untyped_data(),
                y->size_bytes(), false,
                [=](Group& g, void* in, void* out) { g.all_gather(in, out, count, t, h); });
}

ffi::Error SumScatter(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::Token>, int64_t group) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return bad_dtype("sum_scatter");
  size_t count = y->element_count();
  uint64_t h = shape_hash(x.dimensions());
  if (auto g = nccl_for(group, t))
    return on_stream(g, "sum_scatter", [&](nccl::NcclGroup& n) {
      n.reduce_scatter_on(stream, x.untyped_data(), y->untyped_data(), count, t, ReduceOp::kSum, h);
    });
  if (y->size_bytes() > kChunkBytes) {  // chunk k of every rank's block comes down together
    const size_t es = dtype_size(t), n = x.size_bytes() / y->size_bytes();
    auto d_in = static_cast<const char*>(x.untyped_data());
    auto d_out = static_cast<char*>(y->untyped_data());
    return chunked(
        stream, group, "sum_scatter", count, es, x.size_bytes(), y->size_bytes(),
        [=](const Chunk& c) {  // n rows of elems, from each rank's block of the input
          copy(stream, c.in + n * c.first * es, c.elems * es, d_in + c.first * es, count * es,
               c.elems * es, n, gpu::kDeviceToHost);
        },
        [=](Group& g, const Chunk& c) {
          g.reduce_scatter(c.in + n * c.first * es, c.out + c.first * es, c.elems, t,
                           ReduceOp::kSum, h);
        },
        [=](const Chunk& c) {
          copy(stream, d_out + c.first * es, 0, c.out + c.first * es, 0, c.elems * es, 1,
               gpu::kHostToDevice);
        });
  }
  return staged(stream, group, "sum_scatter", x.untyped_data(), x.size_bytes(), y->untyped_data(),
                y->size_bytes(), false, [=](Group& g, void* in, void* out) {
                  g.reduce_scatter(in, out, count, t, ReduceOp::kSum, h);
                });
}

// The output aliases x on the device, so nothing comes back.
ffi::Error Send(void* stream, ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer>,
                ffi::Result<ffi::Token>, int64_t group, int64_t dst, int64_t tag) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return bad_dtype("send");
  size_t count = x.element_count();
  uint64_t h = shape_hash(x.dimensions());
  const std::string what = "send to rank " + std::to_string(dst);
  if (auto g = nccl_for(group, DType::kUInt8))  // bytes: any dtype
    return on_stream(g, what, [&](nccl::NcclGroup& n) {
      n.send_on(stream, x.untyped_data(), count, t, int(dst), h, int(tag));
    });
  return staged(stream, group, what, x.untyped_data(),
                x.size_bytes(), nullptr, 0, false,
                [=](Group& g, void* in, void*) { g.send(in, count, t, int(dst), h, int(tag)); });
}

ffi::Error Recv(void* stream, ffi::Token, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Token>,
                int64_t group, int64_t src, int64_t tag) {
  DType t = to_dtype(y->element_type());
  if (t == DType::kCount) return bad_dtype("recv");
  size_t count = y->element_count();
  uint64_t h = shape_hash(y->dimensions());
  const std::string what = "recv from rank " + std::to_string(src);
  if (auto g = nccl_for(group, DType::kUInt8))
    return on_stream(g, what, [&](nccl::NcclGroup& n) {
      n.recv_on(stream, y->untyped_data(), count, t, int(src), h, int(tag));
    });
  return staged(stream, group, what, nullptr, 0,
                y->untyped_data(), y->size_bytes(), false,
                [=](Group& g, void*, void* out) { g.recv(out, count, t, int(src), h, int(tag)); });
}

ffi::Error Barrier(void* stream, ffi::Token, ffi::Result<ffi::Token>, int64_t group) {
  if (auto g = nccl_for(group, DType::kUInt8))  // waits for the group's NCCL work first
    return on_stream(g, "barrier", [&](nccl::NcclGroup& n) { n.barrier_on(stream); });
  return staged(stream, group, "barrier", nullptr, 0, nullptr, 0, false,
                [](Group& g, void*, void*) { g.barrier(); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpuAllReduce, AllReduce,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Token>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("reduce"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpuAllGather, AllGather,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Token>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("group"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpuSumScatter, SumScatter,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Token>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("group"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpuSend, Send,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Token>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("dst")
                                  .Attr<int64_t>("tag"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpuRecv, Recv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Token>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("src")
                                  .Attr<int64_t>("tag"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kGpuBarrier, Barrier,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Token>()
                                  .Ret<ffi::Token>()
                                  .Attr<int64_t>("group"));

std::vector<std::pair<std::string, void*>> gpu_targets() {
  return {{"mlxdist_all_reduce", reinterpret_cast<void*>(kGpuAllReduce)},
          {"mlxdist_all_gather", reinterpret_cast<void*>(kGpuAllGather)},
          {"mlxdist_sum_scatter", reinterpret_cast<void*>(kGpuSumScatter)},
          {"mlxdist_send", reinterpret_cast<void*>(kGpuSend)},
          {"mlxdist_recv", reinterpret_cast<void*>(kGpuRecv)},
          {"mlxdist_barrier", reinterpret_cast<void*>(kGpuBarrier)}};
}

void release_gpu_staging(int64_t group) {
  std::lock_guard<std::mutex> lock(stagings_mu);
  stagings.erase(group);
}

}  // namespace mlxdist::ffi_handlers
