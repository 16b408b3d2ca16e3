// Unit tests of the loading path: errors raised before anything is loaded, interrupted loads
// that free everything and leave the offload folder complete or absent, injected write
// failures (ENOSPC), reuse of and merging into existing offload folders, execution devices,
// transparent huge pages on and off giving the same bytes (pread pieces at odd offsets), and a
// checkpoint truncated under the loader (io_error naming file and offset, nothing leaked).
// Expected tensor bytes come from tests/fixtures/load/cases.json (torch), not from stowage.
#include "support/temp_dir.hpp"

#include <stowage/dispatch/load.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/precision/floating.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fs = std::filesystem;
using namespace stowage;
using storage::live_allocations;
using storage::storage_kind;

using stowage_test::temp_dir;

namespace {

const fs::path load_dir = fs::path(STOWAGE_FIXTURES_DIR) / "load";

module_tree f1_tree() {
  return load_module_tree(std::string(STOWAGE_FIXTURES_DIR) + "/module_trees/F1.json");
}

models::llama_for_causal_lm<precision::fp32> llama_model() {
  const auto cfg =
      models::llama_config::from_file((load_dir / "llama_st" / "config.json").string());
  return init_empty<models::llama_for_causal_lm<precision::fp32>>(cfg);
}

device_map llama_map() {
  return device_map{{"model.embed_tokens", "cpu"}, {"model.layers.0", "cpu"},
                    {"model.layers.1", "disk"},    {"model.norm", "disk"},
                    {"model.rotary_emb", "cpu"},   {"lm_head", "cpu"}};
}

struct live_snapshot {
  std::int64_t host = live_allocations(storage_kind::host),
               pinned = live_allocations(storage_kind::pinned_host),
               file = live_allocations(storage_kind::file);
  bool same() const {
    return host == live_allocations(storage_kind::host) &&
           pinned == live_allocations(storage_kind::pinned_host) &&
           file == live_allocations(storage_kind::file);
  }
};

std::size_t entries_in(const fs::path& dir) {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
  return n;
}

nlohmann::json case_json(const std::string& id) {
  std::ifstream in(load_dir / "cases.json");
  const auto all = nlohmann::json::parse(in);
  for (const auto& c : all["cases"])
    if (c["id"] == id) return c;
  FAIL("no case " << id);
  return {};
}

std::string hex(std::span<const std::byte> b) {
  std::string s;
  char buf[3];
  for (auto x : b) {
    std::snprintf(buf, sizeof buf, "%02x", static_cast<unsigned>(x));
    s += buf;
  }
  return s;
}

}  // namespace

TEST_CASE("a map naming a GPU or disk it cannot serve fails before loading", "[load][errors]") {
  const auto model = llama_model();
#if !defined(STOWAGE_WITH_CUDA)
  device_map gpu{{"model.embed_tokens", "cpu"}, {"model.layers.0", 0},
                 {"model.layers.1", "cpu"},     {"model.norm", "cpu"},
                 {"model.rotary_emb", "cpu"},   {"lm_head", "cpu"}};
  try {
    (void)load_checkpoint_and_dispatch(model, load_dir / "llama_st", gpu);
    FAIL("no error");
  } catch (const device_map_error& e) {
    CHECK(std::string(e.what()) ==
          "device map puts `model.layers.0` on GPU 0 but stowage was built without CUDA");
  }
#endif
  CHECK_THROWS_MATCHES(load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map()),
                       device_map_error,
                       Catch::Matchers::Message(
                           "At least one of the model submodule will be offloaded to disk, please "
                           "pass along an `offload_folder`."));
  device_map partial{{"model.embed_tokens", "cpu"}, {"model.layers", "cpu"}};
  CHECK_THROWS_WITH(
      load_checkpoint_and_dispatch(model, load_dir / "llama_st", partial),
      Catch::Matchers::Contains(
          "does not give any device for the following parameters: model.norm.weight"));
}

