// Element types and reduction kernels. float16/bfloat16 are reduced in float32 by the
// algorithms (see to_float32/from_float32); the kernels here work on one type at a time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlxdist {

// Values are part of the wire header and of the Python<->C++ contract (_primitives.py).
enum class DType : uint8_t {
  kBool = 0, kInt8, kInt16, kInt32, kInt64, kUInt8, kUInt16, kUInt32, kUInt64,
  kFloat16, kBFloat16, kFloat32, kFloat64, kComplex64, kComplex128,
  kCount
};

// kAnd, kOr, kXor: bitwise, for integers and bool.
enum class ReduceOp : uint8_t { kSum = 0, kMax, kMin, kProd, kAnd, kOr, kXor, kCount };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* reduce_name(ReduceOp op);
bool is_half(DType t);

// out[i] = op(a[i], b[i]) for i < count; out may be a. Max/min propagate NaN (a's NaN first)
// and order complex numbers by real, then imaginary part (as MLX); bool sum/max is OR,
// min/prod AND.
void reduce_to(void* out, const void* a, const void* b, size_t count, DType t, ReduceOp op);
// acc[i] = op(acc[i], in[i]).
inline void reduce_into(void* acc, const void* in, size_t count, DType t, ReduceOp op) {
  reduce_to(acc, acc, in, count, t, op);
}

// out = the reduction of n consecutive blocks of count elements, in block (rank) order, so
// every rank that does it gets the same bits; widen: accumulate float16/bfloat16 in float32.
void reduce_blocks(void* out, const void* blocks, int n, size_t count, DType t, ReduceOp op,
                   bool widen);

// Widening and narrowing for float16/bfloat16 (round to nearest even).
void to_float32(const void* in, float* out, size_t count, DType t);
void from_float32(const float* in, void* out, size_t count, DType t);

}  // namespace mlxdist
