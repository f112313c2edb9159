// Everything a world's connection is configured by, in one struct: Python's _config.py reads
// and checks each environment variable once and fills this (README, "Configuration"); nothing
// on this side reads the environment.
#pragma once

#include <string>

namespace mlxdist {

struct Settings {
  double timeout_s = 300;            // MLXDIST_TIMEOUT: the longest a wait on a peer may stall
  std::string token;                 // MLXDIST_TOKEN: proven by every connection ("" none)
  bool verbose = false;              // MLX_RING_VERBOSE
  std::string transport = "auto";    // MLXDIST_TRANSPORT: the ring's data path (auto, tcp, shm)
  std::string jaccl_transport = "auto";  // MLXDIST_JACCL_TRANSPORT: auto, shm, ibverbs
  bool jaccl_ring = false;           // MLX_JACCL_RING: JACCL runs the ring algorithms
  std::string ibverbs_lib;           // MLXDIST_IBV_LIB ("" libibverbs.so.1)
  int ibv_gid_index = -1;            // MLXDIST_IBV_GID_INDEX (-1: pick one)
  std::string nccl_lib;              // MLXDIST_NCCL_LIB, or the NCCL wheel's
  int nccl_device = 0;               // this rank's CUDA device, as JAX numbers it
  bool nccl_check = true;            // MLXDIST_NCCL_CHECK
  std::string mpi_lib;               // MLXDIST_MPI_LIB, or the libmpi beside mpirun
};

}  // namespace mlxdist
