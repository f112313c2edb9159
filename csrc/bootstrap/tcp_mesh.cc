#include "bootstrap/tcp_mesh.h"

#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <iostream>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>

#include "core/error.h"
#include "bootstrap/auth.h"

namespace mlxdist::tcp {
namespace {

constexpr uint32_t kHelloMagic = 0x4d4c4832;  // "MLH2"
constexpr uint32_t kHasToken = 1;
// A connection must greet and answer its challenge within this; port scans and slow-loris
// connections are dropped after it without holding up the ranks that do greet.
constexpr auto kHandshakeStage = std::chrono::seconds(5);

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

// A connection part-way through its handshake. Bytes arrive without blocking anyone.
struct Pending {
  Socket sock;
  std::string from;    // "ip:port", for the log
  std::string source;  // ip: admission is counted per source host
  const std::string* token;  // the job token of the listener it came in on
  bool greeted = false;  // Hello received, challenge sent, waiting for the proof
  Hello hello;
  auth::Nonce nonce{};
  std::array<uint8_t, 40> buf{};
  size_t got = 0;
  Deadline until;
};

// Admission: unauthenticated connections cost a descriptor and a slot until they prove the
// token or age out. A stranger may open any number of idle connections: when the slots (or
// the descriptors) run out, the oldest silent connection of the source holding most slots
// makes room (see evict).
size_t max_pending() {
  rlimit r{};
  size_t files = getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur != RLIM_INFINITY ? r.rlim_cur : 4096;
  return std::clamp<size_t>(files / 4, 8, 256);
}

// One line per reason and second at most: a flood of strangers must not flood the log too.
class RefusalLog {
 public:
  void note(const std::string& from, const std::string& why) {
    auto now = Clock::now();
    Entry& e = entries_[why];
    if (e.logged && now - e.last < std::chrono::seconds(1)) {
      ++e.quiet;
      return;
    }
    std::cerr << "[jax_mlxdist] refused a connection from " << from << ": " << why;
    if (e.quiet) std::cerr << " (and " << e.quiet << " more for this reason since the last line)";
    std::cerr << std::endl;
    e = Entry{true, 0, now};
  }

 private:
  struct Entry {
    bool logged = false;
    size_t quiet = 0;
    Deadline last{};
  };
  std::map<std::string, Entry> entries_;
};

// Owns every listening socket of the process and accepts on a thread of its own, all the
// time, so strangers never pile up in a listen backlog and a group forming later finds room.
// Authenticated connections are filed by the group they announce until that group takes them.
class Acceptor {
 public:
  static Acceptor& get() {
    static Acceptor* a = new Acceptor();  // never destroyed: keeps ports reserved until exit
    return *a;
  }

  void ensure_listening(const Address& addr, int inherited_fd, const std::string& token) {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = listeners_.find(addr.str()); it != listeners_.end()) {
      *it->second.token = token;  // a later init may bring another job's token
      return;
    }
    Socket s = inherited_fd >= 0 ? Socket(inherited_fd) : listen_on(addr);
    tune_for_data(s.fd());  // non-blocking accepts
    listeners_[addr.str()] = Listener{std::move(s), std::make_unique<std::string>(token)};
    if (!thread_.joinable()) {
      wake_ = Socket(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      if (!wake_.valid()) fail("eventfd: ", std::strerror(errno));
      thread_ = std::thread([this] { loop(); });
      thread_.detach();
    } else {
      const uint64_t one = 1;
      (void)!::write(wake_.fd(), &one, sizeof(one));
    }
  }

  // Waits until `expected` authenticated connections for `group` arrived.
  std::vector<Incoming> accept_for(uint64_t group, const std::vector<int>& from, size_t expected,
                                   Deadline deadline, const std::vector<std::string>& names) {
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<Incoming> got;
    for (;;) {
      auto range = stash_.equal_range(group);
      for (auto it = range.first; it != range.second; ++it) got.push_back(std::move(it->second));
      stash_.erase(group);
      if (got.size() >= expected) return got;
      if (arrived_.wait_until(lock, deadline) == std::cv_status::timeout && !stash_.count(group)) {
        std::set<int> seen;
        for (auto& in : got) seen.insert(in.src);
        std::string missing;
        for (int r : from)
          if (!seen.count(r)) missing += "\n  " + names[r];
        fail("timed out waiting for connections from:", missing);
      }
    }
  }

 private:
  struct Listener {
    Socket sock;
    std::unique_ptr<std::string> token;  // stable address: pending connections point at it
  };

  void loop() {
    pthread_setname_np(pthread_self(), "mlxdist-accept");
    std::vector<pollfd> pfds;
    for (;;) {
      std::unique_lock<std::mutex> lock(mu_);
      pfds.clear();
      pfds.push_back(pollfd{wake_.fd(), POLLIN, 0});
      for (auto& [_, l] : listeners_) pfds.push_back(pollfd{l.sock.fd(), POLLIN, 0});
      Deadline wake = Clock::now() + std::chrono::hours(1);
      for (auto& p : pending_) {
        pfds.push_back(pollfd{p.sock.fd(), POLLIN, 0});
        wake = std::min(wake, p.until);
      }
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wake - Clock::now()).count();
      lock.unlock();
      ::poll(pfds.data(), pfds.size(), int(std::clamp<long long>(ms + 1, 0, 1 << 30)));
      lock.lock();
      if (pfds[0].revents) {
        uint64_t count;
        (void)!::read(wake_.fd(), &count, sizeof(count));
      }
      // Handshakes already under way first, so a rank's greeting is read before any eviction.
      size_t i = 1 + listeners_.size();
      bool filed = false;
      for (auto it = pending_.begin(); it != pending_.end(); ++i) {
        const bool ready = i < pfds.size() && pfds[i].fd == it->sock.fd() && pfds[i].revents;
        bool keep = ready ? advance(*it, filed) : Clock::now() < it->until;
        if (!keep && it->sock.valid()) log_.note(it->from, "no complete greeting in time");
        it = keep ? std::next(it) : pending_.erase(it);
      }
      i = 1;
      for (auto& [_, l] : listeners_)
        if (pfds[i++].revents) accept_new(l);
      if (filed) arrived_.notify_all();
    }
  }

