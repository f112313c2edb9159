#include "transport/tcp_mesh.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <iostream>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <set>

#include "core/error.h"
#include "transport/auth.h"

namespace mlxdist::tcp {
namespace {

constexpr uint32_t kHelloMagic = 0x4d4c4832;  // "MLH2"
constexpr uint32_t kHasToken = 1;
// A connection must greet and answer its challenge within this; port scans and slow-loris
// connections are dropped after it without holding up the ranks that do greet.
constexpr auto kHandshakeStage = std::chrono::seconds(5);
constexpr size_t kMaxPending = 256;

// First bytes on every new connection: which group, member and link it is for.
struct Hello {
  uint32_t magic = kHelloMagic;
  uint32_t link = 0;
  uint64_t group = 0;
  uint32_t src = 0;
  uint32_t flags = 0;
  auth::Nonce nonce{};
};
// The acceptor's answer: its nonce and its own proof of the token (so both sides are checked).
struct Challenge {
  uint32_t magic = kHelloMagic;
  uint32_t flags = 0;
  auth::Nonce nonce{};
  auth::Mac mac{};
};
static_assert(sizeof(Hello) == 40 && sizeof(Challenge) == 56, "wire format");

auth::Mac prove(const std::string& token, const char* who, const Hello& h, const auth::Nonce& n) {
  if (token.empty()) return auth::Mac{};
  return auth::hmac(token, who, &h, sizeof(h), n.data(), n.size());
}

void log_refused(const std::string& from, const std::string& why) {
  std::cerr << "[jax_mlxdist] refused a connection from " << from << ": " << why << std::endl;
}

std::string peer_address(int fd) {
  sockaddr_in sa{};
  socklen_t len = sizeof(sa);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0) return "an unknown peer";
  char ip[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof(ip));
  return std::string(ip) + ":" + std::to_string(ntohs(sa.sin_port));
}

// A connection part-way through its handshake. Bytes arrive without blocking anyone.
struct Pending {
  Socket sock;
  std::string from;
  bool greeted = false;  // Hello received, challenge sent, waiting for the proof
  Hello hello;
  auth::Nonce nonce{};
  std::array<uint8_t, 40> buf{};
  size_t got = 0;
  Deadline until;
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
    Socket s = inherited_fd >= 0 ? Socket(inherited_fd) : listen_on(addr);
    tune_for_data(s.fd());  // non-blocking accepts
    listeners_[addr.str()] = std::move(s);
  }

  // Completes handshakes until `expected` authenticated connections for `group` arrived;
  // authenticated connections for other groups are kept for them.
  std::vector<Incoming> accept_for(uint64_t group, const std::vector<int>& from, size_t expected,
                                   Deadline deadline, const std::vector<std::string>& names,
                                   const std::string& token) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Incoming> got;
    auto range = stash_.equal_range(group);
    for (auto it = range.first; it != range.second; ++it) got.push_back(std::move(it->second));
    stash_.erase(group);
    while (got.size() < expected) {
      std::vector<pollfd> pfds;
      for (auto& [_, s] : listeners_) pfds.push_back(pollfd{s.fd(), POLLIN, 0});
      Deadline wake = deadline;
      for (auto& p : pending_) {
        pfds.push_back(pollfd{p.sock.fd(), POLLIN, 0});
        wake = std::min(wake, p.until);
      }
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wake - Clock::now()).count();
      ::poll(pfds.data(), pfds.size(), int(std::max<long long>(0, ms)));
      size_t i = 0;
      for (auto& [_, s] : listeners_)
        if (pfds[i++].revents) accept_new(s.fd());
      for (auto it = pending_.begin(); it != pending_.end(); ++i) {
        bool keep = pfds.size() > i && pfds[i].revents ? advance(*it, group, token, got)
                                                        : Clock::now() < it->until;
        if (!keep && it->sock.valid()) log_refused(it->from, "no complete greeting in time");
        it = keep ? std::next(it) : pending_.erase(it);
      }
      if (got.size() < expected && Clock::now() >= deadline) {
        std::set<int> seen;
        for (auto& in : got) seen.insert(in.src);
        std::string missing;
        for (int r : from)
          if (!seen.count(r)) missing += "\n  " + names[r];
        fail("timed out waiting for connections from:", missing);
      }
    }
    return got;
  }

 private:
  void accept_new(int listener) {
    for (;;) {
      Socket s(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!s.valid()) return;
      std::string from = peer_address(s.fd());
      if (pending_.size() >= kMaxPending) {
        log_refused(from, "too many unfinished handshakes");
        continue;
      }
      pending_.push_back(Pending{std::move(s), from});
      pending_.back().until = Clock::now() + kHandshakeStage;
    }
  }

  // Reads what arrived; returns false when the connection is finished with (filed or refused).
  bool advance(Pending& p, uint64_t group, const std::string& token, std::vector<Incoming>& got) {
    const size_t want = p.greeted ? sizeof(auth::Mac) : sizeof(Hello);
    ssize_t n = ::recv(p.sock.fd(), p.buf.data() + p.got, want - p.got, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
      log_refused(p.from, "closed during the handshake");
      p.sock.close();
      return false;
    }
    if (n > 0) p.got += size_t(n);
    if (p.got < want) return Clock::now() < p.until;
    p.got = 0;
    if (!p.greeted) {
      std::memcpy(&p.hello, p.buf.data(), sizeof(Hello));
      if (p.hello.magic != kHelloMagic) {
        log_refused(p.from, "not a jax_mlxdist greeting");
        p.sock.close();
        return false;
      }
      Challenge c;
      c.flags = token.empty() ? 0 : kHasToken;
      if (bool(p.hello.flags & kHasToken) != !token.empty()) {
        // Say which side has a token (best effort), so the connector can report it.
        ::send(p.sock.fd(), &c, sizeof(c), MSG_NOSIGNAL | MSG_DONTWAIT);
        log_refused(p.from, token.empty() ? "it proves a job token (MLXDIST_TOKEN) and this rank has none"
                                          : "it has no job token (MLXDIST_TOKEN) and this rank requires one");
        p.sock.close();
        return false;
      }
      c.nonce = p.nonce = auth::random_nonce();
      c.mac = prove(token, "server", p.hello, c.nonce);
      try {
        write_exact(p.sock.fd(), &c, sizeof(c), Clock::now() + kHandshakeStage, p.from);
      } catch (const DistError&) {
        p.sock.close();
        return false;
      }
      p.greeted = true;
      p.until = Clock::now() + kHandshakeStage;
      return true;
    }
    auth::Mac proof;
    std::memcpy(proof.data(), p.buf.data(), proof.size());
    if (!auth::equal(proof, prove(token, "client", p.hello, p.nonce))) {
      log_refused(p.from, "wrong job token (MLXDIST_TOKEN)");
      p.sock.close();
      return false;
    }
    Incoming in{int(p.hello.src), int(p.hello.link), std::move(p.sock)};
    if (p.hello.group == group)
      got.push_back(std::move(in));
    else
      stash_.emplace(p.hello.group, std::move(in));
    return false;
  }

  std::mutex mu_;
  std::map<std::string, Socket> listeners_;
  std::list<Pending> pending_;
  std::multimap<uint64_t, Incoming> stash_;
};

}  // namespace

