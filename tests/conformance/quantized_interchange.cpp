// Conformance: quantized checkpoints cross between stowage and Transformers + bitsandbytes.
// (a) convert_checkpoint with bitsandbytes quantization (what `stowage-convert --dtype
//     nf4|fp4|int8 ...` runs) on the tiny Llama models writes the keys, dtypes, shapes and
//     bytes Transformers' save_pretrained wrote for from_pretrained(quantization_config=...)
//     (tests/fixtures/quantized/*/expected.json, tools/gen_quantized_checkpoint_fixtures.py),
//     and the same config.json (quantization_config included). Bytes are equal except where
//     bitsandbytes' CPU backend and its CUDA kernels disagree, where stowage follows CUDA
//     (formats-spec §1.3, §1.6): FP4 codes at the boundary literals / signed bucketize, and
//     nested absmax codes of the CPU kernel's approximate 8-bit lookup. Every differing byte
//     must be explained by one of those rules.
// (b) checkpoints written by Transformers are read back by stowage (quant_state_from_tensors,
//     int8_from_tensors) and dequantize to the values bitsandbytes dequantizes them to.
#include <stowage/checkpoint/convert_checkpoint.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/precision/bnb_config.hpp>
#include <stowage/precision/bnb_serialize.hpp>

#include <catch2/catch.hpp>

#include "../unit/checkpoint_test_util.hpp"
#include "bnb_fixture.hpp"
#include "sha256.hpp"
#include "support/quantized_fixture.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <map>
#include <set>

#include <unistd.h>

using namespace stowage;
namespace ck = stowage::checkpoint;
namespace sp = stowage::precision;
namespace fs = std::filesystem;
namespace sq = stowage_test::quantized;

