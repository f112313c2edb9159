// What every FFI handler shares: dtype and shape decoding, and the error prefix.
#pragma once

#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "xla/ffi/api/ffi.h"

namespace mlxdist::ffi_handlers {

// Python recognises failures by this prefix and raises DistributedError.
inline constexpr const char* kPrefix = "DistributedError: ";

inline DType to_dtype(xla::ffi::DataType t) {
  using xla::ffi::DataType;
  switch (t) {
    case DataType::PRED: return DType::kBool;
    case DataType::S8: return DType::kInt8;
    case DataType::S16: return DType::kInt16;
    case DataType::S32: return DType::kInt32;
    case DataType::S64: return DType::kInt64;
    case DataType::U8: return DType::kUInt8;
    case DataType::U16: return DType::kUInt16;
    case DataType::U32: return DType::kUInt32;
    case DataType::U64: return DType::kUInt64;
    case DataType::F16: return DType::kFloat16;
    case DataType::BF16: return DType::kBFloat16;
    case DataType::F32: return DType::kFloat32;
    case DataType::F64: return DType::kFloat64;
    case DataType::C64: return DType::kComplex64;
    case DataType::C128: return DType::kComplex128;
    default: return DType::kCount;
  }
}

// FNV-1a over rank and extents; from 1: without the first extent (all_to_all's blocks may
// differ in rows, never in the rest).
inline uint64_t shape_hash(xla::ffi::Span<const int64_t> dims, size_t from = 0) {
  uint64_t h = 0xcbf29ce484222325ull ^ dims.size();
  for (size_t i = from; i < dims.size(); ++i) h = (h ^ uint64_t(dims[i])) * 0x100000001b3ull;
  return h;
}

// A rooted collective's block, which every rank has alike: gather's input, scatter's output,
// the others' input. Its element count and shape hash.
struct RootedBlock {
  size_t count;
  uint64_t hash;
};
inline RootedBlock rooted_block(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer y, bool is_output) {
  const xla::ffi::AnyBuffer& b = is_output ? y : x;
  return {b.element_count(), shape_hash(b.dimensions())};
}

// Rows of axis 0 (all_to_all's sizes) as element counts, rows of `row` elements each.
inline std::vector<size_t> row_counts(xla::ffi::Span<const int64_t> rows, size_t row) {
  std::vector<size_t> out;
  for (int64_t r : rows) out.push_back(size_t(r) * row);
  return out;
}

inline size_t row_elements(xla::ffi::Span<const int64_t> dims) {
  size_t n = 1;
  for (size_t i = 1; i < dims.size(); ++i) n *= size_t(dims[i]);
  return n;
}

}  // namespace mlxdist::ffi_handlers
