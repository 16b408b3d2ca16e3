// stowage/precision/bnb_config.hpp: Transformers' BitsAndBytesConfig (the `quantization_config`
// block of a quantized model's config.json) and the rules deciding which modules Transformers
// replaces by bitsandbytes layers (formats-spec §3; transformers 5.x quantizers/base.py
// get_keys_to_not_convert, quantizers_utils.should_convert_module). stowage writes and reads
// this block so that a checkpoint quantized by stowage loads in Transformers and back.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/precision/quant_state.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <regex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace stowage::precision {

/// BitsAndBytesConfig's fields with Transformers' defaults (formats-spec §3.1). `blocksize` is
/// not part of the Transformers config (Linear4bit always quantizes with 64); stowage can
/// write other block sizes, which bitsandbytes reads back from each weight's QuantState JSON.
struct bnb_config {
  bool load_in_8bit = false;
  bool load_in_4bit = false;
  double llm_int8_threshold = 6.0;
  /// Replaces the automatic skip list when set (also used for 4-bit).
  std::optional<std::vector<std::string>> llm_int8_skip_modules;
  bool llm_int8_enable_fp32_cpu_offload = false;
  bool llm_int8_has_fp16_weight = false;
  dtype bnb_4bit_compute_dtype = dtype::float32;  ///< None in Python means float32
  quant_type bnb_4bit_quant_type = quant_type::fp4;
  bool bnb_4bit_use_double_quant = false;
  dtype bnb_4bit_quant_storage = dtype::uint8;
  std::size_t blocksize = 64;  ///< stowage extension, see above

  /// Throws invalid_config for what BitsAndBytesConfig.post_init rejects, plus what stowage's
  /// writer does not produce (a quant_storage other than uint8).
  void validate() const {
    if (load_in_4bit && load_in_8bit)
      throw invalid_config("bnb_config: load_in_4bit and load_in_8bit are mutually exclusive");
    if (!load_in_4bit && !load_in_8bit)
      throw invalid_config("bnb_config: one of load_in_4bit or load_in_8bit must be set");
    if (bnb_4bit_compute_dtype != dtype::float32 && bnb_4bit_compute_dtype != dtype::float16 &&
        bnb_4bit_compute_dtype != dtype::bfloat16)
      throw invalid_config(
          "bnb_config: bnb_4bit_compute_dtype must be float32, float16 or "
          "bfloat16, got " +
          std::string(name(bnb_4bit_compute_dtype)));
    if (bnb_4bit_quant_storage != dtype::uint8)
      throw invalid_config("bnb_config: bnb_4bit_quant_storage " +
                           std::string(name(bnb_4bit_quant_storage)) +
                           " is not supported (stowage writes uint8 packed weights)");
    if (load_in_4bit && !is_valid_4bit_blocksize(blocksize))
      throw invalid_config("bnb_config: block size " + std::to_string(blocksize) +
                           " is not one of 64, 128, 256, 512, 1024, 2048, 4096");
  }
};

/// BitsAndBytesConfig.to_dict(): same keys, same order, same values (dtypes as their torch
/// names without "torch."). config.json stores it with sorted keys (json.dumps sort_keys).
inline nlohmann::ordered_json bnb_config_to_dict(const bnb_config& c) {
  nlohmann::ordered_json j;
  j["quant_method"] = "bitsandbytes";
  j["_load_in_8bit"] = c.load_in_8bit;
  j["_load_in_4bit"] = c.load_in_4bit;
  j["llm_int8_threshold"] = c.llm_int8_threshold;
  j["llm_int8_skip_modules"] =
      c.llm_int8_skip_modules ? nlohmann::ordered_json(*c.llm_int8_skip_modules) : nullptr;
  j["llm_int8_enable_fp32_cpu_offload"] = c.llm_int8_enable_fp32_cpu_offload;
  j["llm_int8_has_fp16_weight"] = c.llm_int8_has_fp16_weight;
  j["bnb_4bit_quant_type"] = std::string(name(c.bnb_4bit_quant_type));
  j["bnb_4bit_use_double_quant"] = c.bnb_4bit_use_double_quant;
  j["bnb_4bit_compute_dtype"] = std::string(name(c.bnb_4bit_compute_dtype));
  j["bnb_4bit_quant_storage"] = std::string(name(c.bnb_4bit_quant_storage));
  j["load_in_4bit"] = c.load_in_4bit;
  j["load_in_8bit"] = c.load_in_8bit;
  return j;
}

