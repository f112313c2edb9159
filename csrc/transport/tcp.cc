#include "transport/tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <thread>

#include "core/error.h"

namespace mlxdist::tcp {
namespace {

int ms_until(Deadline deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return int(std::max<long long>(0, std::min<long long>(left.count(), 1 << 30)));
}

sockaddr_in resolve(const Address& addr) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(addr.host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr)
    fail("cannot resolve host '", addr.host, "': ", gai_strerror(rc));
  sockaddr_in sa{};
  std::memcpy(&sa, res->ai_addr, sizeof(sa));
  freeaddrinfo(res);
  sa.sin_port = htons(uint16_t(addr.port));
  return sa;
}

void set_nonblocking(int fd, bool on) {
  int flags = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK));
}

bool would_block(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }

// A farewell: a head no header check accepts (a peer expecting a header stops there), the
// text, then its length and the magic again, so it can be found from the end of the stream.
constexpr uint32_t kFarewellMagic = 0x4d4c4657;  // "MLFW"
constexpr size_t kFarewellHead = 64, kFarewellText = 4000;

}  // namespace

std::string farewell_bytes(const std::string& why) {
  const std::string text = why.substr(0, kFarewellText);
  const uint32_t len = uint32_t(text.size());
  std::string out(kFarewellHead, '\0');
  std::memcpy(out.data(), &kFarewellMagic, 4);
  std::memcpy(out.data() + 4, &len, 4);
  out += text;
  out.append(reinterpret_cast<const char*>(&len), 4);
  out.append(reinterpret_cast<const char*>(&kFarewellMagic), 4);
  return out;
}

std::string read_farewell(int fd, bool expected) {
  // expected: its head was just read, so the rest is on its way (before the peer's reset).
  const Deadline until = Clock::now() + std::chrono::milliseconds(expected ? 1000 : 0);
  std::string tail;
  char buf[16384];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) {
      tail.append(buf, size_t(n));
      if (tail.size() > 2 * kFarewellText) tail.erase(0, tail.size() - (kFarewellText + 8));
      continue;
    }
    if (n < 0 && would_block(errno) && Clock::now() < until) {
      pollfd p{fd, POLLIN, 0};
      ::poll(&p, 1, ms_until(until));
      continue;
    }
    break;  // the end of the stream, a reset, or nothing more in time
  }
  uint32_t len = 0, magic = 0;
  if (tail.size() < 8) return "";
  std::memcpy(&len, tail.data() + tail.size() - 8, 4);
  std::memcpy(&magic, tail.data() + tail.size() - 4, 4);
  if (magic != kFarewellMagic || len > tail.size() - 8) return "";
  return tail.substr(tail.size() - 8 - len, len);
}

Address parse_address(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size())
    fail("bad address '", s, "': expected \"ip:port\"");
  Address a;
  a.host = s.substr(0, colon);
  try {
    size_t used = 0;
    a.port = std::stoi(s.substr(colon + 1), &used);
    if (used != s.size() - colon - 1) throw std::invalid_argument("trailing");
  } catch (const std::exception&) {
    fail("bad port in address '", s, "'");
  }
  if (a.port < 0 || a.port > 65535) fail("port out of range in address '", s, "'");
  return a;
}

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void Socket::close() {
  if (fd_ >= 0) {
    ::shutdown(fd_, SHUT_RDWR);  // wakes a peer blocked on us now, not at process exit
    ::close(fd_);
    fd_ = -1;
  }
}

Socket listen_on(const Address& addr) {
  sockaddr_in sa = resolve(addr);
  Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) fail("socket(): ", std::strerror(errno));
  int one = 1;
  setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(s.fd(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0)
    fail("cannot listen on ", addr.str(), ": bind: ", std::strerror(errno));
  if (::listen(s.fd(), 512) != 0) fail("cannot listen on ", addr.str(), ": ", std::strerror(errno));
  return s;
}

int bound_port(int fd) {
  sockaddr_in sa{};
  socklen_t len = sizeof(sa);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0)
    fail("getsockname: ", std::strerror(errno));
  return ntohs(sa.sin_port);
}