namespace {

using stowage_test::quantized::expected;
using stowage_test::quantized::llama_tree;

std::string sha(std::span<const std::byte> b) { return test_sha256::hex(b); }
template <class T>
std::string sha_of(const std::vector<T>& v) {
  return sha(std::as_bytes(std::span<const T>(v)));
}

// The BitsAndBytesConfig kwargs of a fixture as a bnb_config (+ the from_pretrained dtype).
ck::convert_options options_for(const nlohmann::json& e) {
  const auto c = sq::bnb_config_for(e);
  ck::convert_options opt;
  opt.dtype = sq::from_pretrained_dtype(e);
  opt.quantize = ck::quantize_options{c, llama_tree(sq::source_dir(e)), "lm_head"};
  return opt;
}

struct file_tensor {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

std::map<std::string, file_tensor> read_safetensors(const fs::path& p) {
  const auto rd = ck::checkpoint_reader::open(p);
  std::map<std::string, file_tensor> out;
  for (const auto& d : rd.shard(0)->tensors()) {
    const auto v = rd.view(d.name);
    file_tensor t;
    t.dtype = std::string(safetensors_name(d.dtype));
    t.shape.assign(d.shape.begin(), d.shape.end());
    t.bytes.assign(v.bytes.begin(), v.bytes.end());
    out.emplace(d.name, std::move(t));
  }
  return out;
}

std::uint8_t nibble(std::span<const std::byte> p, std::size_t i) {
  const auto b = std::to_integer<std::uint8_t>(p[i / 2]);
  return (i % 2) ? static_cast<std::uint8_t>(b & 15u) : static_cast<std::uint8_t>(b >> 4);
}

// bitsandbytes' CPU (pure torch) 4-bit rule for one element: s = x * (1/absmax), clamp,
// bucketize on the binary32 midpoints of the sorted table, mapped back to the nibble.
std::uint8_t torch_rule_code(sp::quant_type t, float x, float absmax) {
  const float am = std::max(absmax, 1e-38f);
  const float s = std::clamp(x * (1.0f / am), -1.0f, 1.0f);
  const auto& table = sp::code_table(t);
  std::array<std::uint8_t, 16> order{};
  for (std::uint8_t i = 0; i < 16; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::uint8_t a, std::uint8_t b) { return table[a] < table[b]; });
  unsigned idx = 0;
  for (std::size_t i = 0; i < 15; ++i)
    idx += ((table[order[i]] + table[order[i + 1]]) / 2.0f) < s ? 1u : 0u;
  return t == sp::quant_type::nf4 ? static_cast<std::uint8_t>(idx) : order[idx];
}

// The source weight as the quantizer saw it (converted to the target dtype), as float32.
std::vector<float> source_weight(const fs::path& folder, const std::string& name, dtype target) {
  const auto rd = ck::checkpoint_reader::open(folder);
  const auto v = rd.view(name);
  const auto n = static_cast<std::size_t>(v.desc.numel());
  std::vector<std::byte> conv(static_cast<std::size_t>(storage_bytes(v.desc.shape, target)));
  sp::convert_elements(v.data(), v.desc.dtype, conv.data(), target, n);
  std::vector<float> out(n);
  sp::convert_elements(conv.data(), target, reinterpret_cast<std::byte*>(out.data()),
                       dtype::float32, n);
  return out;
}

struct diff_stats {
  std::size_t fp4_codes = 0;     // FP4 nibbles, CPU bucketize vs CUDA literals
  std::size_t nested_codes = 0;  // nested absmax codes, CPU LUT vs exact nearest
};

// Checks that every byte where ours and bitsandbytes' differ is explained (see file comment).
void explain_difference(const std::string& key, const nlohmann::json& e, const file_tensor& ours,
                        const file_tensor& theirs, const std::map<std::string, file_tensor>& all,
                        const std::map<std::string, file_tensor>& ref, diff_stats& st) {
  INFO("tensor " << key);
  const auto& cfg = e["config"]["quantization_config"];
  const auto type = cfg["bnb_4bit_quant_type"] == "nf4" ? sp::quant_type::nf4 : sp::quant_type::fp4;
  REQUIRE(ours.bytes.size() == theirs.bytes.size());
  const dtype target = e["from_pretrained_dtype"].is_null()
                           ? dtype::float32
                           : dtype_from_name(e["from_pretrained_dtype"].get<std::string>());
  if (key.ends_with(".weight.absmax") && cfg["bnb_4bit_use_double_quant"] == true) {
    // Nested codes: the CPU kernel maps s to a 65536-step grid on [-1, 1] and a lookup table,
    // so a value within half a step of the midpoint of two map entries may get the neighbour;
    // stowage (and CUDA) take the nearest. Offset (in the JSON) and nested absmax must be
    // identical, and the scaled value must sit at the midpoint within the grid's resolution.
    const std::string w = key.substr(0, key.size() - 7);
    const auto& js = w + ".quant_state.bitsandbytes__" + std::string(sp::name(type));
    REQUIRE(sha(all.at(js).bytes) == sha(ref.at(js).bytes));
    REQUIRE(sha(all.at(w + ".nested_absmax").bytes) == sha(ref.at(w + ".nested_absmax").bytes));
    const auto j = nlohmann::json::parse(std::string(
        reinterpret_cast<const char*>(all.at(js).bytes.data()), all.at(js).bytes.size()));
    const auto offset = static_cast<float>(j["nested_offset"].get<double>());
    const std::size_t bs = j["blocksize"];
    const auto x = source_weight(sq::source_dir(e), w, target);
    std::vector<std::uint8_t> packed((x.size() + 1) / 2);
    std::vector<float> plain((x.size() + bs - 1) / bs);
    sp::quantize_4bit_raw(x.data(), dtype::float32, x.size(), type, bs, packed.data(),
                          plain.data());
    std::vector<float> nested(all.at(w + ".nested_absmax").bytes.size() / 4);
    std::memcpy(nested.data(), all.at(w + ".nested_absmax").bytes.data(), nested.size() * 4);
    const auto& map = sp::dynamic_map();
    for (std::size_t b = 0; b < ours.bytes.size(); ++b) {
      const auto qo = std::to_integer<std::uint8_t>(ours.bytes[b]);
      const auto qt = std::to_integer<std::uint8_t>(theirs.bytes[b]);
      if (qo == qt) continue;
      const float sv = (plain[b] - offset) * (1.0f / nested[b / 256]);
      const float mid = (map[qo] + map[qt]) / 2.0f;
      INFO("block " << b << ": s=" << sv << " stowage code " << int(qo) << " (" << map[qo]
                    << "), bitsandbytes " << int(qt) << " (" << map[qt] << ")");
      CHECK((qo + 1 == qt || qt + 1 == qo));
      CHECK(std::fabs(sv - map[qo]) <= std::fabs(sv - map[qt]));  // ours is the nearest
      CHECK(std::fabs(sv - mid) <= 1.0f / 65535.0f);              // within half a grid step
      ++st.nested_codes;
    }
    return;
  }
  // Anything else that differs must be a packed FP4 weight.
  REQUIRE(type == sp::quant_type::fp4);
  REQUIRE(cfg["bnb_4bit_use_double_quant"] == false);
  REQUIRE(key.ends_with(".weight"));
  REQUIRE(ours.dtype == "U8");
  const auto absmax_t = bnb_fixture::base64([&] {
    for (const auto& t : e["tensors"])
      if (t["name"] == key + ".absmax") return t.value("bytes", std::string());
    return std::string();
  }());
  std::vector<float> absmax(absmax_t.size() / 4);
  std::memcpy(absmax.data(), absmax_t.data(), absmax.size() * 4);
  const auto x = source_weight(sq::source_dir(e), key, target);
  const std::size_t bs = 64;
  REQUIRE(absmax.size() == (x.size() + bs - 1) / bs);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const auto no = nibble(ours.bytes, i), nt = nibble(theirs.bytes, i);
    if (no == nt) continue;
    INFO("element " << i << " x=" << x[i] << " absmax=" << absmax[i / bs] << " stowage " << int(no)
                    << " bitsandbytes " << int(nt));
    CHECK(nt == torch_rule_code(type, x[i], absmax[i / bs]));
    ++st.fp4_codes;
  }
}

