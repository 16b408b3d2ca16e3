// Unit tests of the storage pieces the loader builds on: tensor_storage (ownership, counters,
// move), file_region (ranges of files), the `file` backend, weight_store ties and the
// progress bar's text and terminal detection.
#include <stowage/dispatch/progress.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/storage/deep_copy.hpp>
#include <stowage/storage/file.hpp>
#include <stowage/storage/tensor_storage.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;
using namespace stowage;
using storage::storage_kind;
using storage::tensor_storage;

TEST_CASE("tensor_storage owns its bytes and is counted per backend", "[storage]") {
  const auto h0 = storage::live_allocations(storage_kind::host);
  const auto b0 = storage::live_bytes(storage_kind::host);
  {
    auto s = tensor_storage::allocate_host(tensor_desc{"w", {3, 4}, dtype::bfloat16});
    CHECK(s.size() == 24);
    CHECK(s.kind() == storage_kind::host);
    CHECK(s.placement() == device::cpu());
    CHECK(storage::live_allocations(storage_kind::host) == h0 + 1);
    CHECK(storage::live_bytes(storage_kind::host) == b0 + 24);
    std::memset(s.mutable_data(), 7, s.size());
    tensor_storage moved = std::move(s);
    CHECK(s.empty());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
    CHECK(moved.bytes()[23] == std::byte{7});
    CHECK(storage::live_allocations(storage_kind::host) == h0 + 1);
    auto scalar = tensor_storage::allocate_host(tensor_desc{"n", {}, dtype::int64});
    CHECK(scalar.size() == 8);
  }
  CHECK(storage::live_allocations(storage_kind::host) == h0);
  CHECK(storage::live_bytes(storage_kind::host) == b0);
  const auto p0 = storage::live_allocations(storage_kind::pinned_host);
  {
    auto p = tensor_storage::allocate_pinned(tensor_desc{"p", {5}, dtype::float32});
    CHECK(p.kind() == storage_kind::pinned_host);
    CHECK(p.host_accessible());
    CHECK(storage::live_allocations(storage_kind::pinned_host) == p0 + 1);
  }
  CHECK(storage::live_allocations(storage_kind::pinned_host) == p0);
}

TEST_CASE("file_region maps exactly a byte range of a file", "[storage]") {
  const fs::path p = fs::temp_directory_path() / ("stowage-region-" + std::to_string(::getpid()));
  {
    std::ofstream out(p, std::ios::binary);
    for (int i = 0; i < 10000; ++i) out.put(static_cast<char>(i % 251));
  }
  storage::file_region r(p, 5000, 16);  // not page-aligned
  REQUIRE(r.size() == 16);
  for (std::size_t i = 0; i < 16; ++i)
    CHECK(r.bytes()[i] == std::byte(static_cast<unsigned char>((5000 + i) % 251)));
  r.release_pages();  // drops residency only
  CHECK(r.bytes()[0] == std::byte(static_cast<unsigned char>(5000 % 251)));
  CHECK_THROWS_AS(storage::file_region(p, 9990, 11), io_error);
  CHECK_THROWS_AS(storage::file_region(p.string() + ".missing", 0, 1), io_error);
  const auto f0 = storage::live_allocations(storage_kind::file);
  {
    auto s = tensor_storage::from_file(tensor_desc{"x", {4}, dtype::float32},
                                       storage::file_region(p, 16, 16));
    CHECK(s.kind() == storage_kind::file);
    CHECK(s.placement().is_disk());
    CHECK(s.bytes()[0] == std::byte{16});
    CHECK_THROWS_AS(s.mutable_data(), error);
    CHECK(storage::live_allocations(storage_kind::file) == f0 + 1);
  }
  CHECK(storage::live_allocations(storage_kind::file) == f0);
  CHECK_THROWS_AS(tensor_storage::from_file(tensor_desc{"x", {5}, dtype::float32},
                                            storage::file_region(p, 0, 16)),
                  io_error);
  fs::remove(p);
}

TEST_CASE("the file backend allocates file-backed memory deep_copy can use", "[storage]") {
  storage::file f;
  storage::host h;
  void* a = f.allocate(1 << 16);
  void* b = h.allocate(1 << 16);
  std::memset(b, 0x5a, 1 << 16);
  storage::deep_copy(f, a, h, b, 1 << 16);
  CHECK(static_cast<unsigned char*>(a)[65535] == 0x5a);
  f.deallocate(a, 1 << 16);
  h.deallocate(b, 1 << 16);
  CHECK(storage::file{} == storage::file{});
}

TEST_CASE("weight_store: tied names share one storage; views keep the asked name", "[storage]") {
  weight_store w;
  auto s = tensor_storage::allocate_host(tensor_desc{"emb.weight", {2, 2}, dtype::float32});
  const void* addr = s.data();
  w.add(std::move(s));
  w.alias("head.weight", "emb.weight");
  CHECK(w.size() == 2);
  CHECK(w.storage_count() == 1);
  CHECK(w.shares_storage("head.weight", "emb.weight"));
  CHECK(w.view("head.weight").desc.name == "head.weight");
  CHECK(w.view("head.weight").data() == addr);
  CHECK(w.bytes_in(storage_kind::host) == 16);
  CHECK_THROWS_AS(w.alias("x", "missing"), model_error);
  CHECK_THROWS_AS(w.alias("head.weight", "emb.weight"), model_error);
  CHECK_THROWS_AS(
      w.add(tensor_storage::allocate_host(tensor_desc{"emb.weight", {1}, dtype::float32})),
      model_error);
  const parameter p({2, 2}, dtype::float32);
  CHECK(w.bind("head.weight", p).bytes().size() == 16);
  CHECK_THROWS_AS(w.bind("head.weight", parameter({4}, dtype::float32)), model_error);
}

TEST_CASE("the progress bar shows tensors, bytes, rate and time left, only on a terminal",
          "[progress]") {
  const std::string s = progress_bar::format(3, 10, 500'000'000, 2'000'000'000, 0.25);
  CHECK(s == "loading [######..................] 3/10 tensors  0.50/2.00 GB  2.00 GB/s  0.8s left");
  progress_bar never(1, 1, progress_mode::never);
  CHECK_FALSE(never.enabled());
  progress_bar autom(1, 1, progress_mode::automatic);
  CHECK(autom.enabled() == (::isatty(STDERR_FILENO) == 1));
  std::FILE* sink = std::tmpfile();
  {
    progress_bar forced(2, 100, progress_mode::always, sink);
    CHECK(forced.enabled());
    forced.add_bytes(100);
    forced.add_tensor();
    forced.add_tensor();
  }
  std::rewind(sink);
  char buf[256] = {};
  const std::size_t n = std::fread(buf, 1, sizeof buf - 1, sink);
  std::fclose(sink);
  const std::string text(buf, n);
  CHECK_THAT(text, Catch::Matchers::Contains("2/2 tensors"));
  CHECK(text.back() == '\n');
}
