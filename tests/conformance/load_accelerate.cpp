// Conformance: load_checkpoint_and_dispatch against the real accelerate
// (tests/fixtures/load/cases.json, written by tools/gen_load_fixtures.py). For every state-dict
// name stowage must hold the bytes torch's .to() gives; these equal what accelerate leaves in
// the model except for the documented differences, which are asserted as differences:
//   §9.11  persistent buffers of "disk" modules: accelerate keeps init values, stowage loads them
//   §9.12  keep_in_fp32_modules with bfloat16: accelerate converts, stowage keeps float32
//   disk dtype: accelerate's .dat keep the checkpoint dtype, stowage's hold the target dtype
//          (or reference the safetensors file when no conversion is needed)
#include "support/temp_dir.hpp"

#include <stowage/dispatch/load.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/precision/floating.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

namespace fs = std::filesystem;
using nlohmann::json;

using stowage_test::temp_dir;

namespace {

const fs::path load_dir = fs::path(STOWAGE_FIXTURES_DIR) / "load";

json read_json(const fs::path& p) {
  std::ifstream in(p);
  REQUIRE(in.good());
  return json::parse(in);
}

std::string hex(std::span<const std::byte> b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  s.reserve(b.size() * 2);
  for (auto x : b) {
    const auto v = static_cast<unsigned>(x);
    s += d[v >> 4];
    s += d[v & 15];
  }
  return s;
}

std::string file_hex(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string s = ss.str();
  return hex(std::span(reinterpret_cast<const std::byte*>(s.data()), s.size()));
}

stowage::module_tree tree_for(const std::string& ckpt) {
  if (ckpt.rfind("f1", 0) == 0)
    return stowage::load_module_tree(std::string(STOWAGE_FIXTURES_DIR) + "/module_trees/F1.json");
  const fs::path dir = load_dir / fs::path(ckpt).begin()->string();
  const auto cfg = stowage::models::llama_config::from_file((dir / "config.json").string());
  const auto model =
      stowage::init_empty<stowage::models::llama_for_causal_lm<stowage::precision::fp32>>(cfg);
  return stowage::to_module_tree(model);
}

}  // namespace