// Connector side: greet, check the acceptor's proof, prove our own.
Socket handshake(const Address& a, const std::string& peer, uint64_t group, int me, int link,
                 const std::string& token, Deadline deadline) {
  Socket s = connect_with_retry(a, deadline, peer);
  Hello h;
  h.group = group;
  h.src = uint32_t(me);
  h.link = uint32_t(link);
  h.flags = token.empty() ? 0 : kHasToken;
  h.nonce = auth::random_nonce();
  write_exact(s.fd(), &h, sizeof(h), deadline, peer);
  Challenge c;
  read_exact(s.fd(), &c, sizeof(c), deadline, peer);
  if (c.magic != kHelloMagic) fail(peer, " at ", a.str(), " is not a jax_mlxdist rank");
  if (bool(c.flags & kHasToken) != !token.empty())
    fail(peer, token.empty() ? " requires a job token (MLXDIST_TOKEN) and this rank has none"
                             : " has no job token (MLXDIST_TOKEN) and this rank requires one");
  if (!auth::equal(c.mac, prove(token, "server", h, c.nonce)))
    fail(peer, " failed to prove the job token: MLXDIST_TOKEN differs between the ranks");
  auth::Mac proof = prove(token, "client", h, c.nonce);
  write_exact(s.fd(), proof.data(), proof.size(), deadline, peer);
  return s;
}

std::vector<Incoming> accept_handshakes(uint64_t group, const std::vector<int>& from,
                                        size_t expected, Deadline deadline,
                                        const std::vector<std::string>& names,
                                        const std::string& token) {
  return Acceptor::get().accept_for(group, from, expected, deadline, names, token);
}

void ensure_listening(const Address& addr, int inherited_fd) {
  Acceptor::get().ensure_listening(addr, inherited_fd);
}

std::unique_ptr<TcpLinks> connect_mesh(const std::vector<std::vector<Address>>& addrs,
                                       const std::vector<std::string>& names, int me,
                                       uint64_t group, int links_per_peer, double timeout_s,
                                       const std::string& token, bool verbose) {
  const int n = int(addrs.size());
  const int k_links = links_per_peer;
  Deadline deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(timeout_s));
  std::vector<std::vector<Socket>> sockets(n);
  for (int j = 0; j < n; ++j)
    if (j != me) sockets[j].resize(k_links);

  // Connect upwards first, then accept from below. A connector waits for its acceptor's
  // challenge, but only ever on higher ranks, and the highest rank only accepts: no cycle.
  for (int j = me + 1; j < n; ++j)
    for (int k = 0; k < k_links; ++k)
      sockets[j][k] = handshake(addrs[j][k % addrs[j].size()], names[j], group, me, k, token, deadline);

  std::vector<int> lower(me);
  std::iota(lower.begin(), lower.end(), 0);
  auto incoming = accept_handshakes(group, lower, size_t(me) * k_links, deadline, names, token);
  for (auto& in : incoming) {
    if (in.src >= me || in.link >= k_links || sockets[in.src][in.link].valid())
      fail("unexpected connection claiming to be member ", in.src, " link ", in.link,
           " of this group");
    const uint32_t ack = kHelloMagic;
    write_exact(in.sock.fd(), &ack, sizeof(ack), deadline, names[in.src]);
    sockets[in.src][in.link] = std::move(in.sock);
  }

  // The acknowledgement says the acceptor has its whole set, so no link is used half-formed.
  for (int j = me + 1; j < n; ++j)
    for (int k = 0; k < k_links; ++k) {
      uint32_t ack = 0;
      read_exact(sockets[j][k].fd(), &ack, sizeof(ack), deadline, names[j]);
      if (ack != kHelloMagic) fail("bad handshake reply from ", names[j]);
    }
  if (verbose)
    std::cerr << "[jax_mlxdist] member " << me << " of group " << std::hex << group << std::dec
              << ": connected to " << n - 1 << " peers x " << k_links << " links"
              << (token.empty() ? "" : ", authenticated") << "\n";
  return std::make_unique<TcpLinks>(std::move(sockets), names, timeout_s);
}

}  // namespace mlxdist::tcp