const char* const variants[] = {"nf4_dq_bf16",       "nf4_f32",   "fp4_bf16_fp16compute",
                                "nf4_dq_bs128_bf16", "int8_bf16", "int8_f32",
                                "nf4_dq_tied_bf16"};

}  // namespace

TEST_CASE("quantized conversion writes what Transformers + bitsandbytes write",
          "[quantized][convert][conformance]") {
  const auto tmp = fs::temp_directory_path() / ("stowage_qconv_" + std::to_string(::getpid()));
  for (const std::string variant : variants) {
    DYNAMIC_SECTION(variant) {
      const auto e = expected(variant);
      const auto out = tmp / variant;
      fs::remove_all(out);
      const auto opt = options_for(e);
      const auto rep = ck::convert_checkpoint(sq::source_dir(e), out, opt);
      REQUIRE(rep.shards.size() == 1);
      const auto ours = read_safetensors(out / "model.safetensors");
      std::map<std::string, file_tensor> theirs;
      std::set<std::string> expected_keys;
      for (const auto& t : e["tensors"]) expected_keys.insert(t["name"].get<std::string>());
      std::set<std::string> our_keys;
      for (const auto& [k, v] : ours) our_keys.insert(k);
      CHECK(our_keys == expected_keys);

      // bitsandbytes' bytes where known in full: small tensors in expected.json, everything
      // for the variants whose Transformers-written checkpoint is kept.
      std::map<std::string, file_tensor> ref;
      if (fs::exists(sq::fixtures() / variant / "model.safetensors"))
        ref = read_safetensors(sq::fixtures() / variant / "model.safetensors");
      for (const auto& t : e["tensors"])
        if (t.contains("bytes") && !ref.count(t["name"].get<std::string>())) {
          const auto b = bnb_fixture::base64(t["bytes"].get<std::string>());
          file_tensor f{
              t["dtype"].get<std::string>(), t["shape"].get<std::vector<std::int64_t>>(), {}};
          f.bytes.resize(b.size());
          if (!b.empty()) std::memcpy(f.bytes.data(), b.data(), b.size());
          ref.emplace(t["name"].get<std::string>(), std::move(f));
        }
      diff_stats st;
      std::size_t differing = 0;
      for (const auto& t : e["tensors"]) {
        const std::string k = t["name"];
        INFO("tensor " << k);
        REQUIRE(ours.count(k) == 1);
        const auto& o = ours.at(k);
        CHECK(o.dtype == t["dtype"].get<std::string>());
        CHECK(o.shape == t["shape"].get<std::vector<std::int64_t>>());
        CHECK(o.bytes.size() == t["nbytes"].get<std::size_t>());
        if (sha(o.bytes) == t["sha256"].get<std::string>()) continue;
        ++differing;
        // Explain it, with bitsandbytes' bytes from expected.json (small tensors) or from the
        // Transformers-written file kept next to it.
        REQUIRE(ref.count(k) == 1);
        REQUIRE(sha(ref.at(k).bytes) == t["sha256"].get<std::string>());
        explain_difference(k, e, o, ref.at(k), ours, ref, st);
      }
      // Where nothing differs, the whole file is byte-identical (header order and padding
      // included); config.json is what Transformers wrote.
      if (differing == 0) {
        const auto bytes = ckpt_test::read_all(out / "model.safetensors");
        CHECK(sha(bytes) == e["file_sha256"].get<std::string>());
      }
      const auto cfg = ckpt_test::read_json(out / "config.json");
      CHECK(cfg == e["config"]);
      CHECK(nlohmann::json::parse(sp::bnb_config_to_dict(opt.quantize->config).dump()) ==
            e["quantization_config_to_dict"]);
      // to_dict's key order too (config.json itself is written with sorted keys).
      const auto ordered = nlohmann::ordered_json::parse(
          ckpt_test::read_text(sq::fixtures() / variant / "expected.json"));
      const auto dict = sp::bnb_config_to_dict(opt.quantize->config);
      CHECK(dict.dump() == ordered["quantization_config_to_dict"].dump());
      WARN(variant << ": " << differing << " tensor(s) differ; explained: " << st.fp4_codes
                   << " FP4 code(s), " << st.nested_codes << " nested absmax code(s)");
    }
  }
  fs::remove_all(tmp);
}

