#include "transport/tcp_mesh.h"

#include <sys/socket.h>

#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "core/error.h"

namespace mlxdist::tcp {
namespace {

constexpr uint32_t kHelloMagic = 0x4d4c4831;  // "MLH1"

// First bytes on every new connection: which group, member and link it is for.
struct Hello {
  uint32_t magic = kHelloMagic;
  uint32_t link = 0;
  uint64_t group = 0;
  uint32_t src = 0;
  uint32_t reserved = 0;
};

struct Incoming {
  int src;
  int link;
  Socket sock;
};

class Acceptor {
 public:
  static Acceptor& get() {
    static Acceptor* a = new Acceptor();  // never destroyed: keeps ports reserved until exit
    return *a;
  }

  void ensure_listening(const Address& addr, int inherited_fd) {
    std::lock_guard<std::mutex> lock(mu_);
    if (listeners_.count(addr.str())) return;
    listeners_[addr.str()] = inherited_fd >= 0 ? Socket(inherited_fd) : listen_on(addr);
  }

  // Accepts until `expected` connections for `group` arrived; others are kept for their group.
  std::vector<Incoming> accept_for(uint64_t group, int below, size_t expected, Deadline deadline,
                                   const std::vector<std::string>& names, bool verbose) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Incoming> got;
    auto range = stash_.equal_range(group);
    for (auto it = range.first; it != range.second; ++it) got.push_back(std::move(it->second));
    stash_.erase(group);
    std::vector<int> fds;
    for (auto& [_, s] : listeners_) fds.push_back(s.fd());
    if (fds.empty() && expected > 0) fail("internal: no listening socket");
    while (got.size() < expected) {
      int idx = wait_readable(fds, deadline);
      if (idx < 0) {
        std::set<int> seen;
        for (auto& in : got) seen.insert(in.src);
        std::string missing;
        for (int r = 0; r < int(names.size()); ++r)
          if (!seen.count(r) && r < below) missing += "\n  " + names[r];
        fail("timed out waiting for connections from lower ranks:", missing);
      }
      Socket s(::accept4(fds[idx], nullptr, nullptr, SOCK_CLOEXEC));
      if (!s.valid()) continue;
      Hello h;
      try {
        // A silent or foreign connection must not hold up the job for long.
        auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(5));
        read_exact(s.fd(), &h, sizeof(h), hello_deadline, "an incoming connection");
      } catch (const DistError& e) {
        if (verbose) std::cerr << "[jax_mlxdist] dropped a connection: " << e.what() << "\n";
        continue;
      }
      if (h.magic != kHelloMagic) {
        if (verbose) std::cerr << "[jax_mlxdist] dropped a connection with a bad greeting\n";
        continue;
      }
      if (h.group == group)
        got.push_back(Incoming{int(h.src), int(h.link), std::move(s)});
      else
        stash_.emplace(h.group, Incoming{int(h.src), int(h.link), std::move(s)});
    }
    return got;
  }

 private:
  std::mutex mu_;
  std::map<std::string, Socket> listeners_;
  std::multimap<uint64_t, Incoming> stash_;
};

}  // namespace

void ensure_listening(const Address& addr, int inherited_fd) {
  Acceptor::get().ensure_listening(addr, inherited_fd);
}

std::unique_ptr<TcpLinks> connect_mesh(const std::vector<std::vector<Address>>& addrs,
                                       const std::vector<std::string>& names, int me,
                                       uint64_t group, int links_per_peer, double timeout_s,
                                       bool verbose) {
  const int n = int(addrs.size());
  const int k_links = links_per_peer;
  Deadline deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(timeout_s));
  std::vector<std::vector<Socket>> sockets(n);
  for (int j = 0; j < n; ++j)
    if (j != me) sockets[j].resize(k_links);

  // Connect upwards first, then accept from below: connects complete in the peer's backlog,
  // so no rank waits on another that is itself still connecting.
  for (int j = me + 1; j < n; ++j)
    for (int k = 0; k < k_links; ++k) {
      const Address& a = addrs[j][k % addrs[j].size()];
      Socket s = connect_with_retry(a, deadline, names[j]);
      Hello h;
      h.group = group;
      h.src = uint32_t(me);
      h.link = uint32_t(k);
      write_exact(s.fd(), &h, sizeof(h), deadline, names[j]);
      sockets[j][k] = std::move(s);
    }

  auto incoming = Acceptor::get().accept_for(group, me, size_t(me) * k_links, deadline, names, verbose);
  for (auto& in : incoming) {
    if (in.src >= me || in.link >= k_links || sockets[in.src][in.link].valid())
      fail("unexpected connection claiming to be member ", in.src, " link ", in.link,
           " of this group");
    const uint32_t ack = kHelloMagic;
    write_exact(in.sock.fd(), &ack, sizeof(ack), deadline, names[in.src]);
    sockets[in.src][in.link] = std::move(in.sock);
  }

  for (int j = me + 1; j < n; ++j)
    for (int k = 0; k < k_links; ++k) {
      uint32_t ack = 0;
      read_exact(sockets[j][k].fd(), &ack, sizeof(ack), deadline, names[j]);
      if (ack != kHelloMagic) fail("bad handshake reply from ", names[j]);
    }
  if (verbose)
    std::cerr << "[jax_mlxdist] member " << me << " of group " << std::hex << group << std::dec
              << ": connected to " << n - 1 << " peers x " << k_links << " links\n";
  return std::make_unique<TcpLinks>(std::move(sockets), names, timeout_s);
}

}  // namespace mlxdist::tcp
