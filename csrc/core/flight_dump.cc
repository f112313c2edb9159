#include "core/flight_dump.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/registry.h"

namespace mlxdist {

namespace {

int wake_fd[2] = {-1, -1};
std::mutex mu;
std::string dump_path;
int dump_rank = 0;

void on_signal(int) {
  const int saved = errno;
  char c = 1;
  (void)!write(wake_fd[1], &c, 1);  // async-signal-safe; the writer thread does the rest
  errno = saved;
}

void write_dump() {
  std::string path;
  int rank;
  {
    std::lock_guard<std::mutex> lock(mu);
    path = dump_path;
    rank = dump_rank;
  }
  const std::string text = flight_record_json(rank);
  if (path.empty()) {
    std::fprintf(stderr, "[mlxdist] flight record of rank %d: %s\n", rank, text.c_str());
    return;
  }
  const std::string tmp = path + ".tmp";
  if (FILE* f = std::fopen(tmp.c_str(), "w")) {
    std::fputs(text.c_str(), f);
    std::fclose(f);
    std::rename(tmp.c_str(), path.c_str());
  }
}

}  // namespace

std::string flight_record_json(int rank) {
  std::ostringstream os;
  // std::to_string, not `stream << integer` (see recorder.cc).
  os << "{\"rank\": " << std::to_string(rank) << ", \"pid\": " << std::to_string(getpid())
     << ", \"time_ns\": " << std::to_string(now_ns()) << ", \"groups\": [";
  bool first = true;
  for (const auto& engine : live_engines()) {
    os << (first ? "" : ", ") << engine->recorder().json(engine->group().label());
    first = false;
  }
  os << "]}";
  return os.str();
}

void dump_flight_record_on_signal(const std::string& path, int rank) {
  std::lock_guard<std::mutex> lock(mu);
  dump_path = path;
  dump_rank = rank;
  if (wake_fd[0] >= 0) return;
  if (pipe2(wake_fd, O_CLOEXEC) != 0) return;
  std::thread([] {
    pthread_setname_np(pthread_self(), "mlxdist-dump");
    // Only this thread takes the signal's work; the handler itself just wakes it.
    char c;
    for (;;) {
      ssize_t n = read(wake_fd[0], &c, 1);
      if (n == 1) write_dump();
      else if (n < 0 && errno != EINTR) return;
    }
  }).detach();
  struct sigaction old = {};
  sigaction(SIGUSR1, nullptr, &old);
  if (old.sa_handler != SIG_DFL) return;  // the program handles SIGUSR1 itself
  struct sigaction sa = {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGUSR1, &sa, nullptr);
}

}  // namespace mlxdist
