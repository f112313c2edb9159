#include "core/dtype.h"

#include <cmath>
#include <complex>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/error.h"

namespace mlxdist {
namespace {

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint16_t sign = uint16_t((x >> 16) & 0x8000);
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u)  // inf or nan (keep nan quiet)
    return sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0);
  if (absx >= 0x477ff000u) return sign | 0x7c00;  // rounds to inf
  if (absx < 0x38800000u) {                        // half subnormal or zero
    if (absx < 0x33000000u) return sign;
    uint32_t exp = absx >> 23;
    uint32_t man = (absx & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - exp;  // 14..24
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return sign | uint16_t(half);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent
  uint32_t half = r >> 13;
  uint32_t rem = r & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;
  return sign | uint16_t(half);
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40);  // quiet nan
  x += 0x7fff + ((x >> 16) & 1);
  return uint16_t(x >> 16);
}

template <typename T>
struct is_complex : std::false_type {};
template <typename T>
struct is_complex<std::complex<T>> : std::true_type {};

template <typename T>
T apply(T a, T b, ReduceOp op) {
  if constexpr (std::is_same_v<T, bool>) {
    switch (op) {
      case ReduceOp::kSum: case ReduceOp::kMax: case ReduceOp::kOr: return a || b;
      case ReduceOp::kXor: return a != b;
      default: return a && b;
    }
  } else if constexpr (is_complex<T>::value) {
    // Ordered by real part, then imaginary part (MLX's order); bitwise ops rejected in Python.
    const bool a_first = a.real() > b.real() || (a.real() == b.real() && a.imag() >= b.imag());
    switch (op) {
      case ReduceOp::kProd: return a * b;
      case ReduceOp::kMax: return a_first ? a : b;
      case ReduceOp::kMin: return (a_first && a != b) ? b : a;
      default: return a + b;
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    switch (op) {
      case ReduceOp::kSum: return a + b;
      case ReduceOp::kProd: return a * b;
      case ReduceOp::kMax: return (std::isnan(a) || a >= b) ? a : b;
      default: return (std::isnan(a) || a <= b) ? a : b;
    }
  } else {
    switch (op) {
      case ReduceOp::kSum: return T(a + b);
      case ReduceOp::kProd: return T(a * b);
      case ReduceOp::kMax: return a >= b ? a : b;
      case ReduceOp::kAnd: return T(a & b);
      case ReduceOp::kOr: return T(a | b);
      case ReduceOp::kXor: return T(a ^ b);
      default: return a <= b ? a : b;
    }
  }
}

template <typename T>
void reduce_typed(void* out, const void* in_a, const void* in_b, size_t n, ReduceOp op) {
  T* o = static_cast<T*>(out);
  const T* a = static_cast<const T*>(in_a);
  const T* b = static_cast<const T*>(in_b);
  // One switch outside the loop keeps the inner loops vectorisable.
  switch (op) {
    case ReduceOp::kSum: for (size_t i = 0; i < n; ++i) o[i] = apply(a[i], b[i], ReduceOp::kSum); break;
    case ReduceOp::kProd: for (size_t i = 0; i < n; ++i) o[i] = apply(a[i], b[i], ReduceOp::kProd); break;
    case ReduceOp::kMax: for (size_t i = 0; i < n; ++i) o[i] = apply(a[i], b[i], ReduceOp::kMax); break;
    case ReduceOp::kMin: for (size_t i = 0; i < n; ++i) o[i] = apply(a[i], b[i], ReduceOp::kMin); break;
    default: for (size_t i = 0; i < n; ++i) o[i] = apply(a[i], b[i], op); break;
  }
}

template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
void reduce_half(void* out, const void* in_a, const void* in_b, size_t n, ReduceOp op) {
  uint16_t* o = static_cast<uint16_t*>(out);
  const uint16_t* a = static_cast<const uint16_t*>(in_a);
  const uint16_t* b = static_cast<const uint16_t*>(in_b);
  for (size_t i = 0; i < n; ++i) o[i] = Narrow(apply(Widen(a[i]), Widen(b[i]), op));
}

}  // namespace

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kBool: case DType::kInt8: case DType::kUInt8: return 1;
    case DType::kInt16: case DType::kUInt16: case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt32: case DType::kUInt32: case DType::kFloat32: return 4;
    case DType::kInt64: case DType::kUInt64: case DType::kFloat64: case DType::kComplex64: return 8;
    case DType::kComplex128: return 16;
    default: fail("unknown dtype code ", int(t));
  }
}