TEST_CASE("load_checkpoint_and_dispatch matches accelerate on every fixture case",
          "[load][conformance]") {
  const json all = read_json(load_dir / "cases.json");
  REQUIRE(all["cases"].size() >= 6);
  for (const auto& c : all["cases"]) {
    const std::string id = c["id"];
    SECTION(id) {
      INFO("case " << id);
      temp_dir tmp("load-conf");
      const auto tree = tree_for(c["checkpoint"]);
      const auto map = stowage::device_map::from_json(c["device_map"]);
      stowage::load_options opts;
      if (!c["dtype"].is_null())
        opts.dtype = stowage::dtype_from_name(c["dtype"].get<std::string>());
      opts.keep_in_fp32_modules = c["keep_in_fp32_modules"].get<std::vector<std::string>>();
      opts.offload_buffers = c["offload_buffers"];
      opts.offload_folder = tmp.path / "offload";
      opts.threads = 2;
      opts.staging_window_bytes = 1;  // smallest chunks: many chunks per tensor
      const auto res = stowage::load_checkpoint_and_dispatch(
          tree, load_dir / c["checkpoint"].get<std::string>(), map, opts);
      CHECK(res.report().missing_keys.empty());
      CHECK(res.report().unexpected_keys.empty());
      CHECK(res.main_device() == stowage::device::cpu());

      const json& acc = c["accelerate"]["tensors"];
      const json& exp = c["expected"];
      const json& ckv = c["checkpoint_values"];
      const bool bf16_keep = c["dtype"] == "bfloat16" && !c["keep_in_fp32_modules"].empty();
      std::size_t differences = 0;
      for (auto it = acc.begin(); it != acc.end(); ++it) {
        const std::string& name = it.key();
        const json& a = it.value();
        INFO("tensor " << name);
        REQUIRE(exp.contains(name));
        const json& e = exp[name];
        const auto v = res.view(name);
        CHECK(std::string(stowage::name(v.desc.dtype)) == e["dtype"].get<std::string>());
        CHECK(hex(v.bytes()) == e["hex"].get<std::string>());
        const bool on_disk = a["device"] == "meta";
        if (!on_disk) {
          const bool disk_buffer = map.device_for(name)->is_disk();
          if (disk_buffer) {
            // §9.11: accelerate kept the init value; the checkpoint holds something else.
            CHECK(a["hex"] != ckv[name]["hex"]);
            CHECK(v.kind == stowage::storage::storage_kind::host);
            ++differences;
          } else if (bf16_keep && a["dtype"] != e["dtype"]) {
            // §9.12: accelerate converted a keep_in_fp32 module to bfloat16.
            CHECK(e["dtype"] == "float32");
            ++differences;
          } else {
            CHECK(a["dtype"] == e["dtype"]);
            CHECK(a["hex"] == e["hex"]);
          }
          CHECK(v.kind == stowage::storage::storage_kind::host);
        } else {
          CHECK(v.kind == stowage::storage::storage_kind::file);
          CHECK(v.placement.is_disk());
          CHECK(res.offloaded(name));
          if (!bf16_keep || e["dtype"] != "float32")
            CHECK(a["dtype"] == e["dtype"]);  // the meta dtype
        }
      }
      if (c["id"] == "f1_st_disk" || bf16_keep) CHECK(differences > 0);

      // The offload folder: the same names as accelerate's index; stowage's files hold the
      // target dtype (accelerate's the checkpoint dtype).
      const json& acc_index = c["accelerate"]["offload_index"];
      const json& acc_dat = c["accelerate"]["offload_dat"];
      if (acc_index.is_null()) {
        CHECK_FALSE(fs::exists(tmp.path / "offload"));
      } else {
        const json ours = read_json(tmp.path / "offload" / "index.json");
        std::set<std::string> a_keys, o_keys;
        for (auto it = acc_index.begin(); it != acc_index.end(); ++it) a_keys.insert(it.key());
        for (auto it = ours.begin(); it != ours.end(); ++it) o_keys.insert(it.key());
        CHECK(a_keys == o_keys);
        const bool st =
            fs::path(c["checkpoint"].get<std::string>()).string().find("_st") != std::string::npos;
        std::size_t referenced = 0;
        for (const auto& k : o_keys) {
          INFO("offloaded " << k);
          const json& o = ours[k];
          const json& e = exp[k];
          // accelerate's .dat: the checkpoint bytes in the checkpoint dtype.
          CHECK(acc_index[k]["dtype"] == ckv[k]["dtype"]);
          CHECK(acc_dat[k] == ckv[k]["hex"]);
          if (o.contains("safetensors_file")) {
            // Served from the checkpoint: only when no conversion was needed.
            CHECK(st);
            ++referenced;
            CHECK(e["dtype"] == ckv[k]["dtype"]);
            CHECK(o["weight_name"] == k);
            CHECK(o["dtype"] == e["dtype"]);
            CHECK(fs::exists(o["safetensors_file"].get<std::string>()));
            CHECK_FALSE(fs::exists(tmp.path / "offload" / (k + ".dat")));
            CHECK(res.weights().at(k).region()->path() ==
                  fs::path(o["safetensors_file"].get<std::string>()));
          } else {
            CHECK((!st || e["dtype"] != ckv[k]["dtype"]));
            CHECK(o["dtype"] == e["dtype"]);
            CHECK(o["shape"] == acc_index[k]["shape"]);
            CHECK(file_hex(tmp.path / "offload" / (k + ".dat")) == e["hex"].get<std::string>());
          }
        }
        // Safetensors checkpoints with tensors already in the target dtype: no second copy.
        if (id == "f1_st_disk" || id == "f1_st_disk_buffers" || id == "llama_st_fp16_keep" ||
            id == "llama_st_bf16_keep")
          CHECK(referenced > 0);
        else
          CHECK(referenced == 0);
        CHECK((res.report().offload_bytes_referenced > 0) == (referenced > 0));
        // The folder reads back with the offload_folder reader.
        const auto folder = stowage::storage::offload_folder::open(tmp.path / "offload");
        CHECK(folder.entries().size() == o_keys.size());
      }

      // Ties: one storage.
      if (tree.find_tensor("lm_head.weight")) {
        CHECK(res.weights().shares_storage("lm_head.weight", "model.embed_tokens.weight"));
        CHECK(res.weights().storage_count() + 1 == res.weights().size());
      }
    }
  }
}
