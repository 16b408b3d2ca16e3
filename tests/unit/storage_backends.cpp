// Storage backends: allocation, alignment, properties and deep_copy between host backends.
#include <catch2/catch.hpp>
#include <stowage/storage/deep_copy.hpp>
#include <stowage/storage/tensor_storage.hpp>

#include <cstdint>
#include <cstring>
#include <memory>
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

TEST_CASE("host_arena hands out aligned slices of one 2 MiB-aligned mapping", "[storage]") {
  constexpr std::size_t huge = st::host_arena::huge_page_bytes;
  st::host_arena a(3 * huge + 5, true);
  CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % huge == 0);
  CHECK(a.capacity() == 4 * huge);  // whole 2 MiB blocks
  auto* p = static_cast<std::byte*>(a.take(10));
  auto* q = static_cast<std::byte*>(a.take(0));  // empty tensors still get a distinct address
  auto* r = static_cast<std::byte*>(a.take(huge));
  CHECK(p == a.data());
  CHECK(q == p + st::default_alignment);
  CHECK(r == q + st::default_alignment);
  CHECK(a.used() == 2 * st::default_alignment + huge);
  std::memset(r, 0x5A, huge);
  // Giving a slice back leaves its neighbours' bytes alone and reads as zeros.
  std::memset(p, 0x11, 10);
  a.give_back(r, huge);
  CHECK(p[9] == std::byte{0x11});
  CHECK(r[huge / 2] == std::byte{0});
  CHECK_THROWS_AS(a.take(3 * huge), stowage::error);  // more than is left
  CHECK_NOTHROW(a.take(huge));
}

TEST_CASE("arena-backed tensor_storage counts as host memory and frees the arena last",
          "[storage]") {
  const auto count0 = st::live_allocations(st::storage_kind::host);
  const auto bytes0 = st::live_bytes(st::storage_kind::host);
  auto arena = std::make_shared<st::host_arena>(std::size_t{1} << 20, false);
  std::weak_ptr<st::host_arena> watch = arena;
  stowage::tensor_desc d;
  d.name = "w";
  d.dtype = stowage::dtype::bfloat16;
  d.shape = stowage::shape{256, 512};
  {
    auto s1 = st::tensor_storage::allocate_host(d, arena);
    auto s2 = st::tensor_storage::allocate_host(d, arena);
    arena.reset();  // the tensors keep it alive
    CHECK(s1.kind() == st::storage_kind::host);
    CHECK(s1.host_accessible());
    CHECK(s1.size() == 256 * 512 * 2);
    CHECK(s2.data() == static_cast<const std::byte*>(s1.data()) + s1.size());
    CHECK(st::live_allocations(st::storage_kind::host) == count0 + 2);
    CHECK(st::live_bytes(st::storage_kind::host) == bytes0 + 2 * 256 * 512 * 2);
    std::memset(s2.mutable_data(), 1, s2.size());
    auto moved = std::move(s2);
    CHECK(s2.empty());
    CHECK(moved.kind() == st::storage_kind::host);
    { auto gone = std::move(s1); }  // released while `moved` still uses the arena
    CHECK(!watch.expired());
    CHECK(static_cast<const unsigned char*>(moved.data())[moved.size() - 1] == 1);
    CHECK(st::live_allocations(st::storage_kind::host) == count0 + 1);
  }
  CHECK(watch.expired());
  CHECK(st::live_allocations(st::storage_kind::host) == count0);
  CHECK(st::live_bytes(st::storage_kind::host) == bytes0);
  // No room: an error, nothing counted.
  auto small = std::make_shared<st::host_arena>(1, false);
  d.shape = stowage::shape{2048, 1024};  // 4 MiB
  CHECK_THROWS_AS(st::tensor_storage::allocate_host(d, small), stowage::error);
  CHECK(st::live_allocations(st::storage_kind::host) == count0);
}
