// The staged path for arrays on CUDA GPUs, over any group that moves host memory (ring,
// JACCL, MPI, and NCCL for what it does not run on the stream): the input is copied to pinned
// host memory on XLA's stream, the op runs on the group's engine, and the result is copied
// back on the same stream. Pinned buffers persist per group. Errors throw DistError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "core/engine.h"

namespace mlxdist::gpu {

// Ops above this many bytes per rank run in chunks, so copies overlap the network (chunked()).
constexpr size_t kChunkBytes = 4 << 20;

using Work = std::function<void(Group&, void* host_in, void* host_out)>;

// in_bytes of d_in go to the host, work runs, out_bytes come back to d_out. in_place: the
// result is written over the staged input (one pinned buffer).
void staged(void* stream, Engine& engine, int64_t group, const std::string& what,
            const void* d_in, size_t in_bytes, void* d_out, size_t out_bytes, bool in_place,
            const Work& work);

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
void chunked(void* stream, Engine& engine, int64_t group, const std::string& what, size_t count,
             size_t width, size_t in_bytes, size_t out_bytes, const Step& down,
             const ChunkWork& work, const Step& up);

// Copies on stream; rows > 1: a block of `rows` rows of `bytes`, strided by the pitches.
void copy(void* stream, void* dst, size_t dpitch, const void* src, size_t spitch, size_t bytes,
          size_t rows, int kind);

// Frees a closed group's pinned buffers.
void release_staging(int64_t group);

}  // namespace mlxdist::gpu
