// Forming a group's connections over TCP: a process-wide acceptor owns the listening sockets
// (reused by every group this process joins) and files incoming connections by the group they
// announce, so sub-groups can form while connections for other groups wait their turn.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/tcp.h"

namespace mlxdist::tcp {

// Start listening on addr, or adopt an already-listening inherited fd (>= 0) for it.
// Idempotent per address, so a group can be closed and initialised again.
void ensure_listening(const Address& addr, int inherited_fd);

// Connects this member (me) of a new group with every other member, links_per_peer sockets per
// pair: lower ranks connect to higher ones' addrs[peer][link]. names[i] labels member i.
// A non-empty token must be proven by both ends of every connection (HMAC challenge).
std::unique_ptr<TcpLinks> connect_mesh(const std::vector<std::vector<Address>>& addrs,
                                       const std::vector<std::string>& names, int me,
                                       uint64_t group, int links_per_peer, double timeout_s,
                                       const std::string& token, bool verbose);

}  // namespace mlxdist::tcp