TEST_CASE("Transformers-written quantized checkpoints dequantize as bitsandbytes",
          "[quantized][read][conformance]") {
  for (const std::string variant : {"nf4_dq_bf16", "fp4_bf16_fp16compute", "int8_bf16"}) {
    DYNAMIC_SECTION(variant) {
      const auto e = expected(variant);
      const auto path = sq::fixtures() / variant / "model.safetensors";
      const auto rd = ck::checkpoint_reader::open(path);
      auto lookup_for = [&](const std::string& prefix) -> sp::state_tensor_lookup {
        return [&rd, prefix](std::string_view suffix) -> std::optional<sp::state_tensor_view> {
          const std::string k = prefix + "." + std::string(suffix);
          if (!rd.contains(k)) return std::nullopt;
          const auto v = rd.view(k);
          return sp::state_tensor_view{
              v.desc.dtype, {v.desc.shape.begin(), v.desc.shape.end()}, v.bytes};
        };
      };
      // The config block parses back to the same settings.
      const auto cfg = ckpt_test::read_json(sq::fixtures() / variant / "config.json");
      const auto bc = sp::bnb_config_from_json(cfg["quantization_config"]);
      CHECK(nlohmann::json::parse(sp::bnb_config_to_dict(bc).dump()) == cfg["quantization_config"]);
      // Every module Transformers quantized is one stowage's skip rules select, and back.
      const auto tree = llama_tree(sq::source_dir(e));
      std::vector<std::string> modules;
      for (const auto& d : e["dequantized"]) modules.push_back(d["module"].get<std::string>());
      CHECK(modules == sp::modules_to_quantize(tree, bc));
      REQUIRE(!modules.empty());
      for (const auto& d : e["dequantized"]) {
        const std::string m = d["module"];
        INFO("module " << m);
        const auto wv = rd.view(m + ".weight");
        const sp::state_tensor_view w{
            wv.desc.dtype, {wv.desc.shape.begin(), wv.desc.shape.end()}, wv.bytes};
        if (d["kind"] == "4bit") {
          const auto q = sp::quant_state_from_tensors(m + ".weight", w, lookup_for(m + ".weight"));
          CHECK(q.state.shape == d["shape"].get<std::vector<std::int64_t>>());
          const dtype dt = dtype_from_name(d["dtype"].get<std::string>());
          CHECK(q.state.original_dtype == dt);
          std::vector<std::byte> out(static_cast<std::size_t>(q.state.numel()) * element_size(dt));
          sp::dequantize_4bit(q, dt, out.data());
          auto f32 = sp::dequantize_4bit(q);
          // FP4 nibble 8 is -0.0 in stowage's table (bitsandbytes' CUDA LUT) and +0.0 in
          // bitsandbytes' CPU backends (quant_map built from the integer -0): the only
          // difference allowed, checked element by element.
          if (q.state.type == sp::quant_type::fp4)
            for (std::size_t i = 0; i < f32.size(); ++i) {
              if (nibble(std::as_bytes(std::span(q.packed)), i) != 8) continue;
              CHECK(std::bit_cast<std::uint32_t>(f32[i]) == 0x80000000u);
              f32[i] = 0.0f;
              const std::size_t es = element_size(dt);
              CHECK(std::to_integer<unsigned>(out[i * es + es - 1]) == 0x80u);
              out[i * es + es - 1] = std::byte{0};
            }
          // bitsandbytes' reference backend (the CUDA rule): always identical.
          CHECK(sha(out) == d["sha256"].get<std::string>());
          CHECK(sha_of(q.state.absmax) == d["absmax_f32_sha256"].get<std::string>());
          CHECK(sha_of(f32) == d["sha256_f32"].get<std::string>());
          // bitsandbytes' native CPU kernel indexes blocks per row; it agrees wherever blocks
          // do not cross rows, i.e. in_features is a multiple of the block size.
          const bool row_aligned =
              q.state.shape[1] % static_cast<std::int64_t>(q.state.blocksize) == 0;
          CHECK((sha(out) == d["sha256_cpu_kernel"].get<std::string>()) == row_aligned);
          CHECK((sha_of(f32) == d["sha256_f32_cpu_kernel"].get<std::string>()) == row_aligned);
          if (d.contains("bytes")) {
            const auto b = bnb_fixture::base64(d["bytes"].get<std::string>());
            REQUIRE(b.size() == out.size());
            CHECK(std::memcmp(b.data(), out.data(), b.size()) == 0);
          }
        } else {
          const auto scb = rd.view(m + ".SCB");
          const auto fmt = rd.view(m + ".weight_format");
          const auto q = sp::int8_from_tensors(
              m, w,
              sp::state_tensor_view{
                  scb.desc.dtype, {scb.desc.shape.begin(), scb.desc.shape.end()}, scb.bytes},
              sp::state_tensor_view{fmt.desc.dtype, {}, fmt.bytes});
          const auto f32 = sp::dequantize_int8(q);
          CHECK(sha_of(f32) == d["sha256"].get<std::string>());
          if (d.contains("bytes")) {
            const auto b = bnb_fixture::base64(d["bytes"].get<std::string>());
            REQUIRE(b.size() == f32.size() * 4);
            CHECK(std::memcmp(b.data(), f32.data(), b.size()) == 0);
          }
        }
      }
      CHECK(e["reload_forward"]["finite"] == true);
    }
  }
}

