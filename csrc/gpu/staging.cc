#include "gpu/staging.h"

#include <algorithm>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "gpu/cuda_runtime.h"

namespace mlxdist::gpu {
namespace {

struct Staging {
  std::mutex mu;  // one op at a time per group
  PinnedBuffer in, out;
  std::vector<void*> events;  // one per chunk in flight (all_reduce's pipeline)
  ~Staging() {
    for (void* e : events) cuda().EventDestroy(e);
  }
};

std::mutex stagings_mu;
std::map<int64_t, std::shared_ptr<Staging>> stagings;

std::shared_ptr<Staging> staging(int64_t group) {
  std::lock_guard<std::mutex> lock(stagings_mu);
  auto& s = stagings[group];
  if (!s) s = std::make_shared<Staging>();
  return s;
}

}  // namespace

void staged(void* stream, Engine& engine, int64_t group, const std::string& what,
            const void* d_in, size_t in_bytes, void* d_out, size_t out_bytes, bool in_place,
            const Work& work) {
  auto st = staging(group);
  std::lock_guard<std::mutex> lock(st->mu);
  Cuda& rt = cuda();
  void* h_in = in_bytes ? st->in.get(in_bytes) : nullptr;
  void* h_out = in_place ? h_in : (out_bytes ? st->out.get(out_bytes) : nullptr);
  if (in_bytes) {
    check(rt.MemcpyAsync(h_in, d_in, in_bytes, kDeviceToHost, stream), "cudaMemcpyAsync");
    check(rt.StreamSynchronize(stream), "cudaStreamSynchronize");
  }
  engine.run_sync(what, [&](Group& g) { work(g, h_in, h_out); });
  if (out_bytes) {
    check(rt.MemcpyAsync(d_out, h_out, out_bytes, kHostToDevice, stream), "cudaMemcpyAsync");
    // The pinned buffer is reused by the next op: the copy must be done before we return.
    check(rt.StreamSynchronize(stream), "cudaStreamSynchronize");
  }
}

void chunked(void* stream, Engine& engine, int64_t group, const std::string& what, size_t count,
             size_t width, size_t in_bytes, size_t out_bytes, const Step& down,
             const ChunkWork& work, const Step& up) {
  auto st = staging(group);
  std::lock_guard<std::mutex> lock(st->mu);
  Cuda& rt = cuda();
  const size_t per_chunk = kChunkBytes / width, chunks = (count + per_chunk - 1) / per_chunk;
  char* in = static_cast<char*>(st->in.get(in_bytes));
  char* out = out_bytes ? static_cast<char*>(st->out.get(out_bytes)) : in;
  while (st->events.size() < chunks) {
    void* e = nullptr;
    check(rt.EventCreateWithFlags(&e, kDisableTiming), "cudaEventCreateWithFlags");
    st->events.push_back(e);
  }
  auto chunk = [&](size_t k) {
    return Chunk{k * per_chunk, std::min(per_chunk, count - k * per_chunk), in, out};
  };
  std::exception_ptr failed;
  try {
    for (size_t k = 0; k < chunks; ++k) {
      down(chunk(k));
      check(rt.EventRecord(st->events[k], stream), "cudaEventRecord");
    }
  } catch (...) {
    failed = std::current_exception();
  }
  for (size_t k = 0; k < chunks && !failed; ++k) {
    try {
      check(rt.EventSynchronize(st->events[k]), "cudaEventSynchronize");
      engine.run_sync(what, [&](Group& g) { work(g, chunk(k)); });
      up(chunk(k));
    } catch (...) {
      failed = std::current_exception();
    }
  }
  // The pinned buffers are reused by the next op: every queued copy must be done first.
  int rc = rt.StreamSynchronize(stream);
  if (failed) std::rethrow_exception(failed);
  check(rc, "cudaStreamSynchronize");
}

void copy(void* stream, void* dst, size_t dpitch, const void* src, size_t spitch, size_t bytes,
          size_t rows, int kind) {
  Cuda& rt = cuda();
  if (rows == 1)
    check(rt.MemcpyAsync(dst, src, bytes, kind, stream), "cudaMemcpyAsync");
  else
    check(rt.Memcpy2DAsync(dst, dpitch, src, spitch, bytes, rows, kind, stream),
          "cudaMemcpy2DAsync");
}

void release_staging(int64_t group) {
  std::lock_guard<std::mutex> lock(stagings_mu);
  stagings.erase(group);
}

}  // namespace mlxdist::gpu
