// Storage backends: allocation, alignment, properties and deep_copy between host backends.
#include <catch2/catch.hpp>
#include <stowage/storage/deep_copy.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

namespace st = stowage::storage;

TEMPLATE_TEST_CASE("host-accessible backends allocate aligned, writable memory", "[storage]",
                   st::host, st::pinned_host) {
  TestType backend;
  for (std::size_t bytes :
       {std::size_t{0}, std::size_t{1}, std::size_t{4096}, std::size_t{1} << 20}) {
    void* p = backend.allocate(bytes, st::default_alignment);
    REQUIRE(p != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(p) % st::default_alignment == 0);
    if (bytes) std::memset(p, 0xAB, bytes);
    backend.deallocate(p, bytes, st::default_alignment);
  }
  CHECK(TestType{} == TestType{});
}

TEST_CASE("deep_copy moves bytes between host and pinned_host", "[storage]") {
  st::host h;
  st::pinned_host pin;
  std::vector<std::uint8_t> src(1000);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::uint8_t>(i * 7);
  void* a = pin.allocate(src.size());
  void* b = h.allocate(src.size());
  st::deep_copy(pin, a, h, src.data(), src.size());
  st::deep_copy(h, b, pin, a, src.size());
  CHECK(std::memcmp(b, src.data(), src.size()) == 0);
  h.deallocate(b, src.size());
  pin.deallocate(a, src.size());
}
