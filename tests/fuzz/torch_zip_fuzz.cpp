// libFuzzer target: the torch.save reader (format detection, zip central directory with ZIP64,
// restricted unpickler, storage validation) on arbitrary bytes, then every accepted tensor is
// materialised (zero-copy or gathered) to prove its bytes lie inside the input.
#include <stowage/checkpoint/torch_zip.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto layout = stowage::checkpoint::parse_torch_zip(bytes, "fuzz.bin");
    for (const auto& t : layout.tensors) {
      if (t.storage_file_offset + t.storage_nbytes > size) std::abort();
      if (t.desc.nbytes() > (std::uint64_t(1) << 24)) continue;  // keep each run small
      const auto storage = bytes.subspan(static_cast<std::size_t>(t.storage_file_offset),
                                         static_cast<std::size_t>(t.storage_nbytes));
      const auto out = stowage::checkpoint::gather_tensor(t, storage, layout.big_endian);
      if (out.size() != t.desc.nbytes()) std::abort();
    }
  } catch (const stowage::error&) {}
  return 0;
}
