// Errors raised by communication. Every failure becomes a DistError whose text names the op,
// the group and the peer; Python turns it into jax_mlxdist.DistributedError.
#pragma once

#include <stdexcept>
#include <string>

namespace mlxdist {

class DistError : public std::runtime_error {
 public:
  explicit DistError(const std::string& what) : std::runtime_error(what) {}
};

// Builds a message from streamable parts: fail("rank ", r, " closed the connection").
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts);

}  // namespace mlxdist

#include <sstream>

namespace mlxdist {
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw DistError(os.str());
}
}  // namespace mlxdist
