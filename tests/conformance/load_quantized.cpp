// Conformance: quantize-on-load (load_options::quantization, a typed model's quantized
// precision) and loading already-quantized checkpoints.
// (a) Loading the tiny fp32 Llama models with a bitsandbytes config stores, for every tensor,
//     exactly the bytes stowage-convert writes for the same config (and so what Transformers +
//     bitsandbytes wrote, tests/fixtures/quantized: wherever convert matches bitsandbytes,
//     the load matches too; the few explained differences are quantized_interchange.cpp's).
// (b) The checkpoints Transformers wrote (and the ones stowage-convert writes) load as they are:
//     every tensor byte for byte, quantization_config read from config.json, and the stored
//     weights dequantize (dequantize_into / the weight_ref row decoder) to bitsandbytes' values.
// (c) Chunked, multi-threaded quantization of a larger weight equals quantizing it whole.
// (d) A quantized weight on "disk" lands in the offload folder quantized, with its state
//     tensors, atomically (an injected write error leaves no folder behind).
#include <stowage/checkpoint/convert_checkpoint.hpp>
#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/dispatch/load.hpp>
#include <stowage/dispatch/quantized_weights.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>

#include <catch2/catch.hpp>

#include "../unit/checkpoint_test_util.hpp"
#include "bnb_fixture.hpp"
#include "sha256.hpp"
#include "support/quantized_fixture.hpp"

#include <bit>
#include <map>
#include <random>
#include <set>

#include <unistd.h>

using namespace stowage;
namespace ck = stowage::checkpoint;
namespace sp = stowage::precision;
namespace fs = std::filesystem;
namespace sq = stowage_test::quantized;

namespace {

using stowage_test::quantized::bnb_config_for;
using stowage_test::quantized::config_of;
using stowage_test::quantized::expected;
using stowage_test::quantized::llama_tree;

fs::path tmp_root() {
  return fs::temp_directory_path() / ("stowage_qload_" + std::to_string(::getpid()));
}

std::string sha(std::span<const std::byte> b) { return test_sha256::hex(b); }

struct file_tensor {
  dtype type;
  shape dims;
  std::vector<std::byte> bytes;
};
std::map<std::string, file_tensor> read_checkpoint(const fs::path& p) {
  const auto rd = ck::checkpoint_reader::open(p);
  std::map<std::string, file_tensor> out;
  for (std::size_t s = 0; s < rd.files().files.size(); ++s)
    for (const auto& d : rd.shard(s)->tensors()) {
      const auto v = rd.view(d.name);
      out.emplace(d.name, file_tensor{d.dtype, d.shape, {v.bytes.begin(), v.bytes.end()}});
    }
  return out;
}

// Every tensor of `file` is in the store with the same dtype, shape and bytes, and the store
// holds nothing else (tie aliases aside).
void require_store_equals(const weight_store& w, const std::map<std::string, file_tensor>& file) {
  std::set<std::string> stored;
  for (const auto& n : w.names())
    if (w.find(n)->desc().name == n) stored.insert(n);
  std::set<std::string> expected_names;
  for (const auto& [k, v] : file) expected_names.insert(k);
  CHECK(stored == expected_names);
  for (const auto& [k, t] : file) {
    INFO("tensor " << k);
    REQUIRE(w.contains(k));
    const auto v = w.view(k);
    CHECK(v.desc.dtype == t.type);
    CHECK(v.desc.shape == t.dims);
    CHECK(sha(v.bytes()) == sha(t.bytes));
  }
}

const char* const variants[] = {"nf4_dq_bf16",       "nf4_f32",   "fp4_bf16_fp16compute",
                                "nf4_dq_bs128_bf16", "int8_bf16", "int8_f32",
                                "nf4_dq_tied_bf16"};

device_map all_cpu() { return device_map{{"", device::cpu()}}; }

}  // namespace

