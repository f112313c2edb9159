// TCP byte movers: addresses, sockets, connect with back-off, and TcpLinks, which progresses
// many transfers at once over non-blocking sockets with poll().
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/transfer.h"

namespace mlxdist::tcp {

struct Address {
  std::string host;
  int port = 0;
  std::string str() const { return host + ":" + std::to_string(port); }
};

// "10.0.0.1:5000" or "host:5000"; throws DistError on bad input.
Address parse_address(const std::string& s);

class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { close(); }
  Socket(Socket&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Socket& operator=(Socket&& o) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {  // hands the fd over; this Socket no longer closes it
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void close();

 private:
  int fd_ = -1;
};

// A failing rank's last words on a connection (why it failed), and reading them back from what
// is left unread on a connection whose peer is gone: "" when it left none.
std::string farewell_bytes(const std::string& why);
std::string read_farewell(int fd, bool expected);

Socket listen_on(const Address& addr);
// The port a listening socket was bound to (for one bound to port 0).
int bound_port(int fd);
// This host's address on the route to addr: the one a peer there can reach us on.
std::string local_ip_towards(const Address& addr);
// Retries refused/unreachable connects with exponential back-off until the deadline.
Socket connect_with_retry(const Address& addr, Deadline deadline, const std::string& peer);
// Blocking exact reads/writes with a deadline, for handshakes.
void write_exact(int fd, const void* buf, size_t len, Deadline deadline, const std::string& peer);
void read_exact(int fd, void* buf, size_t len, Deadline deadline, const std::string& peer);
// Per-connection settings for data sockets: TCP_NODELAY, large buffers, non-blocking.
void tune_for_data(int fd);
// Waits up to the deadline for any listener to be readable; returns its index or -1.
int wait_readable(const std::vector<int>& fds, Deadline deadline);

class TcpLinks : public Links {
 public:
  // sockets[peer][link]; the entry for this rank itself is empty.
  TcpLinks(std::vector<std::vector<Socket>> sockets, std::vector<std::string> peer_names,
           double timeout_s);
  int links_per_peer() const override { return links_; }
  void run(std::vector<Transfer>& transfers, Deadline deadline) override;
  std::string describe_peer(int peer) const override { return names_[peer]; }
  void close() override;
  void reset(const std::string& why) override;  // a farewell, then an abortive close (RST)
  std::string lost_peers(const std::vector<int>& which) const override {
    return lost_peers(which, -1);
  }
  // Names of the given peers (all but `except` when empty) whose connections are closed.
  std::string lost_peers(const std::vector<int>& which, int except) const;

 private:
  std::string also_lost(int except) const;  // " (connections also closed by: ...)" or ""

  std::vector<std::vector<Socket>> sockets_;
  std::vector<std::string> names_;
  double timeout_s_;
  int links_ = 0;
};

}  // namespace mlxdist::tcp
