// Offload hooks and prefetch (accelerate-spec §7): execution devices per block, the main
// device, io_same_device on the root only, tied weights stored once, dispatch_model /
// cpu_offload / disk_offload re-placing a loaded model, and the prefetcher's bound on blocks
// in flight.
#include "support/temp_dir.hpp"

#include <stowage/dispatch/load.hpp>
#include <stowage/dispatch/offload.hpp>
#include <stowage/dispatch/quantized_weights.hpp>
#include <stowage/exec/cpu/linear.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace sw = stowage;
namespace fs = std::filesystem;
using model_t = sw::models::llama_for_causal_lm<sw::precision::fp32>;

using stowage_test::temp_dir;

namespace {

const std::string tiny = std::string(STOWAGE_FIXTURES_DIR) + "/tiny/models/";

sw::module_tree tree_of(const std::string& name) {
  const auto cfg = sw::models::llama_config::from_file(tiny + name + "/config.json");
  return sw::to_module_tree(sw::init_empty<model_t>(cfg));
}

sw::dispatched_weights load(const std::string& name, const sw::device_map& map,
                            const std::optional<fs::path>& folder = std::nullopt) {
  sw::load_options o;
  o.offload_folder = folder;
  o.progress = sw::progress_mode::never;
  return sw::load_checkpoint_and_dispatch(tree_of(name), tiny + name + "/model.safetensors", map,
                                          o);
}

}  // namespace

TEST_CASE("hooks: one per placed block, execution devices and offload flags (§7.1, §7.3)",
          "[dispatch][hooks]") {
  temp_dir tmp("dispatch-offload");
  const sw::device_map map{
      {"model.embed_tokens", sw::device::cpu()}, {"model.layers.0", sw::device::cpu()},
      {"model.layers.1", sw::device::disk()},    {"model.layers.2", sw::device::disk()},
      {"model.norm", sw::device::cpu()},         {"lm_head", sw::device::disk()}};
  const auto w = load("llama_gqa", map, tmp.path / "offload");

  SECTION("CPU main device: only disk blocks are offloaded, all execute on the CPU") {
    const auto t = sw::make_hooks(w);
    CHECK(t.main_device == sw::device::cpu());
    REQUIRE(t.hooks.size() == map.size() + 1);  // + the root hook ("" is not a key)
    for (const auto& [k, d] : map) {
      const auto* h = t.find(k);
      REQUIRE(h != nullptr);
      CHECK(h->execution_device == sw::device::cpu());
      CHECK(h->offload == d.is_disk());
      CHECK_FALSE(h->io_same_device);
      CHECK_FALSE(h->tensors.empty());
    }
    const auto* root = t.find("");
    REQUIRE(root != nullptr);
    CHECK(root->io_same_device);
    CHECK_FALSE(root->offload);
    CHECK(root->tensors.empty());
    CHECK(t.hook_for_tensor("model.layers.1.mlp.up_proj.weight")->module == "model.layers.1");
    CHECK(t.hook_for_tensor("lm_head.weight")->module == "lm_head");
  }
  SECTION("a GPU main device offloads cpu blocks too and runs them there") {
    const auto t = sw::make_hooks(w, sw::device::gpu(0));
    for (const auto& [k, d] : map) {
      const auto* h = t.find(k);
      REQUIRE(h != nullptr);
      CHECK(h->execution_device == sw::device::gpu(0));
      CHECK(h->offload);  // {"cpu", "disk"} are offloaded when the main device is a GPU
    }
    CHECK(t.find("")->execution_device == sw::device::gpu(0));
  }
  SECTION("a map with a \"\" key gets no extra root hook, and \"\" has io_same_device") {
    const auto all = load("llama_gqa", sw::device_map{{"", sw::device::cpu()}});
    const auto t = sw::make_hooks(all);
    REQUIRE(t.hooks.size() == 1);
    CHECK(t.hooks[0].io_same_device);
    CHECK_FALSE(t.hooks[0].offload);
    CHECK(t.hooks[0].tensors.size() == all.weights().size());
  }
}