TEST_CASE("quantize on load stores what stowage-convert writes (and so bitsandbytes)",
          "[quantized][load][conformance]") {
  const auto tmp = tmp_root() / "convert";
  for (const std::string variant : variants) {
    DYNAMIC_SECTION(variant) {
      const auto e = expected(variant);
      const auto src = sq::source_dir(e);
      const auto tree = llama_tree(src);
      const auto cfg = bnb_config_for(e);
      ck::convert_options copt;
      copt.dtype = sq::from_pretrained_dtype(e);
      copt.quantize = ck::quantize_options{cfg, tree, "lm_head"};
      const auto out = tmp / variant;
      fs::remove_all(out);
      ck::convert_checkpoint(src, out, copt);
      const auto converted = read_checkpoint(out / "model.safetensors");

      load_options lo;
      lo.quantization = cfg;
      lo.dtype = sq::from_pretrained_dtype(e);
      lo.threads = 2;
      lo.progress = progress_mode::never;
      const auto loaded = load_checkpoint_in_model(tree, src, all_cpu(), lo);
      CHECK(loaded.report.quantized_on_load > 0);
      CHECK(loaded.report.prequantized == 0);
      REQUIRE(loaded.report.quantization.has_value());
      require_store_equals(loaded.weights, converted);

      // Against bitsandbytes: every tensor convert gets right, the load gets right.
      std::size_t same = 0, total = 0;
      for (const auto& t : e["tensors"]) {
        const std::string k = t["name"];
        ++total;
        if (sha(converted.at(k).bytes) != t["sha256"].get<std::string>()) continue;
        CHECK(sha(loaded.weights.view(k).bytes()) == t["sha256"].get<std::string>());
        ++same;
      }
      CHECK(same > 0);
      WARN(variant << ": " << same << "/" << total
                   << " tensors identical to bitsandbytes (others: quantized_interchange.cpp)");

      // What convert wrote loads back as it is (config.json's quantization_config is read).
      load_options back;
      back.threads = 2;
      back.progress = progress_mode::never;
      back.dtype = sq::from_pretrained_dtype(e);
      const auto again = load_checkpoint_in_model(tree, out, all_cpu(), back);
      CHECK(again.report.quantized_on_load == 0);
      CHECK(again.report.prequantized == loaded.report.quantized_on_load);
      REQUIRE(again.report.quantization.has_value());
      CHECK(again.report.quantization->load_in_4bit == cfg.load_in_4bit);
      require_store_equals(again.weights, converted);
    }
  }
  fs::remove_all(tmp_root());
}

TEST_CASE("a typed model's quantized precision drives quantize on load",
          "[quantized][load][typed]") {
  // nf4_dq_bf16: BitsAndBytesConfig(nf4, double quant, compute bf16), dtype=bf16, block 64.
  const auto e = expected("nf4_dq_bf16");
  const auto src = sq::source_dir(e);
  const auto model =
      init_empty<models::llama_for_causal_lm<sp::nf4<sp::bf16, true, 64>>>(config_of(src));
  const auto tree = llama_tree(src);
  const auto out = tmp_root() / "typed";
  fs::remove_all(out);
  ck::convert_options copt;
  copt.dtype = dtype::bfloat16;
  copt.quantize = ck::quantize_options{bnb_config_for(e), tree, "lm_head"};
  ck::convert_checkpoint(src, out, copt);
  load_options lo;
  lo.progress = progress_mode::never;
  const auto d = load_checkpoint_and_dispatch(model, src, all_cpu(), lo);
  require_store_equals(d.weights(), read_checkpoint(out / "model.safetensors"));
  CHECK(d.report().quantization->bnb_4bit_use_double_quant);
  // lm_head is never quantized; a Linear weight is, with its state under bitsandbytes' names.
  CHECK(quantized_layout_of(d.weights(), "lm_head.weight") == quantized_layout::none);
  CHECK(quantized_layout_of(d.weights(), "model.layers.0.mlp.up_proj.weight") ==
        quantized_layout::bnb_4bit);
  CHECK(d.weights().contains("model.layers.0.mlp.up_proj.weight.nested_absmax"));
  fs::remove_all(tmp_root());
}

