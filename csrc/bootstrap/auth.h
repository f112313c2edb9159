// Proof of a shared job token (MLXDIST_TOKEN) on every new connection: HMAC-SHA256 over fresh
// nonces, so the token never crosses the network and a recorded handshake cannot be replayed.
// HMAC comes from the system's libcrypto, loaded at run time (no build dependency).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace mlxdist::auth {

using Mac = std::array<uint8_t, 32>;
using Nonce = std::array<uint8_t, 16>;

Nonce random_nonce();
// HMAC-SHA256(key, label || a || b); throws DistError when libcrypto is unavailable.
Mac hmac(const std::string& key, const char* label, const void* a, size_t a_len, const void* b,
         size_t b_len);
// Constant-time comparison.
bool equal(const Mac& x, const Mac& y);

}  // namespace mlxdist::auth