TEST_CASE("tied parameters share one storage wherever they live", "[dispatch][ties]") {
  temp_dir tmp("dispatch-offload");
  for (const auto& d : {sw::device::cpu(), sw::device::disk()}) {
    INFO("placed on " << d.to_string());
    const auto w = load("llama3_tied", sw::device_map{{"", d}}, tmp.path / d.to_string());
    CHECK(w.weights().shares_storage("lm_head.weight", "model.embed_tokens.weight"));
    CHECK(w.weights().storage_count() + 1 == w.weights().size());
    const auto t = sw::make_hooks(w);
    REQUIRE(t.tied_groups.size() == 1);
    CHECK(t.tied_groups[0] ==
          std::vector<std::string>{"model.embed_tokens.weight", "lm_head.weight"});
    const auto dims = sw::exec::llama_dims::from_file(tiny + "llama3_tied/config.json");
    sw::offloaded_llama_weights src(w, dims);
    const auto e = src.embed_tokens();
    const auto h = src.lm_head();
    CHECK(e.data == w.weights().find("model.embed_tokens.weight")->data());
    if (src.prefetcher().reads_into_buffers()) {
      // On disk the one stored copy is read into the head block's buffer for the call.
      REQUIRE(d.is_disk());
      CHECK(h.data == src.prefetcher().data(src.prefetcher().size() - 1, e.data));
      CHECK(std::memcmp(h.data, e.data, static_cast<std::size_t>(h.numel()) * 4) == 0);
    } else {
      CHECK(e.data == h.data);  // one copy
    }
  }
}

TEST_CASE("dispatch_model re-places a loaded model; cpu_offload and disk_offload",
          "[dispatch][dispatch_model]") {
  temp_dir tmp("dispatch-offload");
  const auto tree = tree_of("llama3_tied");
  auto all_cpu = [&] {
    sw::load_options o;
    o.progress = sw::progress_mode::never;
    return sw::load_checkpoint_in_model(tree, tiny + "llama3_tied/model.safetensors",
                                        sw::device_map{{"", sw::device::cpu()}}, o);
  };
  auto reference = all_cpu();
  const auto ref_names = reference.weights.names();

  SECTION("a split map writes the disk blocks to the folder and keeps the rest in memory") {
    auto loaded = all_cpu();
    const sw::device_map map{{"model.embed_tokens", sw::device::cpu()},
                             {"model.layers.0", sw::device::cpu()},
                             {"model.layers.1", sw::device::disk()},
                             {"model.norm", sw::device::disk()},
                             {"lm_head", sw::device::cpu()}};
    const auto folder = tmp.path / "split";
    auto m = sw::dispatch_model(tree, std::move(loaded.weights), map,
                                {.offload_folder = folder, .main_device = std::nullopt});
    CHECK(loaded.weights.size() == 0);  // moved out, nothing copied twice
    CHECK(fs::is_regular_file(folder / "index.json"));
    CHECK(fs::is_regular_file(folder / "model.layers.1.mlp.up_proj.weight.dat"));
    CHECK_FALSE(fs::exists(folder / "model.layers.0.mlp.up_proj.weight.dat"));
    CHECK(m.hf_device_map() == map);
    CHECK(m.weights.weights().names() == ref_names);
    CHECK(m.weights.weights().at("model.layers.1.mlp.up_proj.weight").kind() ==
          sw::storage::storage_kind::file);
    CHECK(m.weights.weights().at("model.layers.0.mlp.up_proj.weight").kind() ==
          sw::storage::storage_kind::host);
    CHECK(m.weights.weights().shares_storage("lm_head.weight", "model.embed_tokens.weight"));
    for (const auto& n : ref_names) {
      const auto a = m.weights.weights().at(n).bytes();
      const auto b = reference.weights.at(n).bytes();
      REQUIRE(a.size() == b.size());
      CHECK(std::equal(a.begin(), a.end(), b.begin()));
    }
    CHECK(m.hooks.find("model.layers.1")->offload);
    CHECK_FALSE(m.hooks.find("model.layers.0")->offload);
  }
  SECTION("disk_offload: everything served from the folder; a second call reuses it") {
    auto loaded = all_cpu();
    const auto folder = tmp.path / "disk";
    auto m = sw::disk_offload(tree, std::move(loaded.weights), folder);
    for (const auto& n : ref_names)
      CHECK(m.weights.weights().at(n).kind() == sw::storage::storage_kind::file);
    CHECK(m.hooks.find("")->offload);
    CHECK(m.hooks.find("")->io_same_device);
    const auto mtime = fs::last_write_time(folder / "index.json");
    auto again = sw::disk_offload(tree, std::move(all_cpu().weights), folder);
    CHECK(fs::last_write_time(folder / "index.json") == mtime);
    // And back: dispatch_model to "cpu" copies the bytes into memory again.
    (void)again;
    auto back = sw::dispatch_model(tree, std::move(m.weights).release_weights(),
                                   sw::device_map{{"", sw::device::cpu()}});
    for (const auto& n : ref_names) {
      const auto& s = back.weights.weights().at(n);
      CHECK(s.kind() == sw::storage::storage_kind::host);
      const auto a = s.bytes();
      const auto b = reference.weights.at(n).bytes();
      CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    }
    CHECK(back.weights.weights().shares_storage("lm_head.weight", "model.embed_tokens.weight"));
  }
  SECTION("cpu_offload: weights in host memory, offloaded hooks on the execution device") {
    auto loaded = all_cpu();
    auto m = sw::cpu_offload(tree, std::move(loaded.weights), sw::device::gpu(0));
    CHECK(m.hooks.main_device == sw::device::gpu(0));
    CHECK(m.hooks.find("")->execution_device == sw::device::gpu(0));
    CHECK(m.hooks.find("")->offload);
    for (const auto& n : ref_names)
      CHECK(m.weights.weights().at(n).kind() == sw::storage::storage_kind::host);
  }
  SECTION("a disk map without a folder names the modules to offload") {
    auto loaded = all_cpu();
    CHECK_THROWS_WITH(sw::dispatch_model(tree, std::move(loaded.weights),
                                         sw::device_map{{"", sw::device::disk()}}),
                      Catch::Contains("We need an `offload_dir`"));
  }
  SECTION("a map missing a tensor is rejected before anything moves") {
    auto loaded = all_cpu();
    CHECK_THROWS_AS(sw::dispatch_model(tree, std::move(loaded.weights),
                                       sw::device_map{{"model", sw::device::cpu()}}),
                    sw::device_map_error);
    CHECK(loaded.weights.size() == ref_names.size());
  }
}