/// Reads a config.json `quantization_config` block written by Transformers. Throws json_error
/// (with the JSON path) for a non-bitsandbytes method or a field of the wrong type.
template <class Json>
  requires std::same_as<Json, nlohmann::json> || std::same_as<Json, nlohmann::ordered_json>
      bnb_config bnb_config_from_json(const Json& j,
                                      const std::string& path = "quantization_config") {
    if (!j.is_object()) throw json_error(path, "expected an object");
    const auto method = j.find("quant_method");
    if (method == j.end() || !method->is_string() ||
        method->template get<std::string>() != "bitsandbytes")
      throw json_error(path + ".quant_method", "expected \"bitsandbytes\"");
    bnb_config c;
    auto get_bool = [&](const char* key, bool& out) {
      const auto it = j.find(key);
      if (it == j.end()) return;
      if (!it->is_boolean()) throw json_error(path + "." + key, "expected a boolean");
      out = it->template get<bool>();
    };
    auto get_dtype = [&](const char* key, dtype& out) {
      const auto it = j.find(key);
      if (it == j.end() || it->is_null()) return;
      if (!it->is_string()) throw json_error(path + "." + key, "expected a dtype name");
      out = dtype_from_name(it->template get<std::string>());
    };
    // `load_in_4bit`/`load_in_8bit` are what Transformers reads (`_load_in_*` mirror them).
    get_bool("_load_in_8bit", c.load_in_8bit);
    get_bool("_load_in_4bit", c.load_in_4bit);
    get_bool("load_in_8bit", c.load_in_8bit);
    get_bool("load_in_4bit", c.load_in_4bit);
    get_bool("llm_int8_enable_fp32_cpu_offload", c.llm_int8_enable_fp32_cpu_offload);
    get_bool("llm_int8_has_fp16_weight", c.llm_int8_has_fp16_weight);
    get_bool("bnb_4bit_use_double_quant", c.bnb_4bit_use_double_quant);
    if (const auto it = j.find("llm_int8_threshold"); it != j.end()) {
      if (!it->is_number()) throw json_error(path + ".llm_int8_threshold", "expected a number");
      c.llm_int8_threshold = it->template get<double>();
    }
    if (const auto it = j.find("llm_int8_skip_modules"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) throw json_error(path + ".llm_int8_skip_modules", "expected a list");
      std::vector<std::string> v;
      for (const auto& e : *it) {
        if (!e.is_string())
          throw json_error(path + ".llm_int8_skip_modules", "expected a list of strings");
        v.push_back(e.template get<std::string>());
      }
      c.llm_int8_skip_modules = std::move(v);
    }
    if (const auto it = j.find("bnb_4bit_quant_type"); it != j.end()) {
      const std::string t = it->is_string() ? it->template get<std::string>() : "";
      if (t != "nf4" && t != "fp4")
        throw json_error(path + ".bnb_4bit_quant_type", "expected \"nf4\" or \"fp4\"");
      c.bnb_4bit_quant_type = t == "nf4" ? quant_type::nf4 : quant_type::fp4;
    }
    get_dtype("bnb_4bit_compute_dtype", c.bnb_4bit_compute_dtype);
    get_dtype("bnb_4bit_quant_storage", c.bnb_4bit_quant_storage);
    return c;
  }

/// transformers' get_keys_to_not_convert(model): every name of a tied-weight group, the last
/// parameter of named_parameters() (tied duplicates removed, as torch does) and the output
/// embedding module, each without a trailing ".weight". `output_embeddings` is the module
/// get_output_embeddings() returns ("lm_head" for *ForCausalLM; "" for none). Sorted.
inline std::vector<std::string> keys_to_not_convert(
    const module_tree& tree, std::string_view output_embeddings = "lm_head") {
  std::set<std::string> keys;
  auto strip = [](std::string s) {
    if (s.ends_with(".weight")) s.resize(s.size() - 7);
    return s;
  };
  std::set<std::string> duplicate;  // non-first members of tie groups: not in named_parameters
  const auto canon = tree.tie_canonical_names();
  for (const auto& g : tree.tied_parameters())
    for (const auto& n : g) {
      keys.insert(strip(n));
      if (const auto it = canon.find(n); it != canon.end() && it->second != n) duplicate.insert(n);
    }
  std::string last;
  tree.for_each_parameter([&](std::string n, const tensor_entry&) {
    if (!duplicate.count(n)) last = std::move(n);
  });
  if (!last.empty()) keys.insert(strip(last));
  if (!output_embeddings.empty() && tree.find_module(output_embeddings))
    keys.insert(std::string(output_embeddings));
  return {keys.begin(), keys.end()};
}

/// transformers' should_convert_module(full_name, patterns): false when a pattern matches
/// `full_name` from its start up to a module boundary (as a regular expression: "layers.1"
/// matches "layers.1.mlp" but not "layers.11.mlp"), or when full_name ends with the pattern.
/// Patterns are ECMAScript regular expressions here (Python `re` for module names is the same
/// subset: literal names, `.`, `*`, character classes); an invalid one throws invalid_config.
inline bool should_convert_module(std::string_view full_name,
                                  std::span<const std::string> patterns) {
  for (const auto& key : patterns) {
    if (full_name.ends_with(key)) return false;
    std::regex re;
    try {
      re = std::regex(key, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw invalid_config("should_convert_module: skip pattern `" + key +
                           "` is not a valid regular expression: " + e.what());
    }
    // Python's `(?:key)(?:(?<=\.)|(?=\.|$))` with re.match: some prefix of full_name matches
    // the whole pattern and ends at a boundary (after a '.', before a '.', or at the end).
    for (std::size_t p = 0; p <= full_name.size(); ++p) {
      const bool boundary =
          p == full_name.size() || full_name[p] == '.' || (p > 0 && full_name[p - 1] == '.');
      if (!boundary) continue;
      const std::string prefix(full_name.substr(0, p));
      if (std::regex_match(prefix, re)) return false;
    }
  }
  return true;
}

/// The modules Transformers' replace_with_bnb_linear turns into Linear4bit/Linear8bitLt:
/// every module of class "Linear" (torch.nn.Linear) not excluded by should_convert_module
/// with `llm_int8_skip_modules` (when given) or keys_to_not_convert(tree) otherwise. In
/// module order. (GPT-2's Conv1D is not handled: stowage's trees have no such class.)
inline std::vector<std::string> modules_to_quantize(
    const module_tree& tree, const bnb_config& c, std::string_view output_embeddings = "lm_head") {
  const std::vector<std::string> skip = c.llm_int8_skip_modules
                                            ? *c.llm_int8_skip_modules
                                            : keys_to_not_convert(tree, output_embeddings);
  std::vector<std::string> out;
  for (std::size_t i : tree.preorder()) {
    const auto& n = tree.node(i);
    if (n.class_name == "Linear" && !n.path.empty() && should_convert_module(n.path, skip))
      out.push_back(n.path);
  }
  return out;
}

}  // namespace stowage::precision
