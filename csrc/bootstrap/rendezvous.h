// Start-up without a hostfile: rank 0 listens on a known coordinator address, every other rank
// listens on a fresh port and reports its address there, and rank 0 hands the whole table back.
#pragma once

#include <string>
#include <vector>

namespace mlxdist::tcp {

// Every rank's listening address ("ip:port"), in rank order. Rank 0 listens on coordinator
// (or adopts inherited_fd, already listening there); the others listen on the address that
// routes to it. Ranks may start in any order and late: each waits up to timeout_s. The
// exchange runs over authenticated connections when token is set.
std::vector<std::string> rendezvous(const std::string& coordinator, int rank, int size,
                                    int inherited_fd, double timeout_s, const std::string& token,
                                    bool verbose);

}  // namespace mlxdist::tcp
