// Ring algorithms over a Links transport. Every buffer is split in two halves that travel the
// ring in opposite directions at once, each in chunks; every chunk is framed by the op header,
// which the receiver checks before touching the payload.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "core/header.h"
#include "core/transfer.h"

namespace mlxdist::ring {

struct Context {
  Links& links;
  int rank;
  int size;
  Header header;       // the op's header, sent with every chunk and expected in every chunk
  Deadline deadline;    // the op's first wait may last until then
  Clock::duration stall;  // MLXDIST_TIMEOUT: every later wait (one per ring step) restarts it
  std::string me;      // "rank 0 of <group>" for messages
  size_t chunk_bytes;  // payload per frame
};

// Element ranges per direction (0: to rank+1, 1: to rank-1) and block (one block per rank).
struct Layout {
  std::vector<size_t> off[2], cnt[2];
  // count elements: each half split into size() near-equal blocks.
  static Layout split_halves(size_t count, int nblocks);
  // nblocks blocks of block_count elements, each split into two halves.
  static Layout blocks_of(size_t block_count, int nblocks);
};

// Afterwards this rank's block (both halves) of out holds the reduction of in over all ranks;
// other blocks of out hold partial sums (in and out may be one buffer). scratch is resized as
// needed. wire is the dtype of in and out (float32 for widened halves).
void reduce_scatter(Context& ctx, const char* in, char* out, DType wire, ReduceOp op,
                    const Layout& layout, std::vector<char>& scratch);
// buf holds this rank's block; afterwards it holds every rank's block.
void all_gather(Context& ctx, char* buf, size_t esize, const Layout& layout);
// Point-to-point, framed like the collectives. Send returns once the transport took what it
// could at once; the links (an Outbox) keep the rest and move it during later runs.
void send(Context& ctx, const void* buf, size_t bytes, int dst);
void recv(Context& ctx, void* buf, size_t bytes, int src);
// Both at once, each with its own header (a send's to dst, a recv's from src).
void sendrecv(Context& ctx, const Header& send_h, const void* in, size_t send_bytes, int dst,
              const Header& recv_h, void* out, size_t recv_bytes, int src);
// A rooted collective's exchange: root with every member at once, each member with root;
// to[p]/from[p] (data, bytes) for and from member p. Both directions carry the header.
void star(Context& ctx, int root, const std::vector<std::pair<const void*, size_t>>& to,
          const std::vector<std::pair<void*, size_t>>& from);
// Every pair at once; send_at/recv_at: byte offsets of each rank's block (size + 1 entries).
// The own block is the caller's to copy.
void all_to_all(Context& ctx, const char* in, const std::vector<size_t>& send_at, char* out,
                const std::vector<size_t>& recv_at);

}  // namespace mlxdist::ring