const char* dtype_name(DType t) {
  static const char* names[] = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                "uint32", "uint64", "float16", "bfloat16", "float32", "float64",
                                "complex64", "complex128"};
  return t < DType::kCount ? names[int(t)] : "unknown";
}

const char* reduce_name(ReduceOp op) {
  static const char* names[] = {"sum", "max", "min", "prod", "and", "or", "xor"};
  return op < ReduceOp::kCount ? names[int(op)] : "unknown";
}

bool is_half(DType t) { return t == DType::kFloat16 || t == DType::kBFloat16; }

void reduce_to(void* out, const void* a, const void* b, size_t n, DType t, ReduceOp op) {
  switch (t) {
    case DType::kBool: return reduce_typed<bool>(out, a, b, n, op);
    case DType::kInt8: return reduce_typed<int8_t>(out, a, b, n, op);
    case DType::kInt16: return reduce_typed<int16_t>(out, a, b, n, op);
    case DType::kInt32: return reduce_typed<int32_t>(out, a, b, n, op);
    case DType::kInt64: return reduce_typed<int64_t>(out, a, b, n, op);
    case DType::kUInt8: return reduce_typed<uint8_t>(out, a, b, n, op);
    case DType::kUInt16: return reduce_typed<uint16_t>(out, a, b, n, op);
    case DType::kUInt32: return reduce_typed<uint32_t>(out, a, b, n, op);
    case DType::kUInt64: return reduce_typed<uint64_t>(out, a, b, n, op);
    case DType::kFloat16: return reduce_half<half_to_float, float_to_half>(out, a, b, n, op);
    case DType::kBFloat16: return reduce_half<bf16_to_float, float_to_bf16>(out, a, b, n, op);
    case DType::kFloat32: return reduce_typed<float>(out, a, b, n, op);
    case DType::kFloat64: return reduce_typed<double>(out, a, b, n, op);
    case DType::kComplex64: return reduce_typed<std::complex<float>>(out, a, b, n, op);
    case DType::kComplex128: return reduce_typed<std::complex<double>>(out, a, b, n, op);
    default: fail("unknown dtype code ", int(t));
  }
}

void reduce_blocks(void* out, const void* blocks, int n, size_t count, DType t, ReduceOp op,
                   bool widen) {
  const char* b = static_cast<const char*>(blocks);
  const size_t bytes = count * dtype_size(t);
  if (widen) {
    std::vector<float> acc(count), next(count);
    to_float32(b, acc.data(), count, t);
    for (int i = 1; i < n; ++i) {
      to_float32(b + i * bytes, next.data(), count, t);
      reduce_into(acc.data(), next.data(), count, DType::kFloat32, op);
    }
    from_float32(acc.data(), out, count, t);
    return;
  }
  if (n == 1) {
    std::memmove(out, b, bytes);
    return;
  }
  reduce_to(out, b, b + bytes, count, t, op);
  for (int i = 2; i < n; ++i) reduce_into(out, b + i * bytes, count, t, op);
}

void to_float32(const void* in, float* out, size_t n, DType t) {
  const uint16_t* p = static_cast<const uint16_t*>(in);
  if (t == DType::kFloat16)
    for (size_t i = 0; i < n; ++i) out[i] = half_to_float(p[i]);
  else
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
}

void from_float32(const float* in, void* out, size_t n, DType t) {
  uint16_t* p = static_cast<uint16_t*>(out);
  if (t == DType::kFloat16)
    for (size_t i = 0; i < n; ++i) p[i] = float_to_half(in[i]);
  else
    for (size_t i = 0; i < n; ++i) p[i] = float_to_bf16(in[i]);
}

}  // namespace mlxdist
