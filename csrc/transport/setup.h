// What start-up gives a transport: an exchange over the group's control channel and names of
// peers for messages. Transports use these to publish where they can be reached.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace mlxdist {

// Exchanges one blob per rank over the group's set-up channel (all ranks, same order).
using AllGather = std::function<std::vector<std::string>(const std::string& mine)>;
// "rank 3 (10.0.0.2:5000)" for messages.
using PeerNames = std::function<std::string(int peer)>;
// Names of those of the given peers whose control connection closed ("" when none).
using LostPeers = std::function<std::string(const std::vector<int>& peers)>;

}  // namespace mlxdist