TEST_CASE("block_prefetcher keeps at most blocks_in_flight blocks requested",
          "[dispatch][prefetch]") {
  temp_dir tmp("dispatch-offload");
  const auto file = tmp.path / "blocks.bin";
  const std::size_t block_bytes = 1 << 16, n = 6;
  {
    std::ofstream out(file, std::ios::binary);
    std::vector<char> buf(block_bytes * n, 'x');
    out.write(buf.data(), static_cast<std::streamsize>(buf.size()));
  }
  std::vector<sw::storage::file_region> regions;
  for (std::size_t i = 0; i < n; ++i) regions.emplace_back(file, i * block_bytes, block_bytes);
  for (const int mode : {0, 1, 2})
    for (std::size_t k : {1u, 2u, 3u}) {
      const bool reader = mode != 2;
      INFO("blocks_in_flight " << k
                               << (mode == 0   ? " (reader threads, buffers)"
                                   : mode == 1 ? " (reader thread, mapped)"
                                               : " (madvise only)"));
      std::vector<std::vector<const sw::storage::file_region*>> blocks(n + 1);
      for (std::size_t i = 0; i < n; ++i) blocks[i] = {&regions[i]};
      // Block n is resident (no file regions): it costs nothing and is never counted.
      sw::block_prefetcher p(std::move(blocks), {.blocks_in_flight = k,
                                                 .background_reader = reader,
                                                 .release_after_use = true,
                                                 .wrap_around = true,
                                                 .read_into_buffers = mode == 0});
      CHECK(p.reads_into_buffers() == (mode == 0));
      std::size_t peak = 0;
      for (int pass = 0; pass < 2; ++pass)
        for (std::size_t u = 0; u <= n; ++u) {
          p.acquire(u);
          peak = std::max(peak, p.in_flight());
          CHECK(p.in_flight() <= k);
          p.release(u);
        }
      const auto s = p.stats();
      CHECK(s.max_in_flight == k);
      CHECK(peak == k);
      CHECK(s.releases == 2 * n);
      // Every file block fetched once a pass (plus what the wrap requested for the next pass).
      CHECK(s.requests >= 2 * n);
      CHECK(s.requests <= 2 * n + k);
      CHECK(p.in_flight() == s.requests - s.releases);
    }
  CHECK_THROWS_AS(sw::block_prefetcher({}, {.blocks_in_flight = 0}), sw::invalid_config);
}

