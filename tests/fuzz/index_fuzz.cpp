// libFuzzer target: the JSON index files (model.safetensors.index.json and friends, flat form)
// and accelerate's offload index.json on arbitrary bytes: typed errors only, and every shard
// name accepted stays inside the checkpoint folder.
#include <stowage/checkpoint/sharded.hpp>
#include <stowage/storage/offload_folder.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto ix = stowage::checkpoint::parse_index(text, "/ckpt/model.safetensors.index.json");
    for (const auto& s : ix.shards) {
      // Accepted names are relative and have no "." or ".." component.
      if (s.empty() || s.front() == '/') std::abort();
      std::size_t i = 0;
      while (i <= s.size()) {
        const std::size_t j = std::min(s.find('/', i), s.size());
        const std::string_view part(s.data() + i, j - i);
        if (part == ".." || part == "." || part.empty()) std::abort();
        i = j + 1;
      }
    }
    (void)stowage::checkpoint::index_json(ix.metadata, ix.weight_map);
  } catch (const stowage::error&) {}
  try {
    (void)stowage::storage::parse_offload_index(text, "index.json");
  } catch (const stowage::error&) {}
  return 0;
}
