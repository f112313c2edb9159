#include "bootstrap/auth.h"

#include <sys/random.h>

#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/library.h"

namespace mlxdist::auth {
namespace {

using HmacFn = unsigned char* (*)(const void* md, const void* key, int key_len,
                                  const unsigned char* data, size_t len, unsigned char* out,
                                  unsigned int* out_len);
using Sha256Fn = const void* (*)();

struct Crypto {
  HmacFn hmac = nullptr;
  Sha256Fn sha256 = nullptr;
  Crypto() {
    std::string tried, missing;
    void* lib = library::open_first({"libcrypto.so.3", "libcrypto.so", "libcrypto.so.1.1"},
                                    false, &tried);
    if (lib) {
      library::bind(lib, "HMAC", hmac, &missing);
      library::bind(lib, "EVP_sha256", sha256, &missing);
    }
    if (!missing.empty()) hmac = nullptr;
  }
};

const Crypto& crypto() {
  static Crypto c;
  return c;
}

}  // namespace

Nonce random_nonce() {
  Nonce n;
  size_t got = 0;
  while (got < n.size()) {
    ssize_t r = getrandom(n.data() + got, n.size() - got, 0);
    if (r > 0) got += size_t(r);
    else if (errno != EINTR) fail("getrandom failed: ", std::strerror(errno));
  }
  return n;
}

Mac hmac(const std::string& key, const char* label, const void* a, size_t a_len, const void* b,
         size_t b_len) {
  const Crypto& c = crypto();
  if (!c.hmac)
    fail("MLXDIST_TOKEN is set but no libcrypto (OpenSSL) was found to prove it; install "
         "libssl3 or unset MLXDIST_TOKEN");
  std::vector<unsigned char> msg(std::strlen(label));
  std::memcpy(msg.data(), label, msg.size());
  msg.insert(msg.end(), static_cast<const unsigned char*>(a), static_cast<const unsigned char*>(a) + a_len);
  msg.insert(msg.end(), static_cast<const unsigned char*>(b), static_cast<const unsigned char*>(b) + b_len);
  Mac out{};
  unsigned int len = 0;
  if (!c.hmac(c.sha256(), key.data(), int(key.size()), msg.data(), msg.size(), out.data(), &len) ||
      len != out.size())
    fail("HMAC-SHA256 failed");
  return out;
}

bool equal(const Mac& x, const Mac& y) {
  uint8_t diff = 0;
  for (size_t i = 0; i < x.size(); ++i) diff |= uint8_t(x[i] ^ y[i]);
  return diff == 0;
}

}  // namespace mlxdist::auth