TEST_CASE("skip rules follow transformers' get_keys_to_not_convert / should_convert_module",
          "[quantized][skip]") {
  const auto untied = llama_tree(fs::path(STOWAGE_FIXTURES_DIR) / "tiny/models/llama_gqa");
  CHECK(sp::keys_to_not_convert(untied) == std::vector<std::string>{"lm_head"});
  const auto tied = llama_tree(fs::path(STOWAGE_FIXTURES_DIR) / "tiny/models/llama3_tied");
  CHECK(sp::keys_to_not_convert(tied) ==
        std::vector<std::string>{"lm_head", "model.embed_tokens", "model.norm"});
  const std::vector<std::string> p{"model.layers.1"};
  CHECK_FALSE(sp::should_convert_module("model.layers.1.mlp.up_proj", p));
  CHECK(sp::should_convert_module("model.layers.11.mlp.up_proj", p));
  const std::vector<std::string> suffix{"down_proj"};
  CHECK_FALSE(sp::should_convert_module("model.layers.3.mlp.down_proj", suffix));
  const std::vector<std::string> re{"model.layers.*.mlp.gate"};
  CHECK(sp::should_convert_module("model.layers.0.mlp.gate_proj", re));
  const std::vector<std::string> re2{"model\\.layers\\.[0-9]+\\.self_attn"};
  CHECK_FALSE(sp::should_convert_module("model.layers.2.self_attn.q_proj", re2));
  const std::vector<std::string> bad{"model.layers.(1"};
  CHECK_THROWS_AS(sp::should_convert_module("model.layers.1", bad), invalid_config);
  // A user list replaces the automatic one: lm_head is then quantized too.
  sp::bnb_config c;
  c.load_in_4bit = true;
  c.llm_int8_skip_modules = std::vector<std::string>{"mlp.down_proj", "model.layers.2"};
  const auto mods = sp::modules_to_quantize(untied, c);
  CHECK(std::find(mods.begin(), mods.end(), "lm_head") != mods.end());
  CHECK(std::find(mods.begin(), mods.end(), "model.layers.0.mlp.gate_proj") != mods.end());
  CHECK(std::none_of(mods.begin(), mods.end(), [](const std::string& m) {
    return m.ends_with("down_proj") || m.starts_with("model.layers.2.");
  }));
  // "mlp" alone matches neither from the start nor as a suffix: nothing is skipped by it.
  CHECK_FALSE(sp::should_convert_module("mlp.up_proj", std::vector<std::string>{"mlp"}));
  CHECK(sp::should_convert_module("model.layers.0.mlp.up_proj", std::vector<std::string>{"mlp"}));
}