TEST_CASE("checkpoint paths resolve as accelerate's, with its error texts", "[load][errors]") {
  const auto tree = f1_tree();
  temp_dir tmp("resolve");
  CHECK_THROWS_WITH(load_checkpoint_and_dispatch(tree, tmp.path / "nope"),
                    Catch::Matchers::StartsWith(
                        "`checkpoint` should be the path to a file containing a whole state dict"));
  CHECK_THROWS_WITH(
      load_checkpoint_and_dispatch(tree, tmp.path),
      Catch::Matchers::EndsWith(
          "is not a folder containing a `.index.json` file or a pytorch_model.bin or a "
          "model.safetensors file"));
  // A file, a folder, and an index all load.
  for (const auto& p : {load_dir / "f1_st" / "model.safetensors", load_dir / "f1_st",
                        load_dir / "f1_bin", load_dir / "f1_bin" / "pytorch_model.bin"}) {
    INFO(p);
    const auto r = load_checkpoint_and_dispatch(tree, p);
    CHECK(r.weights().size() == 9);
  }
  const auto m = llama_model();
  CHECK(load_checkpoint_and_dispatch(m, load_dir / "llama_bin" / "pytorch_model.bin.index.json",
                                     device_map{{"", "cpu"}})
            .weights()
            .size() == 21);
}

TEST_CASE(
    "missing, unexpected and mismatched keys are named, strict fails before anything is loaded",
    "[load][errors]") {
  temp_dir tmp("strict");
  // The model has one extra parameter and lacks linear2.bias.
  module_tree tree("ModelForTest");
  const auto l1 = tree.add_child(0, "linear1", "Linear");
  tree.add_parameter(l1, {"weight", {4, 3}, dtype::float32});
  tree.add_parameter(l1, {"bias", {4}, dtype::float32});
  const auto bn = tree.add_child(0, "batchnorm", "BatchNorm1d");
  tree.add_parameter(bn, {"weight", {4}, dtype::float32});
  tree.add_parameter(bn, {"bias", {4}, dtype::float32});
  tree.add_buffer(bn, {"running_mean", {4}, dtype::float32, true});
  tree.add_buffer(bn, {"running_var", {4}, dtype::float32, true});
  tree.add_buffer(bn, {"num_batches_tracked", {}, dtype::int64, true});
  const auto l2 = tree.add_child(0, "linear2", "Linear");
  tree.add_parameter(l2, {"weight", {5, 4}, dtype::float32});
  tree.add_parameter(l2, {"extra", {2}, dtype::float32});
  const device_map map{{"linear1", "cpu"}, {"batchnorm", "disk"}, {"linear2", "cpu"}};
  load_options opts;
  opts.offload_folder = tmp.path / "off";

  const auto r = load_checkpoint_and_dispatch(tree, load_dir / "f1_st", map, opts);
  CHECK(r.report().missing_keys == std::vector<std::string>{"linear2.extra"});
  CHECK(r.report().unexpected_keys == std::vector<std::string>{"linear2.bias"});
  CHECK_FALSE(r.weights().contains("linear2.extra"));
  CHECK(r.weights().contains("linear2.weight"));
  REQUIRE(r.report().warnings.size() >= 2);
  CHECK_THAT(r.report().warnings[0],
             Catch::Matchers::StartsWith("Some weights of the model checkpoint at"));

  opts.strict = true;
  opts.offload_folder = tmp.path / "strict";
  const live_snapshot before;
  try {
    (void)load_checkpoint_and_dispatch(tree, load_dir / "f1_st", map, opts);
    FAIL("strict load did not throw");
  } catch (const model_error& e) {
    CHECK_THAT(e.what(),
               Catch::Matchers::Contains("Missing key(s) in state_dict: \"linear2.extra\""));
    CHECK_THAT(e.what(),
               Catch::Matchers::Contains("Unexpected key(s) in state_dict: \"linear2.bias\""));
  }
  CHECK(before.same());
  CHECK_FALSE(fs::exists(tmp.path / "strict"));

  // A shape mismatch is an error even without strict, and names the tensor.
  module_tree wrong("ModelForTest");
  const auto w1 = wrong.add_child(0, "linear1", "Linear");
  wrong.add_parameter(w1, {"weight", {4, 4}, dtype::float32});
  wrong.add_parameter(w1, {"bias", {4}, dtype::float32});
  opts.strict = false;
  opts.offload_folder = tmp.path / "shape";
  CHECK_THROWS_WITH(
      load_checkpoint_and_dispatch(wrong, load_dir / "f1_st", device_map{{"", "disk"}}, opts),
      Catch::Matchers::Contains(
          "Trying to set a tensor of shape [4, 3] in \"linear1.weight\" (which has "
          "shape [4, 4]), this looks incorrect."));
  CHECK_FALSE(fs::exists(tmp.path / "shape"));
}