TEST_CASE(
    "Transformers-written quantized checkpoints load as they are and dequantize as "
    "bitsandbytes",
    "[quantized][load][read][conformance]") {
  for (const std::string variant : {"nf4_dq_bf16", "fp4_bf16_fp16compute", "int8_bf16"}) {
    DYNAMIC_SECTION(variant) {
      const auto e = expected(variant);
      const auto folder = sq::fixtures() / variant;
      const auto tree = llama_tree(sq::source_dir(e));
      load_options lo;
      lo.dtype =
          sq::from_pretrained_dtype(e);  // the other tensors as saved (bf16), nothing converted
      lo.threads = 3;
      lo.progress = progress_mode::never;
      const auto loaded = load_checkpoint_in_model(tree, folder, all_cpu(), lo);
      const auto& w = loaded.weights;
      require_store_equals(w, read_checkpoint(folder / "model.safetensors"));
      CHECK(loaded.report.quantized_on_load == 0);
      CHECK(loaded.report.prequantized == e["dequantized"].size());
      REQUIRE(loaded.report.quantization.has_value());
      CHECK(nlohmann::json::parse(sp::bnb_config_to_dict(*loaded.report.quantization).dump()) ==
            ckpt_test::read_json(folder / "config.json")["quantization_config"]);
      for (const auto& d : e["dequantized"]) {
        const std::string name = d["module"].get<std::string>() + ".weight";
        INFO("weight " << name);
        const auto q = quantized_weight::from_store(w, name);
        CHECK(q.layout() ==
              (d["kind"] == "4bit" ? quantized_layout::bnb_4bit : quantized_layout::bnb_int8));
        std::vector<float> f32(static_cast<std::size_t>(q.rows() * q.cols()));
        dequantize_into(w, name, f32.data());
        if (q.layout() == quantized_layout::bnb_4bit && q.state().type == sp::quant_type::fp4) {
          // FP4 nibble 8: -0.0 in stowage's (CUDA) table, +0.0 in bitsandbytes' CPU backend.
          const auto packed = w.view(name).bytes();
          for (std::size_t i = 0; i < f32.size(); ++i) {
            const auto b = std::to_integer<unsigned>(packed[i / 2]);
            if (((i % 2) ? (b & 15u) : (b >> 4)) != 8u) continue;
            CHECK(std::bit_cast<std::uint32_t>(f32[i]) == 0x80000000u);
            f32[i] = 0.0f;
          }
        }
        const auto key = d["kind"] == "4bit" ? "sha256_f32" : "sha256";
        CHECK(sha(std::as_bytes(std::span<const float>(f32))) == d[key].get<std::string>());
        // The row decoder gives the same rows, from any start (blocks may cross rows).
        const auto ref = q.weight_ref();
        const std::int64_t r0 = 1, r1 = std::min<std::int64_t>(q.rows(), 6);
        std::vector<float> part(static_cast<std::size_t>((r1 - r0) * q.cols()));
        exec::cpu::decode_rows(ref, r0, r1, part.data());
        for (std::size_t i = 0; i < part.size(); ++i) {
          const float want = f32[static_cast<std::size_t>(r0 * q.cols()) + i];
          if (!(std::bit_cast<std::uint32_t>(part[i]) == std::bit_cast<std::uint32_t>(want) ||
                (part[i] == 0.0f && want == 0.0f)))
            FAIL("row decoder differs at " << i);
        }
      }
    }
  }
}

namespace {

// A model with one large Linear (rows cross blocks when cols % block != 0) and an lm_head.
module_tree synthetic_tree(std::int64_t rows, std::int64_t cols) {
  module_tree t("Synthetic");
  const auto p = t.add_child(0, "proj", "Linear");
  t.add_parameter(p, tensor_entry{"weight", shape{rows, cols}, dtype::float32, true});
  const auto h = t.add_child(0, "lm_head", "Linear");
  t.add_parameter(h, tensor_entry{"weight", shape{8, cols}, dtype::float32, true});
  return t;
}

fs::path write_synthetic(const fs::path& dir, std::int64_t rows, std::int64_t cols, dtype dt,
                         std::vector<float>& proj) {
  std::mt19937 gen(1234);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  proj.resize(static_cast<std::size_t>(rows * cols));
  for (auto& v : proj) v = nd(gen);
  proj[17] = 0.75f;  // an outlier
  std::vector<float> head(static_cast<std::size_t>(8 * cols));
  for (auto& v : head) v = nd(gen);
  auto as = [&](const std::vector<float>& v) {
    std::vector<std::byte> b(v.size() * element_size(dt));
    sp::convert_elements(reinterpret_cast<const std::byte*>(v.data()), dtype::float32, b.data(), dt,
                         v.size());
    return b;
  };
  const auto pb = as(proj), hb = as(head);
  fs::create_directories(dir);
  const std::vector<ck::tensor_ref> refs{{"proj.weight", dt, shape{rows, cols}, pb},
                                         {"lm_head.weight", dt, shape{8, cols}, hb}};
  ck::write_safetensors(dir / "model.safetensors", refs, {{"format", "pt"}});
  return dir / "model.safetensors";
}

}  // namespace