  // A few at a time: connections accepted earlier get their greeting read (next round) before
  // a stranger re-opening what is evicted can push them out.
  void accept_new(Listener& l) {
    for (int batch = 0; batch < 16; ++batch) {
      Socket s(::accept4(l.sock.fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!s.valid()) {
        // Out of descriptors: drop the oldest stranger and try again.
        if ((errno == EMFILE || errno == ENFILE) && evict()) continue;
        return;
      }
      sockaddr_in sa{};
      socklen_t len = sizeof(sa);
      std::string source = "?", from = "an unknown peer";
      if (getpeername(s.fd(), reinterpret_cast<sockaddr*>(&sa), &len) == 0) {
        char ip[INET_ADDRSTRLEN] = "?";
        inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof(ip));
        source = ip;
        from = source + ":" + std::to_string(ntohs(sa.sin_port));
      }
      if (pending_.size() >= limit_) evict();
      Pending p{std::move(s), from, source, l.token.get()};
      p.until = Clock::now() + kHandshakeStage;
      pending_.push_back(std::move(p));
    }
  }

  // Closes the oldest unfinished handshake of the source holding most of them, among those
  // that have not greeted if any: a rank's connection greets at once, so a stranger that keeps
  // re-opening idle connections only ever evicts its own.
  bool evict() {
    for (bool greeted : {false, true}) {
      std::map<std::string, size_t> per_source;
      for (auto& p : pending_)
        if (p.greeted == greeted) ++per_source[p.source];
      if (per_source.empty()) continue;
      auto busiest = std::max_element(per_source.begin(), per_source.end(),
                                      [](auto& a, auto& b) { return a.second < b.second; });
      for (auto it = pending_.begin(); it != pending_.end(); ++it)
        if (it->greeted == greeted && it->source == busiest->first) {
          log_.note(it->from, "too many unfinished handshakes from its host (the oldest makes room)");
          pending_.erase(it);
          return true;
        }
    }
    return false;
  }

  // Reads what arrived; returns false when the connection is finished with (filed or refused).
  bool advance(Pending& p, bool& filed) {
    const std::string& token = *p.token;
    const size_t want = p.greeted ? sizeof(auth::Mac) : sizeof(Hello);
    ssize_t n = ::recv(p.sock.fd(), p.buf.data() + p.got, want - p.got, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
      log_.note(p.from, "closed during the handshake");
      p.sock.close();
      return false;
    }
    if (n > 0) p.got += size_t(n);
    if (p.got < want) return Clock::now() < p.until;
    p.got = 0;
    if (!p.greeted) {
      std::memcpy(&p.hello, p.buf.data(), sizeof(Hello));
      if (p.hello.magic != kHelloMagic) {
        log_.note(p.from, "not a jax_mlxdist greeting");
        p.sock.close();
        return false;
      }
      Challenge c;
      c.flags = token.empty() ? 0 : kHasToken;
      if (bool(p.hello.flags & kHasToken) != !token.empty()) {
        // Say which side has a token (best effort), so the connector can report it.
        ::send(p.sock.fd(), &c, sizeof(c), MSG_NOSIGNAL | MSG_DONTWAIT);
        log_.note(p.from, token.empty() ? "it proves a job token (MLXDIST_TOKEN) and this rank has none"
                                        : "it has no job token (MLXDIST_TOKEN) and this rank requires one");
        p.sock.close();
        return false;
      }
      c.nonce = p.nonce = auth::random_nonce();
      c.mac = prove(token, "server", p.hello, c.nonce);
      // A fresh socket's buffer always takes 56 bytes; one that does not is not worth waiting for.
      if (::send(p.sock.fd(), &c, sizeof(c), MSG_NOSIGNAL | MSG_DONTWAIT) != ssize_t(sizeof(c))) {
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
      log_.note(p.from, "wrong job token (MLXDIST_TOKEN)");
      p.sock.close();
      return false;
    }
    stash_.emplace(p.hello.group, Incoming{int(p.hello.src), int(p.hello.link), std::move(p.sock)});
    filed = true;
    return false;
  }

  std::mutex mu_;
  std::condition_variable arrived_;
  std::map<std::string, Listener> listeners_;
  std::list<Pending> pending_;
  std::multimap<uint64_t, Incoming> stash_;
  const size_t limit_ = max_pending();
  RefusalLog log_;
  Socket wake_;
  std::thread thread_;
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
                                        const std::vector<std::string>& names) {
  return Acceptor::get().accept_for(group, from, expected, deadline, names);
}

void ensure_listening(const Address& addr, int inherited_fd, const std::string& token) {
  Acceptor::get().ensure_listening(addr, inherited_fd, token);
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
  auto incoming = accept_handshakes(group, lower, size_t(me) * k_links, deadline, names);
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