TEST_CASE("an interrupted load frees everything and leaves no offload folder", "[load][atomic]") {
  const auto model = llama_model();
  temp_dir tmp("interrupt");
  for (int after : {1, 5, 12}) {
    DYNAMIC_SECTION("fail after " << after << " tensors") {
      load_options opts;
      opts.offload_folder = tmp.path / "off";
      opts.dtype = dtype::float16;  // every disk tensor is converted: all become .dat files
      opts.threads = 2;
      opts.staging_window_bytes = 1;
      int seen = 0;
      opts.on_tensor_loaded = [&](const tensor_loaded_event&) {
        if (++seen == after) throw std::runtime_error("injected failure");
      };
      const live_snapshot before;
      CHECK_THROWS_WITH(
          load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map(), opts),
          "injected failure");
      CHECK(before.same());
      CHECK_FALSE(fs::exists(tmp.path / "off"));
      CHECK(entries_in(tmp.path) == 0);  // no temporary folder left beside it
    }
  }
}

TEST_CASE("a write failure in the offload folder is an io_error and leaves nothing half-written",
          "[load][atomic]") {
  const auto model = llama_model();
  temp_dir tmp("enospc");
  for (int nth : {1, 12, 21}) {
    DYNAMIC_SECTION("ENOSPC on write " << nth) {
      load_options opts;
      opts.offload_folder = tmp.path / "off";
      opts.dtype = dtype::bfloat16;
      opts.staging_window_bytes = 1;
      int writes = 0;
      opts.inject_write_error = [&](const fs::path&, std::uint64_t, std::size_t) {
        return ++writes == nth ? ENOSPC : 0;
      };
      const live_snapshot before;
      try {
        (void)load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map(), opts);
        FAIL("no error");
      } catch (const io_error& e) {
        CHECK_THAT(e.what(), Catch::Matchers::Contains(std::strerror(ENOSPC)));
        CHECK_THAT(e.path(),
                   Catch::Matchers::Contains("model.") || Catch::Matchers::Contains("index.json"));
      }
      CHECK(before.same());
      CHECK_FALSE(fs::exists(tmp.path / "off"));
      CHECK(entries_in(tmp.path) == 0);
    }
  }
}

TEST_CASE("a complete offload folder is reused; a foreign one is merged into atomically",
          "[load][offload]") {
  const auto model = llama_model();
  temp_dir tmp("reuse");
  load_options opts;
  opts.offload_folder = tmp.path / "off";
  opts.dtype = dtype::bfloat16;
  const auto first = load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map(), opts);
  CHECK_FALSE(first.report().offload_folder_reused);
  CHECK(first.report().offload_bytes_written > 0);
  const auto files = entries_in(tmp.path / "off");

  // Second load: nothing may be written (every write would fail).
  opts.inject_write_error = [](const fs::path&, std::uint64_t, std::size_t) { return EIO; };
  const auto second = load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map(), opts);
  CHECK(second.report().offload_folder_reused);
  CHECK(second.report().offload_bytes_written == 0);
  CHECK(entries_in(tmp.path / "off") == files);
  for (const auto& n : first.weights().names())
    CHECK(hex(first.view(n).bytes()) == hex(second.view(n).bytes()));

  // Another dtype: the folder no longer matches, the load merges (and an injected failure
  // then leaves the existing folder exactly as it was).
  opts.dtype = dtype::float16;
  int writes = 0;
  opts.inject_write_error = [&](const fs::path&, std::uint64_t, std::size_t) {
    return ++writes == 4 ? ENOSPC : 0;
  };
  std::ifstream in0(tmp.path / "off" / "index.json");
  std::stringstream before;
  before << in0.rdbuf();
  CHECK_THROWS_AS(load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map(), opts),
                  io_error);
  std::ifstream in1(tmp.path / "off" / "index.json");
  std::stringstream after;
  after << in1.rdbuf();
  CHECK(before.str() == after.str());
  CHECK(entries_in(tmp.path / "off") == files);

  opts.inject_write_error = nullptr;
  opts.keep_in_fp32_modules = {"norm"};
  const auto third = load_checkpoint_and_dispatch(model, load_dir / "llama_st", llama_map(), opts);
  CHECK_FALSE(third.report().offload_folder_reused);
  const auto folder = storage::offload_folder::open(tmp.path / "off");
  const auto* e = folder.find("model.layers.1.mlp.up_proj.weight");
  REQUIRE(e);
  CHECK(e->dtype == dtype::float16);
  const auto expected = case_json("llama_st_fp16_keep")["expected"];
  for (const auto& n : third.weights().names()) {
    INFO(n);
    CHECK(hex(third.view(n).bytes()) == expected[n]["hex"].get<std::string>());
  }
  for (const auto& de : fs::directory_iterator(tmp.path / "off"))
    CHECK(de.path().filename().string().find("tmp") == std::string::npos);
}

