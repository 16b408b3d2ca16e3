// storage::device and deep_copy across host, pinned_host and device memory.
#include "cuda_test_main.hpp"

#include <stowage/storage/deep_copy.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

namespace st = stowage::storage;

TEST_CASE("device memory round-trips through pinned and pageable host memory") {
  st::device dev{0};
  st::pinned_host pin;
  st::host h;
  std::vector<std::uint8_t> src(1 << 20);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::uint8_t>(i * 13 + 1);
  void* d = dev.allocate(src.size());
  void* p = pin.allocate(src.size());
  st::deep_copy(dev, d, h, src.data(), src.size());
  st::deep_copy(pin, p, dev, d, src.size());
  CHECK(std::memcmp(p, src.data(), src.size()) == 0);
  pin.deallocate(p, src.size());
  dev.deallocate(d, src.size());
}