std::string local_ip_towards(const Address& addr) {
  // Connecting a UDP socket sends nothing; it only asks the kernel to pick the route.
  sockaddr_in sa = resolve(addr);
  Socket s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!s.valid() || ::connect(s.fd(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0)
    fail("no route to ", addr.str(), ": ", std::strerror(errno));
  sockaddr_in me{};
  socklen_t len = sizeof(me);
  getsockname(s.fd(), reinterpret_cast<sockaddr*>(&me), &len);
  char ip[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &me.sin_addr, ip, sizeof(ip));
  return ip;
}

Socket connect_with_retry(const Address& addr, Deadline deadline, const std::string& peer) {
  sockaddr_in sa = resolve(addr);
  auto backoff = std::chrono::milliseconds(5);
  std::string last = "no attempt";
  for (;;) {
    Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!s.valid()) fail("socket(): ", std::strerror(errno));
    set_nonblocking(s.fd(), true);
    int rc = ::connect(s.fd(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      pollfd p{s.fd(), POLLOUT, 0};
      int ready = ::poll(&p, 1, std::max(1, ms_until(deadline)));
      socklen_t len = sizeof(err);
      if (ready == 1) getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
      else err = ETIMEDOUT;
    }
    if (err == 0) {
      set_nonblocking(s.fd(), false);
      return s;
    }
    last = std::strerror(err);
    if (Clock::now() + backoff >= deadline)
      fail("could not connect to ", peer, " before the timeout: ", last);
    std::this_thread::sleep_for(backoff);  // peer not listening yet: back off and retry
    backoff = std::min(backoff * 2, std::chrono::milliseconds(500));
  }
}

void write_exact(int fd, const void* buf, size_t len, Deadline deadline, const std::string& peer) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    pollfd pfd{fd, POLLOUT, 0};
    if (::poll(&pfd, 1, ms_until(deadline)) <= 0) fail("timed out sending to ", peer);
    ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && would_block(errno)) continue;
    if (n <= 0) fail("lost connection to ", peer, ": ", std::strerror(errno));
    p += n;
    len -= size_t(n);
  }
}

void read_exact(int fd, void* buf, size_t len, Deadline deadline, const std::string& peer) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, ms_until(deadline)) <= 0) fail("timed out waiting for ", peer);
    ssize_t n = ::recv(fd, p, len, MSG_DONTWAIT);
    if (n < 0 && would_block(errno)) continue;
    if (n == 0) fail(peer, " closed the connection");
    if (n < 0) fail("lost connection to ", peer, ": ", std::strerror(errno));
    p += n;
    len -= size_t(n);
  }
}

void tune_for_data(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  set_nonblocking(fd, true);
}

int wait_readable(const std::vector<int>& fds, Deadline deadline) {
  std::vector<pollfd> p;
  for (int fd : fds) p.push_back(pollfd{fd, POLLIN, 0});
  int ready = ::poll(p.data(), p.size(), ms_until(deadline));
  if (ready <= 0) return -1;
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i].revents) return int(i);
  return -1;
}

TcpLinks::TcpLinks(std::vector<std::vector<Socket>> sockets, std::vector<std::string> names,
                   double timeout_s)
    : sockets_(std::move(sockets)), names_(std::move(names)), timeout_s_(timeout_s) {
  for (auto& per_peer : sockets_) {
    if (!per_peer.empty()) links_ = int(per_peer.size());
    for (auto& s : per_peer) tune_for_data(s.fd());
  }
}

std::string TcpLinks::also_lost(int except) const {
  // A peer that fails a collective closes its connections, so the first closed connection a
  // rank sees may be a bystander's: name every peer already gone, the root cause among them.
  std::string lost = lost_peers({}, except);
  return lost.empty() ? "" : " (connections also closed by: " + lost + ")";
}

