// Each group's flight recorder: its last kSlots ops (what was posted, the op's header, and when
// it was queued, started, first heard from a peer and finished) in a ring, plus totals per op
// kind. The engine thread writes; error messages, Group.stats(), dump_flight_recorder and
// SIGUSR1 read. An op's time splits at the first peer header it receives: before it the rank
// waits for its peers, after it bytes move.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "core/header.h"

namespace mlxdist {

int64_t now_ns();  // wall clock, so the records of ranks on one host line up
// MLXDIST_DEBUG=ops: a line on stderr per op as it ends (process-wide).
void set_op_log(bool on);
bool op_log();
// MLXDIST_FLIGHT_RECORDER=0: no recording at all (to measure what it costs).
void set_recording(bool on);
bool recording();

struct OpRecord {
  enum State : uint8_t { kRunning, kDone, kFailed };
  uint64_t index = 0;  // the group's op number on this rank (1, 2, ...), in engine order
  std::string what;    // as posted: "all_sum", "send to rank 1"
  bool has_header = false;
  Header header;       // the op's first header: dtype, bytes, call number
  int64_t queued_ns = 0, started_ns = 0, peer_ns = 0, done_ns = 0;  // 0: not (yet)
  State state = kRunning;

  std::string kind() const { return what.substr(0, what.find(' ')); }  // "send", "all_sum"
  std::string describe() const;  // "all_sum(float32, 64 bytes, #3)"
};

class Recorder {
 public:
  static constexpr size_t kSlots = 256;

  // Engine thread: an op starts and ends; hooks below reach the running op through a
  // thread-local pointer.
  void begin(const std::string& what, int64_t queued_ns);
  // label: the group's, for the op log (empty: no line).
  void end(bool ok, const std::string& label);
  static void note_header(const Header& h);  // Calls: the op's first header
  static void note_peer();                   // header checks: a peer's header arrived

  std::vector<OpRecord> snapshot() const;  // oldest first
  // For error messages: the op in flight and the last ones completed on this rank.
  std::string context() const;

  struct Totals {
    uint64_t ops = 0, failed = 0, bytes = 0;
    int64_t queued_ns = 0, waiting_ns = 0, moving_ns = 0;
  };
  std::map<std::string, Totals> totals() const;
  // {"label": ..., "ops": [...]} for dumps (times in ns since the epoch).
  std::string json(const std::string& label) const;

 private:
  mutable std::mutex mu_;
  std::array<OpRecord, kSlots> ring_;
  uint64_t count_ = 0;  // ops begun
  std::map<std::string, Totals> totals_;
  bool debug_ = false, debug_read_ = false;
};

}  // namespace mlxdist
