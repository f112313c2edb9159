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

// Start listening on addr, or adopt an already-listening inherited fd (>= 0) for it; a thread
// accepts there from then on, admitting connections that prove token (empty: no token).
// Idempotent per address, so a group can be closed and initialised again.
void ensure_listening(const Address& addr, int inherited_fd, const std::string& token);

// An authenticated connection from member src of a group, on its link.
struct Incoming {
  int src;
  int link;
  Socket sock;
};

// Connector side of the handshake: connect (retrying until the deadline), announce group, me
// and link, and prove the token both ways.
Socket handshake(const Address& a, const std::string& peer, uint64_t group, int me, int link,
                 const std::string& token, Deadline deadline);

// Acceptor side: waits until `expected` authenticated connections for `group` arrived (members
// `from`, named by names[src] when some are missing at the deadline).
std::vector<Incoming> accept_handshakes(uint64_t group, const std::vector<int>& from,
                                        size_t expected, Deadline deadline,
                                        const std::vector<std::string>& names);

// Connects this member (me) of a new group with every other member, links_per_peer sockets per
// pair: lower ranks connect to higher ones' addrs[peer][link]. names[i] labels member i.
// A non-empty token must be proven by both ends of every connection (HMAC challenge).
std::unique_ptr<TcpLinks> connect_mesh(const std::vector<std::vector<Address>>& addrs,
                                       const std::vector<std::string>& names, int me,
                                       uint64_t group, int links_per_peer, double timeout_s,
                                       const std::string& token, bool verbose);

}  // namespace mlxdist::tcp
