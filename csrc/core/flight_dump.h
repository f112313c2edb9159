// Writing every live group's flight record (core/recorder.h): on request, and on SIGUSR1 from
// a thread of its own, so a rank stuck in an op (its Python thread blocked) still answers.
#pragma once

#include <string>

namespace mlxdist {

// {"rank": r, "pid": p, "time_ns": t, "groups": [{"label": ..., "ops": [...]}, ...]}
std::string flight_record_json(int rank);
// From now on SIGUSR1 writes flight_record_json(rank) to path (atomically: a complete file or
// none), or a summary to stderr when path is empty. The first call starts the writer thread;
// later calls change the path.
void dump_flight_record_on_signal(const std::string& path, int rank);

}  // namespace mlxdist
