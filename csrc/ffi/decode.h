// What every FFI handler shares: dtype and shape decoding, and the error prefix.
#pragma once

#include <cstdint>

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
    default: return DType::kCount;
  }
}

inline uint64_t shape_hash(xla::ffi::Span<const int64_t> dims) {
  uint64_t h = 0xcbf29ce484222325ull ^ dims.size();  // FNV-1a over rank and extents
  for (int64_t d : dims) h = (h ^ uint64_t(d)) * 0x100000001b3ull;
  return h;
}

}  // namespace mlxdist::ffi_handlers
