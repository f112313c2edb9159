// The FFI targets, one row per op: (handler, custom-call target, binding after the platform's
// context). handlers.cc (CPU) and gpu_handlers.cc (CUDA) both expand this table, so both
// platforms bind the same signatures and register the same names (_primitives.py lowers to
// them).
#pragma once

#include "xla/ffi/api/ffi.h"

// Rooted collectives: one array in, one out, the group and the root.
#define MLXDIST_FFI_ROOTED                                                                    \
  .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()                \
      .Ret<xla::ffi::Token>().Attr<int64_t>("group").Attr<int64_t>("root")

#define MLXDIST_FFI_OPS(X)                                                                    \
  X(AllReduce, "mlxdist_all_reduce",                                                           \
    .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()              \
        .Ret<xla::ffi::Token>().Attr<int64_t>("group").Attr<int64_t>("reduce"))               \
  X(AllGather, "mlxdist_all_gather",                                                           \
    .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()              \
        .Ret<xla::ffi::Token>().Attr<int64_t>("group"))                                        \
  X(SumScatter, "mlxdist_sum_scatter",                                                         \
    .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()              \
        .Ret<xla::ffi::Token>().Attr<int64_t>("group"))                                        \
  X(Send, "mlxdist_send",                                                                      \
    .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()              \
        .Ret<xla::ffi::Token>().Attr<int64_t>("group").Attr<int64_t>("dst")                   \
        .Attr<int64_t>("tag"))                                                                 \
  X(Recv, "mlxdist_recv",                                                                      \
    .Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>().Ret<xla::ffi::Token>()                  \
        .Attr<int64_t>("group").Attr<int64_t>("src").Attr<int64_t>("tag"))                    \
  X(SendRecv, "mlxdist_sendrecv",                                                              \
    .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()              \
        .Ret<xla::ffi::Token>().Attr<int64_t>("group").Attr<int64_t>("dst")                   \
        .Attr<int64_t>("src").Attr<int64_t>("tag"))                                           \
  X(AllToAll, "mlxdist_all_to_all",                                                            \
    .Arg<xla::ffi::AnyBuffer>().Arg<xla::ffi::Token>().Ret<xla::ffi::AnyBuffer>()              \
        .Ret<xla::ffi::Token>().Attr<int64_t>("group")                                        \
        .Attr<xla::ffi::Span<const int64_t>>("send_sizes")                                    \
        .Attr<xla::ffi::Span<const int64_t>>("recv_sizes"))                                   \
  X(AllReduceMany, "mlxdist_all_reduce_many",                                                 \
    .RemainingArgs().RemainingRets().Attr<int64_t>("group").Attr<int64_t>("reduce"))           \
  X(Broadcast, "mlxdist_broadcast", MLXDIST_FFI_ROOTED)                                        \
  X(Reduce, "mlxdist_reduce", MLXDIST_FFI_ROOTED.Attr<int64_t>("reduce"))                      \
  X(Gather, "mlxdist_gather", MLXDIST_FFI_ROOTED)                                              \
  X(Scatter, "mlxdist_scatter", MLXDIST_FFI_ROOTED)                                            \
  X(Barrier, "mlxdist_barrier",                                                                \
    .Arg<xla::ffi::Token>().Ret<xla::ffi::Token>().Attr<int64_t>("group"))
