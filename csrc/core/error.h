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

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <type_traits>

namespace mlxdist {
// Numbers are formatted with to_string, not the stream: in a process where another C++ runtime
// was loaded first (JAX's CUDA plugin), inserting an integer into a stream crashed.
template <typename T>
decltype(auto) message_part(const T& x) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", double(x));  // as the stream would: 2, 0.5, 1e+07
    return std::string(buf);
  } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, char> &&
                       !std::is_same_v<T, bool>) {
    return std::to_string(x);
  } else {
    return (x);
  }
}

inline std::string hex(uint64_t x) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%llx", static_cast<unsigned long long>(x));
  return buf;
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << message_part(parts));
  throw DistError(os.str());
}
}  // namespace mlxdist
