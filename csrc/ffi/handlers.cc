#include "ffi/handlers.h"

#include <functional>

#include "core/dtype.h"
#include "core/registry.h"
#include "ffi/decode.h"
#include "ffi/ops.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mlxdist::ffi_handlers {
namespace {

ffi::Future failed(const std::string& why) {
  ffi::Promise p;
  ffi::Future f(p);
  p.SetError(ffi::Error(ffi::ErrorCode::kInternal, kPrefix + why));
  return f;
}

ffi::Future post(int64_t group, std::string what, std::function<void(Group&)> work) {
  auto engine = find_engine(group);
  if (!engine) return failed(what + ": the group is closed or was never initialised");
  ffi::Promise p;
  ffi::Future f(p);
  engine->post(std::move(what), std::move(work), [p](const std::string& err) mutable {
    if (err.empty())
      p.SetAvailable();
    else
      p.SetError(ffi::Error(ffi::ErrorCode::kInternal, kPrefix + err));
  });
  return f;
}

std::string reduce_op_name(int64_t reduce) {
  return std::string("all_") + reduce_name(ReduceOp(reduce));
}

ffi::Future AllReduce(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::Token>, int64_t group, int64_t reduce) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return failed(reduce_op_name(reduce) + ": unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  size_t count = x.element_count();
  uint64_t h = shape_hash(x.dimensions());
  return post(group, reduce_op_name(reduce), [=](Group& g) {
    g.all_reduce(in, out, count, t, ReduceOp(reduce), h);
  });
}

// Arrays, then the token (args and results alike).
ffi::Future AllReduceMany(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t group,
                          int64_t reduce) {
  const std::string name = reduce_op_name(reduce);
  std::vector<const void*> ins;
  std::vector<void*> outs;
  std::vector<size_t> counts;
  DType t = DType::kCount;
  uint64_t h = 0;
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    auto x = args.get<ffi::AnyBuffer>(i);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (!x.has_value() || !y.has_value()) return failed(name + ": bad operands");
    t = to_dtype(x->element_type());
    ins.push_back(x->untyped_data());
    outs.push_back((*y)->untyped_data());
    counts.push_back(x->element_count());
    h = h * 31 + shape_hash(x->dimensions());
  }
  if (t == DType::kCount) return failed(name + ": unsupported dtype");
  return post(group, name, [=](Group& g) {
    g.all_reduce_many(ins, outs, counts, t, ReduceOp(reduce), h);
  });
}

ffi::Future AllGather(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::Token>, int64_t group) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return failed("all_gather: unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  size_t count = x.element_count();
  uint64_t h = shape_hash(x.dimensions());
  return post(group, "all_gather", [=](Group& g) { g.all_gather(in, out, count, t, h); });
}

ffi::Future SumScatter(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::Token>, int64_t group) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return failed("sum_scatter: unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  size_t count = y->element_count();
  uint64_t h = shape_hash(x.dimensions());
  return post(group, "sum_scatter", [=](Group& g) {
    g.reduce_scatter(in, out, count, t, ReduceOp::kSum, h);
  });
}

// The output aliases x: send hands back its input so it stays in the graph.
ffi::Future Send(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer>, ffi::Result<ffi::Token>,
                 int64_t group, int64_t dst, int64_t tag) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return failed("send: unsupported dtype");
  const void* in = x.untyped_data();
  size_t count = x.element_count();
  uint64_t h = shape_hash(x.dimensions());
  return post(group, "send to rank " + std::to_string(dst),
              [=](Group& g) { g.send(in, count, t, int(dst), h, int(tag)); });
}

ffi::Future Recv(ffi::Token, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Token>, int64_t group,
                 int64_t src, int64_t tag) {
  DType t = to_dtype(y->element_type());
  if (t == DType::kCount) return failed("recv: unsupported dtype");
  void* out = y->untyped_data();
  size_t count = y->element_count();
  uint64_t h = shape_hash(y->dimensions());
  return post(group, "recv from rank " + std::to_string(src),
              [=](Group& g) { g.recv(out, count, t, int(src), h, int(tag)); });
}

ffi::Future SendRecv(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group, int64_t dst, int64_t src, int64_t tag) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount || to_dtype(y->element_type()) != t)
    return failed("sendrecv: unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  size_t send_count = x.element_count(), recv_count = y->element_count();
  uint64_t hs = shape_hash(x.dimensions()), hr = shape_hash(y->dimensions());
  return post(group, "sendrecv", [=](Group& g) {
    g.sendrecv(in, send_count, int(dst), hs, out, recv_count, int(src), hr, t, int(tag));
  });
}

ffi::Future AllToAll(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::Token>, int64_t group, ffi::Span<const int64_t> send_sizes,
                     ffi::Span<const int64_t> recv_sizes) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return failed("all_to_all: unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  const size_t row = row_elements(x.dimensions());
  auto sends = row_counts(send_sizes, row), recvs = row_counts(recv_sizes, row);
  uint64_t h = shape_hash(x.dimensions(), 1);
  return post(group, "all_to_all", [=](Group& g) { g.all_to_all(in, sends, out, recvs, t, h); });
}

// Rooted collectives (ffi/decode.h says which buffer is the block every rank shares).
using Rooted = void (Group::*)(const void*, void*, size_t, DType, int, uint64_t);

ffi::Future rooted(const char* name, Rooted op, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                   int64_t group, int64_t root, bool block_is_output) {
  DType t = to_dtype(x.element_type());
  if (t == DType::kCount) return failed(std::string(name) + ": unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  const RootedBlock b = rooted_block(x, *y, block_is_output);
  return post(group, name, [=](Group& g) { (g.*op)(in, out, b.count, t, int(root), b.hash); });
}

ffi::Future Broadcast(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::Token>, int64_t group, int64_t root) {
  return rooted("broadcast", &Group::broadcast, x, y, group, root, false);
}

ffi::Future Gather(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::Token>, int64_t group, int64_t root) {
  return rooted("gather", &Group::gather, x, y, group, root, false);
}

ffi::Future Scatter(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                    ffi::Result<ffi::Token>, int64_t group, int64_t root) {
  return rooted("scatter", &Group::scatter, x, y, group, root, true);
}

ffi::Future Reduce(ffi::AnyBuffer x, ffi::Token, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::Token>, int64_t group, int64_t root, int64_t reduce) {
  DType t = to_dtype(x.element_type());
  const std::string name = std::string("reduce_") + reduce_name(ReduceOp(reduce));
  if (t == DType::kCount) return failed(name + ": unsupported dtype");
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  const size_t count = x.element_count();
  const uint64_t h = shape_hash(x.dimensions());
  return post(group, name, [=](Group& g) { g.reduce(in, out, count, t, ReduceOp(reduce), int(root), h); });
}

ffi::Future Barrier(ffi::Token, ffi::Result<ffi::Token>, int64_t group) {
  return post(group, "barrier", [](Group& g) { g.barrier(); });
}

}  // namespace

#define MLXDIST_CPU_HANDLER(fn, target, binding) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kCpu##fn, fn, ffi::Ffi::Bind() binding);
MLXDIST_FFI_OPS(MLXDIST_CPU_HANDLER)

std::vector<std::pair<std::string, void*>> cpu_targets() {
#define MLXDIST_CPU_TARGET(fn, target, binding) {target, reinterpret_cast<void*>(kCpu##fn)},
  return {MLXDIST_FFI_OPS(MLXDIST_CPU_TARGET)};
}

}  // namespace mlxdist::ffi_handlers