TEST_CASE("chunked multi-threaded quantization equals quantizing the whole weight",
          "[quantized][load][chunks]") {
  const std::int64_t rows = 1000, cols = 700;  // 700 % 64 != 0: blocks cross rows
  std::vector<float> proj;
  const auto file = write_synthetic(tmp_root() / "synthetic", rows, cols, dtype::float16, proj);
  const auto tree = synthetic_tree(rows, cols);
  std::vector<std::byte> fp16(proj.size() * 2);
  {
    const auto rd = ck::checkpoint_reader::open(file);
    const auto v = rd.view("proj.weight");
    std::memcpy(fp16.data(), v.data(), fp16.size());
  }
  for (const bool dq : {false, true})
    for (const std::size_t bs : {std::size_t{64}, std::size_t{256}}) {
      DYNAMIC_SECTION("nf4 double_quant=" << dq << " blocksize=" << bs) {
        sp::bnb_config c;
        c.load_in_4bit = true;
        c.bnb_4bit_quant_type = sp::quant_type::nf4;
        c.bnb_4bit_use_double_quant = dq;
        c.blocksize = bs;
        load_options lo;
        lo.quantization = c;
        lo.dtype = dtype::bfloat16;  // fp16 -> bf16, then quantized
        lo.threads = 3;
        lo.staging_window_bytes = std::size_t{1} << 20;  // 256 KiB chunks: several per weight
        lo.progress = progress_mode::never;
        const auto loaded = load_checkpoint_in_model(tree, file, all_cpu(), lo);
        CHECK(loaded.report.quantized_on_load == 1);  // lm_head stays unquantized
        CHECK(loaded.weights.view("lm_head.weight").desc.dtype == dtype::bfloat16);
        std::vector<std::byte> bf(proj.size() * 2);
        sp::convert_elements(fp16.data(), dtype::float16, bf.data(), dtype::bfloat16, proj.size());
        const std::int64_t sh[] = {rows, cols};
        const auto q = sp::quantize_4bit(
            bf.data(), dtype::bfloat16, sh,
            {.type = sp::quant_type::nf4, .blocksize = bs, .double_quant = dq, .offset = {}});
        const auto packed = loaded.weights.view("proj.weight").bytes();
        REQUIRE(packed.size() == q.packed.size());
        CHECK(std::memcmp(packed.data(), q.packed.data(), packed.size()) == 0);
        for (const auto& t : sp::quant_state_tensors(q.state)) {
          INFO("state " << t.suffix);
          const auto v = loaded.weights.view("proj.weight." + t.suffix).bytes();
          REQUIRE(v.size() == t.bytes.size());
          CHECK(std::memcmp(v.data(), t.bytes.data(), v.size()) == 0);
        }
        // Dequantized through the store: bitsandbytes' values (dequantize_4bit of the state).
        std::vector<float> got(proj.size());
        dequantize_into(loaded.weights, "proj.weight", got.data());
        CHECK(got == sp::dequantize_4bit(q));
        std::vector<float> rows_3_to_9(static_cast<std::size_t>(6 * cols));
        dequantize_into(loaded.weights, "proj.weight", rows_3_to_9.data(), 3, 9);
        CHECK(std::equal(rows_3_to_9.begin(), rows_3_to_9.end(), got.begin() + 3 * cols));
      }
    }
  SECTION("int8") {
    sp::bnb_config c;
    c.load_in_8bit = true;
    load_options lo;
    lo.quantization = c;
    lo.threads = 3;
    lo.staging_window_bytes = std::size_t{1} << 20;
    lo.progress = progress_mode::never;
    const auto loaded = load_checkpoint_in_model(tree, file, all_cpu(), lo);
    const auto q = sp::quantize_int8(fp16.data(), dtype::float16, static_cast<std::size_t>(rows),
                                     static_cast<std::size_t>(cols));
    const auto cb = loaded.weights.view("proj.weight").bytes();
    REQUIRE(cb.size() == q.cb.size());
    CHECK(std::memcmp(cb.data(), q.cb.data(), cb.size()) == 0);
    const auto scb = loaded.weights.view("proj.SCB").bytes();
    REQUIRE(scb.size() == q.scb.size() * 4);
    CHECK(std::memcmp(scb.data(), q.scb.data(), scb.size()) == 0);
    CHECK(loaded.weights.view("proj.weight_format").bytes().size() == 1);
    std::vector<float> got(proj.size());
    dequantize_into(loaded.weights, "proj.weight", got.data());
    CHECK(got == sp::dequantize_int8(q));
  }
  SECTION("skip list and keep_in_fp32_modules override the automatic choice") {
    sp::bnb_config c;
    c.load_in_4bit = true;
    c.llm_int8_skip_modules = std::vector<std::string>{"proj"};  // replaces ["lm_head"]
    load_options lo;
    lo.quantization = c;
    lo.progress = progress_mode::never;
    auto loaded = load_checkpoint_in_model(tree, file, all_cpu(), lo);
    CHECK(quantized_layout_of(loaded.weights, "proj.weight") == quantized_layout::none);
    CHECK(quantized_layout_of(loaded.weights, "lm_head.weight") == quantized_layout::bnb_4bit);
    lo.keep_in_fp32_modules = {"lm_head"};
    lo.dtype = dtype::float16;
    loaded = load_checkpoint_in_model(tree, file, all_cpu(), lo);
    CHECK(quantized_layout_of(loaded.weights, "lm_head.weight") == quantized_layout::none);
    CHECK(loaded.weights.view("lm_head.weight").desc.dtype == dtype::float32);
    CHECK_THROWS_AS(quantized_weight::from_store(loaded.weights, "proj.weight"), model_error);
  }
  fs::remove_all(tmp_root());
}

