#include "core/header.h"

#include <sstream>

#include "core/error.h"
#include "core/recorder.h"

namespace mlxdist {

namespace {

std::string describe_as(const Header& h, const char* p2p) {
  std::ostringstream os;
  switch (h.op) {
    case OpCode::kAllReduce: os << "all_" << reduce_name(h.reduce); break;
    case OpCode::kAllGather: os << "all_gather"; break;
    case OpCode::kReduceScatter: os << (h.reduce == ReduceOp::kSum ? "sum_scatter" : "reduce_scatter"); break;
    case OpCode::kSend: os << p2p; break;
    case OpCode::kBarrier: os << "barrier"; break;
    case OpCode::kSplit: os << "split"; break;
    case OpCode::kSetup: os << "group set-up"; break;
    case OpCode::kAllToAll: os << "all_to_all"; break;
    case OpCode::kBroadcast: os << "broadcast"; break;
    case OpCode::kReduce: os << "reduce_" << reduce_name(h.reduce); break;
    case OpCode::kGather: os << "gather"; break;
    case OpCode::kScatter: os << "scatter"; break;
    default: os << "op#" << std::to_string(int(h.op));
  }
  os << "(" << dtype_name(h.dtype) << ", " << std::to_string(h.nbytes) << " bytes, shape#"
     << hex(h.shape_hash & 0xffff) << ", call #" << std::to_string(h.seq);
  const bool rooted = h.op == OpCode::kBroadcast || h.op == OpCode::kReduce ||
                      h.op == OpCode::kGather || h.op == OpCode::kScatter;
  if (rooted) os << ", root " << std::to_string(int(h.tag));
  else if (h.tag) os << ", a tangent of order " << std::to_string(int(h.tag));
  os << ")";
  return os.str();
}

}  // namespace

std::string describe(const Header& h) { return describe_as(h, "send/recv"); }

void check_header(const Header& mine, const Header& theirs, const std::string& me,
                  const std::string& peer) {
  Recorder::note_peer();  // a peer has reached the op: the wait is over
  if (theirs.magic != kHeaderMagic)
    fail("received bytes that are not a jax_mlxdist message from ", peer,
         " (stream out of step after an earlier error, or a foreign peer)");
  if (theirs.group != mine.group)
    fail("group mismatch: ", me, " is in group ", hex(mine.group), " but ", peer,
         " sent a message for group ", hex(theirs.group));
  if (theirs.op != mine.op || theirs.dtype != mine.dtype || theirs.reduce != mine.reduce ||
      theirs.seq != mine.seq || theirs.tag != mine.tag || theirs.nbytes != mine.nbytes || theirs.shape_hash != mine.shape_hash) {
    // Point-to-point headers are checked by the receiver: mine is a recv, theirs a send.
    const bool p2p = mine.op == OpCode::kSend;
    fail(p2p && theirs.op == OpCode::kSend ? "send/recv mismatch: " : "collective mismatch: ",
         me, " called ", describe_as(mine, "recv"), " but ", peer, " called ",
         describe_as(theirs, "send"));
  }
}

void check_headers(const Header& mine, const std::vector<Header>& all, int me,
                   const std::function<std::string(int)>& name) {
  for (int p = 0; p < int(all.size()); ++p)
    if (p != me) check_header(mine, all[size_t(p)], "this rank", name(p));
}

}  // namespace mlxdist
