// Verbs queue pairs over libibverbs (InfiniBand / RoCE): one reliable connected queue pair per
// peer. The library is loaded at run time with dlopen, so nothing here needs rdma-core to build.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "transport/verbs.h"

namespace mlxdist::ibverbs {

// Whether lib_path loads and lists at least one RDMA device: {true, "mlx5_0, mlx5_1"} or
// {false, one line saying why not}.
std::pair<bool, std::string> available(const std::string& lib_path = "libibverbs.so.1");

// Queue pairs from rank to every peer. devices[peer] names the local RDMA device ("mlx5_0", or
// "mlx5_0:2" for port 2) that reaches peer; devices[rank] is ignored (as in MLX_IBV_DEVICES
// rows). Every rank calls exchange exactly twice (addresses, then a barrier once its queue pairs
// are ready to send), also after a local failure, so that a failure on any rank throws DistError
// on all of them. lost names peers whose control connection closed (poll checks those it waits
// on). gid_index >= 0 overrides the RoCE GID
// (MLXDIST_IBV_GID_INDEX).
std::unique_ptr<verbs::QueuePairs> connect(int rank, int size,
                                           const std::vector<std::string>& devices,
                                           const AllGather& exchange,
                                           PeerNames names, LostPeers lost, int gid_index,
                                           const std::string& lib_path = "libibverbs.so.1");

}  // namespace mlxdist::ibverbs