TEST_CASE("typed models load and bind; ties share one storage", "[load]") {
  const auto model = llama_model();
  load_options opts;
  opts.threads = 1;
  const auto loaded =
      load_checkpoint_in_model(model, load_dir / "llama_bin", device_map{{"", "cpu"}}, opts);
  const auto expected = case_json("llama_st_all_cpu")["expected"];
  CHECK(loaded.weights.shares_storage("lm_head.weight", "model.embed_tokens.weight"));
  const auto bound = loaded.weights.bind("model.layers.0.mlp.up_proj.weight",
                                         model.model.layers[0].mlp.up_proj.weight);
  CHECK(hex(bound.bytes()) ==
        expected["model.layers.0.mlp.up_proj.weight"]["hex"].get<std::string>());
  CHECK(bound.data<float>().size() == 32 * 16);
  CHECK_THROWS_AS(
      loaded.weights.bind("model.norm.weight", model.model.layers[0].mlp.up_proj.weight),
      model_error);
  CHECK_THROWS_AS(loaded.weights.at("nope"), model_error);
}

TEST_CASE("execution devices follow accelerate's dispatch_model rules", "[load][dispatch]") {
  const dispatched_weights cpu_only(weight_store{}, device_map{{"a", "cpu"}, {"b", "disk"}},
                                    std::nullopt, {});
  CHECK(cpu_only.main_device() == device::cpu());
  CHECK(cpu_only.execution_device("b.weight") == device::cpu());
  CHECK(cpu_only.offloaded("b"));
  CHECK_FALSE(cpu_only.offloaded("a.weight"));

  const dispatched_weights gpus(weight_store{},
                                device_map{{"a", 1}, {"b", 0}, {"c", "cpu"}, {"d", "disk"}},
                                std::nullopt, {});
  CHECK(gpus.main_device() == device::gpu(0));
  CHECK(gpus.execution_device("a.x") == device::gpu(1));
  CHECK(gpus.execution_device("c") == device::gpu(0));
  CHECK(gpus.execution_device("d.w") == device::gpu(0));
  CHECK(gpus.execution_device("") == device::gpu(0));
  CHECK(gpus.offloaded("c"));
  CHECK(gpus.offloaded("d"));
  CHECK_FALSE(gpus.offloaded("a"));
}

namespace {

/// Every stored tensor of two loads, byte for byte.
void check_same_bytes(const weight_store& a, const weight_store& b) {
  REQUIRE(a.names() == b.names());
  for (const auto& n : a.names()) {
    INFO(n);
    const auto x = a.view(n).bytes(), y = b.view(n).bytes();
    CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
  }
}

/// A tensor of a hand-written safetensors file.
struct st_tensor {
  std::string name, dtype;  // safetensors dtype name ("F32", "U8", ...)
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

/// Writes `tensors` in the given order (the order fixes the data offsets, so a small odd-sized
/// tensor first puts the next one at an odd file offset, which safetensors allows).
void write_st(const fs::path& path, const std::vector<st_tensor>& tensors) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  std::uint64_t at = 0;
  for (const auto& t : tensors) {
    h[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {at, at + t.bytes.size()}}};
    at += t.bytes.size();
  }
  std::string header = h.dump();
  header.resize((header.size() + 7) / 8 * 8, ' ');
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header;
  for (const auto& t : tensors)
    out.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
  REQUIRE(out.good());
}

