#include "transport/outbox.h"

#include <algorithm>

#include "core/error.h"

namespace mlxdist {

void Outbox::run(std::vector<Transfer>& transfers, Deadline deadline) {
  if (pending_.empty())
    inner_->run(transfers, deadline);
  else
    run_with_pending(transfers, deadline);
  for (auto& t : transfers)
    if (t.background && !t.done()) adopt(t);
}

void Outbox::run_with_pending(std::vector<Transfer>& transfers, Deadline deadline) {
  // Pending sends go first: they were sent earlier, so their bytes lead on their link.
  std::vector<Transfer> all;
  all.reserve(pending_.size() + transfers.size());
  std::vector<std::pair<size_t, size_t>> before;
  for (auto& p : pending_) {
    before.emplace_back(p.t.seg, p.t.off);
    all.push_back(std::move(p.t));
  }
  for (auto& t : transfers) all.push_back(std::move(t));
  std::string error;
  try {
    inner_->run(all, deadline);
  } catch (const DistError& e) {
    error = e.what();
  }
  const auto now = Clock::now();
  for (size_t i = 0; i < pending_.size(); ++i) {
    pending_[i].t = std::move(all[i]);
    if (before[i] != std::make_pair(pending_[i].t.seg, pending_[i].t.off)) pending_[i].moved = now;
  }
  for (size_t i = 0; i < transfers.size(); ++i) transfers[i] = std::move(all[pending_.size() + i]);
  if (!error.empty()) throw DistError(error);
  pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                [](const Pending& p) { return p.t.done(); }),
                 pending_.end());
  check_stalls();
}

void Outbox::adopt(Transfer& t) {
  // The op's buffers go back to the caller: copy what is still to be sent (the current
  // segment whole, so the transport's view of its offsets is unchanged).
  Pending p{std::move(t), {}, Clock::now()};
  p.t.kept = true;
  for (size_t s = p.t.seg; s < p.t.segments.size(); ++s) {
    Segment& seg = p.t.segments[s];
    const char* from = static_cast<const char*>(seg.data);
    p.copies.emplace_back(from, from + seg.len);
    seg.data = p.copies.back().data();
  }
  pending_.push_back(std::move(p));
}

void Outbox::check_stalls() {
  const auto stall = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  const auto now = Clock::now();
  for (const auto& p : pending_)
    if (!p.t.done() && now - p.moved > stall)
      fail("timed out after ", timeout_s_, " s (MLXDIST_TIMEOUT) sending to ",
           describe_peer(p.t.peer), ": it did not receive (no matching recv)");
}

void Outbox::progress(Clock::duration wait) {
  std::vector<Transfer> none;
  run_with_pending(none, Clock::now() + wait);
}

void Outbox::flush() {
  while (!pending_.empty()) progress(std::chrono::milliseconds(20));
}

void Outbox::reset(const std::string& why) {
  pending_.clear();
  inner_->reset(why);
}

}  // namespace mlxdist
