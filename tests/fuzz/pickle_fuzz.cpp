// libFuzzer target: the restricted unpickler alone (data.pkl bytes), every storage reference
// accepted without an archive behind it. Only typed errors may come out; no allocation may
// outlive the call (the arena design rules out reference cycles).
#include <stowage/checkpoint/pickle.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    stowage::checkpoint::detail::restricted_unpickler up(bytes, "fuzz.bin", "archive/data.pkl");
    (void)up.run([](const stowage::checkpoint::pickle_storage_ref&) {});
  } catch (const stowage::error&) {}
  return 0;
}
