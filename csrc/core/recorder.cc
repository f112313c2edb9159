#include "core/recorder.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <sstream>

namespace mlxdist {

namespace {

thread_local Recorder* tl_recorder = nullptr;  // the engine thread's group, while an op runs
thread_local OpRecord* tl_op = nullptr;
std::atomic<bool> g_op_log{false};
std::atomic<bool> g_recording{true};

// Numbers go through std::to_string, never `stream << integer`: a process may load another
// libstdc++ whose numeric facets our inlined stream code must not call.
std::string us(int64_t ns) {
  return ns >= 10'000'000 ? std::to_string(ns / 1'000'000) + " ms" : std::to_string(ns / 1000) + " us";
}

std::string num(int64_t v) { return std::to_string(v); }

std::string escaped(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

}  // namespace

void set_op_log(bool on) { g_op_log.store(on, std::memory_order_relaxed); }
bool op_log() { return g_op_log.load(std::memory_order_relaxed); }
void set_recording(bool on) { g_recording.store(on, std::memory_order_relaxed); }
bool recording() { return g_recording.load(std::memory_order_relaxed); }

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string OpRecord::describe() const {
  if (!has_header) return what;
  std::string d = mlxdist::describe(header);
  // Point-to-point headers say "send/recv"; what was posted says which and the peer.
  if (header.op == OpCode::kSend) return what + " " + d.substr(d.find('('));
  return d;
}

void Recorder::begin(const std::string& what, int64_t queued_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  OpRecord& r = ring_[count_ % kSlots];
  r = OpRecord{};
  r.index = ++count_;
  r.what = what;
  r.queued_ns = queued_ns;
  r.started_ns = now_ns();
  tl_recorder = this;
  tl_op = &r;
}

void Recorder::end(bool ok, const std::string& label) {
  std::string line;
  {
    std::lock_guard<std::mutex> lock(mu_);
    OpRecord& r = *tl_op;
    r.done_ns = now_ns();
    r.state = ok ? OpRecord::kDone : OpRecord::kFailed;
    const int64_t heard = r.peer_ns ? r.peer_ns : r.done_ns;
    Totals& t = totals_[r.kind()];
    t.ops++;
    t.failed += ok ? 0 : 1;
    t.bytes += r.has_header ? r.header.nbytes : 0;
    t.queued_ns += r.started_ns - r.queued_ns;
    t.waiting_ns += heard - r.started_ns;
    t.moving_ns += r.done_ns - heard;
    if (!label.empty())
      line = "[mlxdist] " + label + " op " + std::to_string(r.index) + ": " + r.describe() +
             (ok ? "" : " FAILED") + ": queued " + us(r.started_ns - r.queued_ns) + ", waiting " +
             us(heard - r.started_ns) + ", moving " + us(r.done_ns - heard) + "\n";
    tl_recorder = nullptr;
    tl_op = nullptr;
  }
  if (!line.empty()) std::fputs(line.c_str(), stderr);
}

void Recorder::note_header(const Header& h) {
  if (!tl_op || tl_op->has_header) return;
  std::lock_guard<std::mutex> lock(tl_recorder->mu_);
  tl_op->header = h;
  tl_op->has_header = true;
}

void Recorder::note_peer() {
  if (!tl_op || tl_op->peer_ns) return;
  std::lock_guard<std::mutex> lock(tl_recorder->mu_);
  tl_op->peer_ns = now_ns();
}

std::vector<OpRecord> Recorder::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<OpRecord> out;
  const uint64_t first = count_ > kSlots ? count_ - kSlots : 0;
  for (uint64_t i = first; i < count_; ++i) out.push_back(ring_[i % kSlots]);
  return out;
}

std::string Recorder::context() const {
  auto ops = snapshot();
  if (ops.empty()) return "";
  const int64_t now = now_ns();
  std::ostringstream os;
  const OpRecord& last = ops.back();
  size_t done = ops.size();
  if (last.state == OpRecord::kRunning) {  // the op that failed
    done--;
    os << "\n  in flight on this rank: op " << num(int64_t(last.index)) << ", " << last.describe() << ", for "
       << us(now - last.started_ns)
       << (last.peer_ns ? " (a peer had answered)" : " (waiting: no peer had answered)");
  }
  os << "\n  completed before it on this rank:";
  if (done == 0) os << " none";
  for (size_t k = done, shown = 0; k > 0 && shown < 3; --k, ++shown) {
    const OpRecord& r = ops[k - 1];
    os << "\n    op " << num(int64_t(r.index)) << ", " << r.describe() << ", ended " << us(now - r.done_ns)
       << " ago" << (r.state == OpRecord::kFailed ? " (failed)" : "");
  }
  return os.str();
}

std::map<std::string, Recorder::Totals> Recorder::totals() const {
  std::lock_guard<std::mutex> lock(mu_);
  return totals_;
}

std::string Recorder::json(const std::string& label) const {
  std::ostringstream os;
  os << "{\"label\": \"" << escaped(label) << "\", \"ops\": [";
  bool first = true;
  for (const OpRecord& r : snapshot()) {
    os << (first ? "" : ", ") << "{\"index\": " << num(int64_t(r.index)) << ", \"kind\": \""
       << escaped(r.kind()) << "\", \"what\": \"" << escaped(r.describe()) << "\", \"bytes\": "
       << num(r.has_header ? int64_t(r.header.nbytes) : 0) << ", \"call\": "
       << num(r.has_header ? int64_t(r.header.seq) : -1) << ", \"queued_ns\": " << num(r.queued_ns)
       << ", \"started_ns\": " << num(r.started_ns) << ", \"peer_ns\": " << num(r.peer_ns)
       << ", \"done_ns\": " << num(r.done_ns) << ", \"state\": \""
       << (r.state == OpRecord::kRunning ? "running" : r.state == OpRecord::kDone ? "done" : "failed")
       << "\"}";
    first = false;
  }
  os << "]}";
  return os.str();
}

}  // namespace mlxdist