TEST_CASE(
    "block_prefetcher reads blocks into buffers: every region's bytes, at the file's "
    "alignment, coalesced where adjacent; a failed read is an io_error and is retried",
    "[dispatch][prefetch]") {
  auto byte_at = [](std::size_t i, int salt) {
    return static_cast<char>((i * 31 + 7 + static_cast<std::size_t>(salt)) % 251);
  };
  auto write = [&](const fs::path& f, std::size_t n, int salt) {
    std::ofstream out(f, std::ios::binary);
    std::vector<char> buf(n);
    for (std::size_t i = 0; i < n; ++i) buf[i] = byte_at(i, salt);
    out.write(buf.data(), static_cast<std::streamsize>(buf.size()));
  };
  std::vector<fs::path> dirs{fs::temp_directory_path()};
  if (fs::is_directory("/dev/shm")) dirs.emplace_back("/dev/shm");  // tmpfs: no O_DIRECT
  for (const auto& base : dirs) {
    const fs::path dir = base / ("stowage-prefetch-buffers-" + std::to_string(::getpid()) + "-" +
                                 std::to_string(&base - dirs.data()));
    fs::create_directories(dir);
    struct cleanup {
      fs::path p;
      ~cleanup() {
        std::error_code ec;
        fs::remove_all(p, ec);
      }
    } cleanup_dir{dir};
    const auto a = dir / "a.bin", b = dir / "b.bin";
    const std::size_t a_size = 3 * 65536 + 1234, b_size = 10000;  // not page multiples
    write(a, a_size, 0);
    write(b, b_size, 1);
    auto evict = [&] {  // out of the page cache: the first reads use O_DIRECT (where enabled)
      for (const auto& f : {a, b}) {
        const int fd = ::open(f.c_str(), O_RDONLY);
        REQUIRE(fd >= 0);
        ::fdatasync(fd);
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        ::close(fd);
      }
    };
    std::vector<sw::storage::file_region> r;
    r.emplace_back(a, 100, 5000);                   // 0
    r.emplace_back(a, 5100, 7000);                  // 1: adjacent to 0
    r.emplace_back(a, 50000, 3000);                 // 2: 38 KB further on
    r.emplace_back(a, 150000, a_size - 150000);     // 3: up to the end of the file
    r.emplace_back(b, 8, 4000);                     // 4: another file
    r.emplace_back(a, 2 * 65536 + 8, 9000 - 1000);  // 5: far from 0..2
    const auto layout = sw::detail::plan_block_reads({&r[0], &r[1], &r[2]});
    CHECK(layout.reads.size() == 1);
    CHECK(sw::detail::plan_block_reads({&r[0], &r[3], &r[4]}).reads.size() == 3);
    for (const std::size_t threads : {1u, 2u})
      for (const std::size_t chunk : {std::size_t{4096}, std::size_t{16} << 20}) {
        const bool direct = chunk == 4096 || threads == 1;  // buffered pread in one
        INFO(dir << ", " << threads << " reader threads, pieces of " << chunk
                 << (direct ? ", O_DIRECT" : ", buffered"));
        std::vector<std::vector<const sw::storage::file_region*>> blocks{
            {&r[2], &r[0], &r[1]}, {}, {&r[3], &r[4], &r[5]}, {&r[2]}};
        sw::block_prefetcher p(std::move(blocks), {.blocks_in_flight = 2,
                                                   .read_into_buffers = true,
                                                   .reader_threads = threads,
                                                   .read_chunk_bytes = chunk,
                                                   .direct_io = direct});
        REQUIRE(p.reads_into_buffers());
        CHECK(p.direct_io() == direct);
        evict();
        const std::vector<std::vector<std::size_t>> regions_of{{0, 1, 2}, {}, {3, 4, 5}, {2}};
        for (int pass = 0; pass < 2; ++pass)
          for (std::size_t u = 0; u < regions_of.size(); ++u) {
            p.acquire(u);
            for (std::size_t i : regions_of[u]) {
              const auto* got = p.data(u, r[i].data());
              CHECK(got != r[i].data());
              CHECK(reinterpret_cast<std::uintptr_t>(got) % 4096 == r[i].offset() % 4096);
              CHECK(std::memcmp(got, r[i].data(), r[i].size()) == 0);
              const auto* last = r[i].data() + r[i].size() - 1;
              CHECK(p.data(u, last) == got + r[i].size() - 1);
              CHECK(static_cast<char>(*p.data(u, last)) ==
                    byte_at(r[i].offset() + r[i].size() - 1, i == 4 ? 1 : 0));
            }
            p.release(u);
          }
        // Not acquired (or not in the block): served from the mapping.
        CHECK(p.data(1, r[0].data()) == r[0].data());
      }
    {  // direct_io unset: O_DIRECT only when the blocks exceed half of the available RAM
      const auto avail = sw::available_host_memory();
      REQUIRE(avail);
      CHECK_FALSE(sw::detail::direct_io_pays(0));
      CHECK_FALSE(sw::detail::direct_io_pays(static_cast<std::uint64_t>(*avail) / 4));
      CHECK(sw::detail::direct_io_pays(static_cast<std::uint64_t>(*avail) * 2));
      std::vector<std::vector<const sw::storage::file_region*>> blocks{{&r[0]}};
      sw::block_prefetcher p(std::move(blocks), {.blocks_in_flight = 1});
      CHECK(p.reads_into_buffers());
      CHECK_FALSE(p.direct_io());  // a few KB: buffered, the page cache keeps them
    }
    {  // a file cut short after it was mapped
      std::vector<std::vector<const sw::storage::file_region*>> blocks{{&r[0]}, {&r[3]}};
      sw::block_prefetcher p(std::move(blocks), {.blocks_in_flight = 2, .wrap_around = false});
      fs::resize_file(a, 140000);  // r[3] lies past the end now
      p.acquire(0);
      CHECK(std::memcmp(p.data(0, r[0].data()), r[0].data(), r[0].size()) == 0);
      p.release(0);
      CHECK_THROWS_AS(p.acquire(1), sw::io_error);
      CHECK(p.in_flight() == 0);
      fs::resize_file(a, a_size);  // back (zeros): read again
      p.acquire(1);
      CHECK(std::memcmp(p.data(1, r[3].data()), r[3].data(), r[3].size()) == 0);
      p.acquire(0);  // destroyed with two blocks in flight: no hang, buffers freed
    }
  }
}