/// `n` little-endian float32 / float16 bit patterns (`Bits`: uint32_t / uint16_t) from a fixed
/// LCG: both signs, zeros and subnormals, every exponent but the Inf/NaN one.
template <class Bits>
std::vector<std::byte> pattern_bytes(std::size_t n, std::uint32_t seed) {
  std::vector<std::byte> b(n * sizeof(Bits));
  std::uint32_t x = seed;
  for (std::size_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    auto v = static_cast<Bits>(x >> (32 - 8 * sizeof(Bits)));
    if constexpr (sizeof(Bits) == 4) {
      // Keep float32 values finite and not NaN (torch's NaN payloads are not what is tested).
      if (((v >> 23) & 0xffu) == 0xffu) v &= ~(Bits{1} << 23);
    } else {
      if (((v >> 10) & 0x1fu) == 0x1fu) v = static_cast<Bits>(v & ~(Bits{1} << 10));
    }
    std::memcpy(b.data() + i * sizeof(Bits), &v, sizeof(Bits));
  }
  return b;
}

module_tree one_module_tree(const std::vector<tensor_entry>& params) {
  module_tree tree("Big");
  const auto m = tree.add_child(0, "m", "Linear");
  for (const auto& p : params) tree.add_parameter(m, p);
  return tree;
}

}  // namespace

TEST_CASE("transparent huge pages off gives the same bytes as on", "[load][thp]") {
  const device_map all_cpu{{"", "cpu"}};
  auto load = [&](const auto& model, const fs::path& ckpt, load_options opts, bool thp) {
    opts.transparent_huge_pages = thp;
    opts.progress = progress_mode::never;
    return load_checkpoint_in_model(model, ckpt, all_cpu, opts);
  };

  SECTION("fp32 -> fp32 and fp32 -> bf16 on the llama fixture, = torch") {
    const auto model = llama_model();
    for (const auto& [id, target] :
         {std::pair{"llama_st_all_cpu", std::optional<dtype>{}},
          std::pair{"llama_st_bf16_keep", std::optional<dtype>{dtype::bfloat16}}}) {
      INFO(id);
      load_options opts;
      opts.dtype = target;
      if (target) opts.keep_in_fp32_modules = {"norm"};
      const auto on = load(model, load_dir / "llama_st", opts, true);
      const auto off = load(model, load_dir / "llama_st", opts, false);
      check_same_bytes(on.weights, off.weights);
      const auto expected = case_json(id)["expected"];
      for (const auto& n : off.weights.names()) {
        INFO(n);
        CHECK(hex(off.weights.view(n).bytes()) == expected[n]["hex"].get<std::string>());
      }
    }
  }

  SECTION("tensors over 1 MiB at odd file offsets, across pread pieces and chunks") {
    temp_dir tmp("thp");
    // 4.5 MiB + 4 bytes of float32 at file offset data_start + 3 (odd): 4 whole 1 MiB pread
    // pieces and a partial one; a float16 tensor after it lands at another odd offset.
    const std::size_t n32 = (std::size_t{9} << 17) + 1, n16 = (std::size_t{3} << 19) + 7;
    const std::vector<st_tensor> tensors{
        {"m.pad", "U8", {3}, {std::byte{1}, std::byte{2}, std::byte{3}}},
        {"m.big", "F32", {static_cast<std::int64_t>(n32)}, pattern_bytes<std::uint32_t>(n32, 7)},
        {"m.half", "F16", {static_cast<std::int64_t>(n16)}, pattern_bytes<std::uint16_t>(n16, 11)},
    };
    const fs::path ckpt = tmp.path / "model.safetensors";
    write_st(ckpt, tensors);
    const auto tree = one_module_tree(
        {{"pad", {3}, dtype::uint8},
         {"big", {static_cast<std::int64_t>(n32)}, dtype::float32},
         {"half", {static_cast<std::int64_t>(n16)}, dtype::float32}});  // fp16 -> fp32
    // One chunk per tensor (several pieces in it), then 1.5 MiB chunks on two threads (a whole
    // piece and a partial one in each), then 256 KiB chunks (inside one piece).
    for (const auto& [threads, window] :
         {std::pair{1u, std::size_t{64} << 20}, std::pair{2u, std::size_t{6} << 20},
          std::pair{3u, std::size_t{1}}}) {
      for (const auto& target : {std::optional<dtype>{}, std::optional<dtype>{dtype::bfloat16}}) {
        INFO("threads " << threads << ", window " << window << ", dtype "
                        << (target ? name(*target) : "model"));
        load_options opts;
        opts.threads = threads;
        opts.staging_window_bytes = window;
        opts.dtype = target;
        const auto on = load(tree, ckpt, opts, true);
        const auto off = load(tree, ckpt, opts, false);
        check_same_bytes(on.weights, off.weights);
        CHECK(hex(off.weights.view("m.pad").bytes()) == "010203");
        const auto big = off.weights.view("m.big");
        if (!target) {
          // float32 -> float32 is the checkpoint's bytes.
          REQUIRE(big.bytes().size() == tensors[1].bytes.size());
          CHECK(std::memcmp(big.bytes().data(), tensors[1].bytes.data(), big.bytes().size()) == 0);
          CHECK(off.weights.view("m.half").desc.dtype == dtype::float32);
        } else {
          CHECK(big.bytes().size() == n32 * 2);
          CHECK(off.weights.view("m.half").desc.dtype == dtype::bfloat16);
        }
      }
    }
  }
}