TEST_CASE("quantized weights offloaded to disk stay quantized, state tensors included",
          "[quantized][load][offload]") {
  const auto e = expected("nf4_dq_bf16");
  const auto src = sq::source_dir(e);
  const auto tree = llama_tree(src);
  load_options lo;
  lo.quantization = bnb_config_for(e);
  lo.dtype = dtype::bfloat16;
  lo.progress = progress_mode::never;
  const auto in_memory = load_checkpoint_in_model(tree, src, all_cpu(), lo);
  const device_map map{{"model.embed_tokens", "cpu"}, {"model.layers.0", "cpu"},
                       {"model.layers.1", "disk"},    {"model.layers.2", "disk"},
                       {"model.norm", "cpu"},         {"lm_head", "disk"}};
  const auto folder = tmp_root() / "offload";
  fs::remove_all(tmp_root());
  fs::create_directories(tmp_root());
  lo.offload_folder = folder;

  SECTION("an interrupted write leaves no folder") {
    lo.inject_write_error = [](const fs::path& p, std::uint64_t, std::size_t) {
      return p.filename().string().find(".absmax.dat") != std::string::npos ? ENOSPC : 0;
    };
    CHECK_THROWS_AS(load_checkpoint_in_model(tree, src, map, lo), io_error);
    CHECK_FALSE(fs::exists(folder));
    CHECK(fs::is_empty(tmp_root()));  // no temporary folder left either
  }
  SECTION("the folder holds the packed weights and every state tensor") {
    const auto loaded = load_checkpoint_in_model(tree, src, map, lo);
    const auto& w = loaded.weights;
    const auto index = ckpt_test::read_json(folder / "index.json");
    const std::string q = "model.layers.1.self_attn.q_proj.weight";
    for (const std::string& k : {q, q + ".absmax", q + ".quant_map", q + ".nested_absmax",
                                 q + ".nested_quant_map", q + ".quant_state.bitsandbytes__nf4"}) {
      INFO("tensor " << k);
      REQUIRE(index.contains(k));
      CHECK(fs::file_size(folder / (k + ".dat")) == in_memory.weights.view(k).size());
      CHECK(w.view(k).kind == storage::storage_kind::file);
    }
    CHECK(index[q]["dtype"] == "uint8");
    CHECK(index[q + ".absmax"]["dtype"] == "uint8");  // nested: codes
    CHECK(index[q + ".nested_absmax"]["dtype"] == "float32");
    // Same bytes as the in-memory load, for every tensor (disk ones read from the folder).
    for (const auto& n : in_memory.weights.names()) {
      INFO("tensor " << n);
      REQUIRE(w.contains(n));
      CHECK(sha(w.view(n).bytes()) == sha(in_memory.weights.view(n).bytes()));
    }
    CHECK(w.view("model.layers.0.mlp.up_proj.weight").kind == storage::storage_kind::host);
    // Dequantized straight from the offload files.
    std::vector<float> a(64 * 64), b(64 * 64);
    dequantize_into(w, q, a.data());
    dequantize_into(in_memory.weights, q, b.data());
    CHECK(a == b);
    // A second load into the existing folder rewrites the quantized weights (merge mode).
    const auto again = load_checkpoint_in_model(tree, src, map, lo);
    CHECK(sha(again.weights.view(q + ".absmax").bytes()) ==
          sha(in_memory.weights.view(q + ".absmax").bytes()));
    for (const auto& de : fs::directory_iterator(folder))
      CHECK(de.path().string().find("stowage-tmp") == std::string::npos);
  }
  fs::remove_all(tmp_root());
}