TEST_CASE("broken quantized state is rejected with the tensor named", "[quantized][errors]") {
  const auto path = sq::fixtures() / "nf4_dq_bf16" / "model.safetensors";
  const auto rd = ck::checkpoint_reader::open(path);
  const std::string w = "model.layers.0.self_attn.q_proj.weight";
  const auto wv = rd.view(w);
  const sp::state_tensor_view weight{
      wv.desc.dtype, {wv.desc.shape.begin(), wv.desc.shape.end()}, wv.bytes};
  std::string bad_json = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\"";
  auto with = [&](std::string_view replace, std::span<const std::byte> bytes) {
    return [&rd, &w, replace, bytes](std::string_view s) -> std::optional<sp::state_tensor_view> {
      const std::string k = w + "." + std::string(s);
      if (s == replace)
        return sp::state_tensor_view{
            dtype::uint8, {static_cast<std::int64_t>(bytes.size())}, bytes};
      if (!rd.contains(k)) return std::nullopt;
      const auto v = rd.view(k);
      return sp::state_tensor_view{
          v.desc.dtype, {v.desc.shape.begin(), v.desc.shape.end()}, v.bytes};
    };
  };
  const auto truncated = std::as_bytes(std::span(bad_json.data(), bad_json.size()));
  try {
    (void)sp::quant_state_from_tensors(w, weight, with("quant_state.bitsandbytes__nf4", truncated));
    FAIL("no exception");
  } catch (const checkpoint_error& e) {
    CHECK(std::string(e.what()).find(w) != std::string::npos);
    CHECK(std::string(e.what()).find("invalid JSON") != std::string::npos);
  }
  // Wrong shape in the JSON: the packed byte count no longer matches.
  std::string other =
      "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
      "\"shape\": [64, 65], \"nested_blocksize\": 256, \"nested_dtype\": "
      "\"float32\", \"nested_offset\": 0.1}";
  CHECK_THROWS_AS(
      sp::quant_state_from_tensors(w, weight,
                                   with("quant_state.bitsandbytes__nf4",
                                        std::as_bytes(std::span(other.data(), other.size())))),
      checkpoint_error);
  // No state at all.
  CHECK_THROWS_AS(
      sp::quant_state_from_tensors(
          w, weight, [](std::string_view) { return std::optional<sp::state_tensor_view>{}; }),
      checkpoint_error);
  // int8 without SCB.
  const auto iv = ck::checkpoint_reader::open(sq::fixtures() / "int8_bf16" / "model.safetensors");
  const auto i8 = iv.view("model.layers.0.mlp.up_proj.weight");
  CHECK_THROWS_AS(
      sp::int8_from_tensors("model.layers.0.mlp.up_proj",
                            {i8.desc.dtype, {i8.desc.shape.begin(), i8.desc.shape.end()}, i8.bytes},
                            std::nullopt, std::nullopt),
      checkpoint_error);
  // Quantizing needs a valid configuration.
  ck::convert_options opt;
  sp::bnb_config c;
  c.load_in_4bit = true;
  c.blocksize = 100;
  opt.quantize = ck::quantize_options{
      c, llama_tree(fs::path(STOWAGE_FIXTURES_DIR) / "tiny/models/llama_gqa"), "lm_head"};
  CHECK_THROWS_AS(ck::convert_checkpoint(fs::path(STOWAGE_FIXTURES_DIR) / "tiny/models/llama_gqa",
                                         fs::temp_directory_path() / "stowage_qconv_never", opt),
                  invalid_config);
  CHECK_FALSE(fs::exists(fs::temp_directory_path() / "stowage_qconv_never"));
}
