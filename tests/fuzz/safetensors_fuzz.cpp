// libFuzzer target: the whole safetensors validation (header length, UTF-8, strict JSON with
// duplicate detection, schema, offsets, coverage) on arbitrary bytes. Every outcome must be
// either a layout or a stowage::error; views of an accepted layout must stay inside the input.
#include <stowage/checkpoint/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto layout = stowage::checkpoint::parse_safetensors(bytes, "fuzz.safetensors");
    std::uint64_t sum = 0;
    for (const auto& t : layout.tensors) {
      if (layout.data_start + t.end > size || t.end < t.begin)
        std::abort();  // would be out of bounds
      sum += t.end - t.begin;
    }
    if (layout.data_start + sum != size) std::abort();
  } catch (const stowage::error&) {}
  return 0;
}