TEST_CASE("a checkpoint that shrinks under the loader is an io_error naming file and offset",
          "[load][errors]") {
  const auto tree = f1_tree();
  temp_dir tmp("truncated");
  const fs::path ckpt = tmp.path / "model.safetensors";

  // Truncated before the load: the reader rejects it at open time.
  fs::copy_file(load_dir / "f1_st" / "model.safetensors", ckpt);
  fs::resize_file(ckpt, 688 + 8);  // the header and the first tensor only
  {
    const live_snapshot before;
    try {
      (void)load_checkpoint_and_dispatch(tree, ckpt);
      FAIL("no error");
    } catch (const checkpoint_error& e) {
      CHECK_THAT(e.what(), Catch::Matchers::Contains(ckpt.string()));
      CHECK_THAT(e.what(), Catch::Matchers::Contains("file not fully covered"));
    }
    CHECK(before.same());
  }

  // Truncated after the headers were read (the file checked whole): the first tensor loads,
  // the hook cuts the file back to its header, and the next read finds the end of file (pread
  // for a copy; the size check before a converted chunk is read through the mapping).
  fs::remove(ckpt);
  fs::copy_file(load_dir / "f1_st" / "model.safetensors", ckpt);
  for (const auto& [thp, target] :
       {std::pair{true, std::optional<dtype>{}}, std::pair{false, std::optional<dtype>{}},
        std::pair{true, std::optional<dtype>{dtype::bfloat16}}}) {
    INFO("transparent_huge_pages " << thp << ", dtype " << (target ? name(*target) : "model"));
    load_options opts;
    opts.threads = 1;  // the tensors are read in file order, one after the other
    opts.transparent_huge_pages = thp;
    opts.dtype = target;
    opts.progress = progress_mode::never;
    std::vector<std::string> seen;
    opts.on_tensor_loaded = [&](const tensor_loaded_event& ev) {
      seen.emplace_back(ev.name);
      CHECK(ev.kind == storage_kind::host);
      if (seen.size() == 1) fs::resize_file(ckpt, 688);  // the 8-byte length + the JSON header
    };
    const live_snapshot before;
    try {
      (void)load_checkpoint_and_dispatch(tree, ckpt, opts);
      FAIL("no error");
    } catch (const io_error& e) {
      CHECK(e.path() == ckpt.string());
      // batchnorm.bias: 16 bytes at data offset 8, after batchnorm.num_batches_tracked.
      CHECK_THAT(e.what(), Catch::Matchers::Contains(
                               "cannot read 16 bytes at offset 696: unexpected end of file"));
    }
    CHECK(seen == std::vector<std::string>{"batchnorm.num_batches_tracked"});
    CHECK(before.same());
    // Restore the file for the next round.
    fs::remove(ckpt);
    fs::copy_file(load_dir / "f1_st" / "model.safetensors", ckpt);
  }
}

