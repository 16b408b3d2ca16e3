// tests/support/pretrained_options.hpp: the from_pretrained options the placement tests (CPU
// conformance and CUDA) load the tiny models with: a given device map, an offload folder, two
// loader threads, no progress bar.
#pragma once

#include <stowage/dispatch/from_pretrained.hpp>

#include <filesystem>

namespace stowage_test {

inline stowage::pretrained_options pretrained_options_for(const stowage::device_map& map,
                                                          const std::filesystem::path& folder) {
  stowage::pretrained_options o;
  o.device_map = map;
  o.offload_folder = folder;
  o.threads = 2;
  o.load.progress = stowage::progress_mode::never;
  return o;
}

}  // namespace stowage_test
