#include "bootstrap/rendezvous.h"

#include <iostream>

#include "core/error.h"
#include "bootstrap/tcp_mesh.h"

namespace mlxdist::tcp {
namespace {

constexpr uint64_t kRendezvousGroup = 0x72656e64657a76ull;  // never a real group's id
constexpr uint32_t kMaxAddress = 1024;

void write_string(int fd, const std::string& s, Deadline d, const std::string& peer) {
  uint32_t len = uint32_t(s.size());
  write_exact(fd, &len, sizeof(len), d, peer);
  write_exact(fd, s.data(), s.size(), d, peer);
}

std::string read_string(int fd, Deadline d, const std::string& peer) {
  uint32_t len = 0;
  read_exact(fd, &len, sizeof(len), d, peer);
  if (len > kMaxAddress) fail(peer, " sent an address of ", len, " bytes");
  std::string s(len, '\0');
  read_exact(fd, s.data(), len, d, peer);
  return s;
}

std::vector<std::string> collect(const std::string& coordinator, int size, Deadline deadline) {
  std::vector<std::string> names;
  std::vector<int> others;
  for (int r = 0; r < size; ++r) {
    names.push_back("rank " + std::to_string(r));
    if (r) others.push_back(r);
  }
  auto incoming = accept_handshakes(kRendezvousGroup, others, others.size(), deadline, names);
  std::vector<std::string> table(size);
  table[0] = coordinator;
  for (auto& in : incoming) {
    const std::string& who = names[in.src];
    uint32_t their_size = 0;
    read_exact(in.sock.fd(), &their_size, sizeof(their_size), deadline, who);
    if (their_size != uint32_t(size))
      fail(who, " was started for ", their_size, " ranks and rank 0 for ", size,
           " (the world size differs between ranks)");
    if (in.src < 1 || in.src >= size || !table[in.src].empty())
      fail("two processes claim to be rank ", in.src, " (the rank variable is wrong on one)");
    table[in.src] = read_string(in.sock.fd(), deadline, who);
    parse_address(table[in.src]);
  }
  for (auto& in : incoming)
    for (const auto& a : table) write_string(in.sock.fd(), a, deadline, names[in.src]);
  return table;
}

std::vector<std::string> report(const Address& coord, int rank, int size, Deadline deadline,
                                const std::string& token) {
  // Listen where rank 0's host can reach us; the acceptor keeps the socket for the mesh.
  Address mine{local_ip_towards(coord), 0};
  Socket listener = listen_on(mine);
  mine.port = bound_port(listener.fd());
  ensure_listening(mine, listener.release(), token);
  const std::string peer = "the coordinator (rank 0) at " + coord.str();
  Socket s = handshake(coord, peer, kRendezvousGroup, rank, 0, token, deadline);
  const uint32_t n = uint32_t(size);
  write_exact(s.fd(), &n, sizeof(n), deadline, peer);
  write_string(s.fd(), mine.str(), deadline, peer);
  std::vector<std::string> table;
  for (int r = 0; r < size; ++r) table.push_back(read_string(s.fd(), deadline, peer));
  return table;
}

}  // namespace

std::vector<std::string> rendezvous(const std::string& coordinator, int rank, int size,
                                    int inherited_fd, double timeout_s, const std::string& token,
                                    bool verbose) {
  if (size < 1 || rank < 0 || rank >= size) fail("rank ", rank, " is not in a world of ", size);
  const Address coord = parse_address(coordinator);
  Deadline deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(timeout_s));
  std::vector<std::string> table;
  if (rank == 0) {
    ensure_listening(coord, inherited_fd, token);
    table = collect(coordinator, size, deadline);
  } else {
    table = report(coord, rank, size, deadline, token);
  }
  if (verbose)
    std::cerr << "[jax_mlxdist] rank " << rank << ": " << size << " ranks met at the coordinator "
              << coordinator << (token.empty() ? "" : ", authenticated") << "\n";
  return table;
}

}  // namespace mlxdist::tcp