namespace {

/// Stand-in for detail::huge_window_test: says "huge" for the windows `pick` selects (by the
/// window's index in the mapping), so each path of convert_mapped_chunk can be forced.
struct forced_windows {
  std::function<bool(std::size_t)> pick;
  mutable std::size_t asked = 0;
  bool huge(const std::byte* p, const std::byte* base, std::size_t) const {
    ++asked;
    return pick(static_cast<std::size_t>(p - base) / (std::size_t{2} << 20));
  }
};

}  // namespace

TEST_CASE("converting host loads read each 2 MiB window through the mapping or pread, same bits",
          "[load][convert]") {
  temp_dir tmp("windows");
  // 5 MiB + 12 bytes of float32 at an odd file offset (data start + 3): elements straddle
  // every 2 MiB window boundary of the mapping, the last window is partial.
  const std::size_t n = (std::size_t{5} << 18) + 3;
  auto bytes = pattern_bytes<std::uint32_t>(n, 5);
  // Rounding ties, denormals, infinities and NaNs too.
  const std::uint32_t edges[] = {0x3f808000u, 0x3f818000u, 0x00008000u, 0x80018000u,
                                 0x7f7f8000u, 0x7f800000u, 0xff800001u, 0x7fc00000u};
  for (std::size_t i = 0; i < std::size(edges); ++i)
    std::memcpy(bytes.data() + 4 * (i * 99991 % n), &edges[i], 4);
  const fs::path ckpt = tmp.path / "model.safetensors";
  write_st(ckpt, {{"pad", "U8", {3}, {std::byte{1}, std::byte{2}, std::byte{3}}},
                  {"big", "F32", {static_cast<std::int64_t>(n)}, bytes}});
  const checkpoint::mapped_file f(ckpt);
  std::uint64_t header = 0;
  std::memcpy(&header, f.data(), 8);
  const std::uint64_t offset = 8 + header + 3;
  std::vector<std::uint16_t> expected(n);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, bytes.data() + 4 * i, 4);
    expected[i] = precision::fp32_to_bf16_bits(std::bit_cast<float>(u));
  }
  const std::vector<std::pair<const char*, std::function<bool(std::size_t)>>> choices{
      {"all mapped", [](std::size_t) { return true; }},
      {"all pread", [](std::size_t) { return false; }},
      {"even windows mapped", [](std::size_t w) { return w % 2 == 0; }},
      {"odd windows mapped", [](std::size_t w) { return w % 2 == 1; }},
  };
  for (const auto& [what, pick] : choices) {
    // Whole tensor in one call, then in pieces the way chunks split it (odd element counts).
    for (const std::uint64_t piece : {std::uint64_t{n}, std::uint64_t{300001}}) {
      INFO(what << ", pieces of " << piece << " elements");
      std::vector<std::uint16_t> out(n + 3, 0xabcd);
      std::vector<std::byte> staging;
      const forced_windows windows{pick};
      for (std::uint64_t b = 0; b < n; b += piece) {
        const std::uint64_t m = std::min<std::uint64_t>(piece, n - b);
        detail::convert_mapped_chunk(f, f.data() + offset + 4 * b, offset + 4 * b, dtype::float32,
                                     reinterpret_cast<std::byte*>(out.data() + b), dtype::bfloat16,
                                     m, windows, staging);
      }
      CHECK(windows.asked >= 3);
      CHECK(std::equal(expected.begin(), expected.end(), out.begin()));
      CHECK(out[n] == 0xabcd);
    }
  }
  // A file cut after it was mapped: a pread window reports the end of file with the offset.
  fs::resize_file(ckpt, offset + 4 * 1000);
  std::vector<std::uint16_t> out(n);
  std::vector<std::byte> staging;
  try {
    detail::convert_mapped_chunk(f, f.data() + offset, offset, dtype::float32,
                                 reinterpret_cast<std::byte*>(out.data()), dtype::bfloat16, n,
                                 forced_windows{[](std::size_t) { return false; }}, staging);
    FAIL("no error");
  } catch (const io_error& e) {
    CHECK(e.path() == ckpt.string());
    CHECK_THAT(e.what(), Catch::Matchers::Contains("unexpected end of file"));
  }
}