std::string TcpLinks::lost_peers(const std::vector<int>& which, int except) const {
  std::string lost;
  for (size_t p = 0; p < sockets_.size(); ++p) {
    if (int(p) == except || sockets_[p].empty()) continue;
    if (!which.empty() && std::find(which.begin(), which.end(), int(p)) == which.end()) continue;
    for (const auto& s : sockets_[p]) {
      pollfd pfd{s.fd(), short(POLLIN | POLLRDHUP), 0};
      char byte;
      bool gone = s.fd() < 0 ||
                  (::poll(&pfd, 1, 0) == 1 &&
                   ((pfd.revents & (POLLHUP | POLLRDHUP | POLLERR)) ||
                    ::recv(s.fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0));
      if (gone) {
        std::string why = s.fd() < 0 ? "" : read_farewell(s.fd(), false);
        lost += (lost.empty() ? "" : ", ") + names_[p] +
                (why.empty() ? "" : " (which left the group after an error: " + why + ")");
        break;
      }
    }
  }
  return lost;
}

void TcpLinks::close() {
  for (auto& per_peer : sockets_)
    for (auto& s : per_peer) s.close();
}

void TcpLinks::reset(const std::string& why) {
  const linger abortive{1, 0};
  const std::string last = why.empty() ? "" : farewell_bytes(why);
  for (auto& per_peer : sockets_)
    for (auto& s : per_peer) {
      if (!s.valid()) continue;
      // Best effort: a farewell that does not fit the socket's buffer now is not sent whole,
      // and a peer then finds no trailer and reports the lost connection instead.
      if (!last.empty()) ::send(s.fd(), last.data(), last.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      setsockopt(s.fd(), SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
    }
  close();
}

void TcpLinks::run(std::vector<Transfer>& transfers, Deadline deadline) {
  // One FIFO of cursors per (direction, socket): only its head moves bytes. Sends sort first,
  // so this rank's header is on the wire before a received one can fail a check.
  using Key = std::pair<bool, int>;  // (is_recv, fd)
  std::map<Key, std::vector<Cursor>> queues;
  std::map<Key, size_t> heads;
  for (auto& t : transfers) {
    if (t.peer < 0 || t.peer >= int(sockets_.size()) || sockets_[t.peer].empty())
      fail("internal: no connection to peer ", t.peer);
    int fd = sockets_[t.peer][t.link % links_].fd();
    if (fd < 0) fail("connection to ", names_[t.peer], " is closed");
    queues[{!t.is_send, fd}].push_back(Cursor{&t});
  }
  std::vector<pollfd> pfds;
  const bool foreground = has_foreground(transfers);
  bool waited = false;  // background only: waited once for a socket to become ready
  // The timeout bounds a stall, not a whole transfer: progress pushes the deadline out.
  const auto stall = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  std::string lost;  // first failed send, reported once nothing else can move
  for (;;) {
    bool progressed = false, pending = false;
    pfds.clear();
    for (auto& [key, q] : queues) {
      size_t& h = heads[key];
      while (h < q.size()) {
        Cursor& c = q[h];
        const bool sending = !key.first;
        const int fd = key.second;
        try {
          c.settle();
        } catch (const DistError&) {
          // Where a header was due the peer may have left its farewell: report that instead.
          const Segment& s = c.t->segments[c.t->seg];
          uint32_t magic = 0;
          if (s.len >= 4) std::memcpy(&magic, s.data, 4);
          std::string why = magic == kFarewellMagic ? read_farewell(fd, true) : "";
          if (!why.empty()) fail(names_[c.t->peer], " left the group after an error: ", why);
          throw;
        }
        if (c.done()) { ++h; continue; }
        Segment& s = c.t->segments[c.t->seg];
        char* p = static_cast<char*>(s.data) + c.t->off;
        size_t want = s.len - c.t->off;
        ssize_t n = sending ? ::send(fd, p, want, MSG_NOSIGNAL | MSG_DONTWAIT)
                            : ::recv(fd, p, want, MSG_DONTWAIT);
        if (n > 0) {
          c.t->off += size_t(n);
          progressed = true;
          continue;
        }
        if (n == 0 && !sending)
          fail(names_[c.t->peer], " closed the connection", also_lost(c.t->peer));
        if (n < 0 && !would_block(errno)) {
          std::string why = "lost connection to " + names_[c.t->peer] + ": " +
                            std::strerror(errno) + also_lost(c.t->peer);
          if (!sending) throw DistError(why);
          // The peer may have hung up because of a mismatch it saw: its farewell, or its
          // message in an op we are still reading, says more than a broken pipe.
          std::string farewell = read_farewell(fd, false);
          if (!farewell.empty())
            fail(names_[c.t->peer], " left the group after an error: ", farewell);
          if (lost.empty()) lost = why;
          h = q.size();
          break;
        }
        pending = true;
        pfds.push_back(pollfd{fd, short(sending ? POLLOUT : POLLIN), 0});
        break;
      }
    }
    if (!lost.empty() && (!pending || !progressed)) throw DistError(lost);
    if (!pending) return;
    if (!foreground_left(transfers) && (foreground || progressed || waited)) return;
    if (progressed) {
      deadline = std::max(deadline, Clock::now() + stall);
      continue;
    }
    int ready = ::poll(pfds.data(), pfds.size(), ms_until(deadline));
    if (ready < 0 && errno != EINTR) fail("poll: ", std::strerror(errno));
    if (!foreground) {
      waited = true;
      continue;
    }
    if (ready == 0 && Clock::now() >= deadline) {
      std::string who;
      for (auto& p : pfds) {
        for (auto& [key, q] : queues)
          if (key.second == p.fd && key.first == (p.events == POLLIN) && heads[key] < q.size()) {
            who += (who.empty() ? "" : ", ") + std::string(key.first ? "receiving from " : "sending to ") +
                   names_[q[heads[key]].t->peer];
            break;
          }
      }
      fail("timed out after ", timeout_s_, " s (MLXDIST_TIMEOUT) ", who);
    }
  }
}

}  // namespace mlxdist::tcp