TEST_CASE(
    "quantized weights multiply in place: fused product for small batches, row decoder "
    "beyond, both equal to the dequantized float32 product",
    "[dispatch][quantized][linear]") {
  // down_proj of llama_gqa: [64, 160], so 4-bit blocks of 64 cross rows (160 = 2.5 blocks).
  const std::string dir = std::string(STOWAGE_FIXTURES_DIR) + "/tiny/models/llama_gqa";
  const auto tree = sw::to_module_tree(
      sw::init_empty<model_t>(sw::models::llama_config::from_file(dir + "/config.json")));
  const std::string name = "model.layers.1.mlp.down_proj.weight";
  sw::exec::thread_pool pool(2);
  for (const bool four_bit : {true, false}) {
    INFO((four_bit ? "nf4" : "int8"));
    sw::load_options lo;
    lo.progress = sw::progress_mode::never;
    sw::precision::bnb_config c;
    (four_bit ? c.load_in_4bit : c.load_in_8bit) = true;
    lo.quantization = c;
    const auto loaded =
        sw::load_checkpoint_in_model(tree, dir + "/model.safetensors", {{"", "cpu"}}, lo);
    const auto q = sw::quantized_weight::from_store(loaded.weights, name);
    REQUIRE(q.rows() == 64);
    REQUIRE(q.cols() == 160);
    std::vector<float> w(64 * 160);
    sw::dequantize_into(loaded.weights, name, w.data());
    const auto ref = q.weight_ref();
    CHECK(ref.matmul != nullptr);
    std::vector<float> bias(64);
    for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = 0.01f * static_cast<float>(i);
    for (const std::int64_t m : {1, 3, 8, 9, 20}) {  // <= 8: fused; > 8: row decoder + GEMM
      INFO("rows " << m);
      std::vector<float> x(static_cast<std::size_t>(m) * 160);
      for (std::size_t i = 0; i < x.size(); ++i)
        x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + 0.01f * static_cast<float>(i % 7));
      const auto y = sw::exec::cpu::linear(x, m, ref, bias, pool);
      REQUIRE(y.size() == static_cast<std::size_t>(m) * 64);
      for (std::int64_t i = 0; i < m; ++i)
        for (std::size_t r = 0; r < 64; ++r) {
          double want = bias[r];
          for (std::size_t k = 0; k < 160; ++k)
            want += static_cast<double>(x[static_cast<std::size_t>(i) * 160 + k]) * w[r * 160 + k];
          const float got = y[static_cast<std::size_t>(i) * 64 + r];
          if (std::abs(got - want) > 1e-5 * (1.0 + std::abs(want)))
            FAIL("row " << i << " output " << r << ": " << got << " vs " << want);
        }
    }
  }
}
