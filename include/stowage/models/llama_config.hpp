// stowage/models/llama_config.hpp: the Llama family's configuration (Llama 1/2/3.x, Mistral,
// Qwen2) read from a Hugging Face config.json. Values and defaults follow Transformers'
// LlamaConfig / MistralConfig / Qwen2Config; the sizes that decide the structure (vocab_size,
// hidden_size, intermediate_size, num_hidden_layers, num_attention_heads) are required here,
// where Transformers would silently fall back to a 7B model's sizes. Every problem is an
// invalid_config naming the file and the key.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/leaf_modules.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace stowage::models {

/// Which Transformers implementation a config selects (its model_type); it decides the class
/// names and which projections carry a bias.
enum class llama_family : std::uint8_t { llama, mistral, qwen2 };

/// "llama", "mistral", "qwen2".
constexpr std::string_view model_type_name(llama_family f) noexcept {
  switch (f) {
    case llama_family::mistral:
      return "mistral";
    case llama_family::qwen2:
      return "qwen2";
    default:
      return "llama";
  }
}

/// The parsed form of a rope_scaling object (the object itself is kept in llama_config).
struct rope_scaling_params {
  std::string rope_type = "default";  ///< "llama3", "linear", "dynamic", "yarn", ...
  std::optional<double> factor;
  std::optional<double> low_freq_factor;
  std::optional<double> high_freq_factor;
  std::optional<std::int64_t> original_max_position_embeddings;
};

struct llama_config {
  std::string model_type = "llama";
  llama_family family = llama_family::llama;
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;  ///< defaults to num_attention_heads
  std::int64_t head_dim = 0;             ///< defaults to hidden_size / num_attention_heads
  bool attention_bias = false;           ///< Llama only (Mistral: none; Qwen2: q/k/v only)
  bool mlp_bias = false;                 ///< Llama only
  bool tie_word_embeddings = false;
  double rope_theta = 10000.0;
  std::optional<nlohmann::json> rope_scaling;  ///< the config's object, verbatim
  std::optional<rope_scaling_params> rope_scaling_parsed;
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";  ///< the MLP's activation (Transformers' ACT2FN key)
  std::int64_t max_position_embeddings = 2048;
  std::optional<stowage::dtype> torch_dtype;  ///< "torch_dtype" (or v5's "dtype")
  std::vector<std::int64_t> bos_token_id;     ///< an int or a list in config.json
  std::vector<std::int64_t> eos_token_id;
  std::optional<std::int64_t> pad_token_id;
  std::string source = "<json>";  ///< the file it came from, for messages

  /// Reads and validates a config.json.
  static llama_config from_file(const std::string& path);
  /// Validates a parsed config.json; `source` names it in error messages.
  static llama_config from_json(const nlohmann::json& j, std::string source = "<json>");

  /// Query heads / key-value heads (grouped-query attention).
  std::int64_t num_key_value_groups() const noexcept {
    return num_key_value_heads ? num_attention_heads / num_key_value_heads : 0;
  }
};

namespace detail {

class config_reader {
 public:
  config_reader(const nlohmann::json& j, const std::string& source) : j_(j), source_(source) {}

  [[noreturn]] void fail(std::string_view key, const std::string& what) const {
    throw invalid_config(source_ + ": key `" + std::string(key) + "`: " + what);
  }
  const nlohmann::json* find(std::string_view key) const {
    auto it = j_.find(std::string(key));
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  std::int64_t integer(std::string_view key, std::optional<std::int64_t> def,
                       std::int64_t min = 1) const {
    const auto* v = find(key);
    if (!v) {
      if (!def) fail(key, "missing (required)");
      return *def;
    }
    return integer_value(key, *v, min);
  }
  std::int64_t integer_value(std::string_view key, const nlohmann::json& v,
                             std::int64_t min) const {
    if (!v.is_number_integer()) fail(key, "expected an integer, got " + type_of(v));
    if (v.is_number_unsigned() &&
        v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
      fail(key, "value out of range");
    const auto x = v.get<std::int64_t>();
    if (x < min) fail(key, "expected a value >= " + std::to_string(min) + ", got " + v.dump());
    return x;
  }
  double number(std::string_view key, double def, bool positive = true) const {
    const auto* v = find(key);
    if (!v) return def;
    if (!v->is_number()) fail(key, "expected a number, got " + type_of(*v));
    const double x = v->get<double>();
    if (positive && !(x > 0)) fail(key, "expected a positive number, got " + v->dump());
    return x;
  }
  bool boolean(std::string_view key, bool def) const {
    const auto* v = find(key);
    if (!v) return def;
    if (!v->is_boolean()) fail(key, "expected true or false, got " + type_of(*v));
    return v->get<bool>();
  }
  std::vector<std::int64_t> int_or_list(std::string_view key) const {
    const auto* v = find(key);
    std::vector<std::int64_t> out;
    if (!v) return out;
    if (v->is_array()) {
      for (const auto& e : *v) out.push_back(integer_value(key, e, 0));
    } else {
      out.push_back(integer_value(key, *v, 0));
    }
    return out;
  }
  static std::string type_of(const nlohmann::json& v) { return std::string(v.type_name()); }

 private:
  const nlohmann::json& j_;
  const std::string& source_;
};

inline rope_scaling_params parse_rope_scaling(const config_reader& r, std::string_view key,
                                              const nlohmann::json& o) {
  if (!o.is_object()) r.fail(key, "expected an object, got " + config_reader::type_of(o));
  rope_scaling_params p;
  const std::string k(key);
  auto it = o.find("rope_type");
  if (it == o.end() || it->is_null()) it = o.find("type");  // older configs say "type"
  if (it != o.end() && !it->is_null()) {
    if (!it->is_string()) r.fail(k + ".rope_type", "expected a string");
    p.rope_type = it->get<std::string>();
  }
  auto num = [&](const char* name) -> std::optional<double> {
    auto f = o.find(name);
    if (f == o.end() || f->is_null()) return std::nullopt;
    if (!f->is_number()) r.fail(k + "." + name, "expected a number");
    return f->get<double>();
  };
  p.factor = num("factor");
  p.low_freq_factor = num("low_freq_factor");
  p.high_freq_factor = num("high_freq_factor");
  if (auto f = o.find("original_max_position_embeddings"); f != o.end() && !f->is_null())
    p.original_max_position_embeddings =
        r.integer_value(k + ".original_max_position_embeddings", *f, 1);
  if (p.rope_type == "llama3") {
    if (!p.factor) r.fail(k + ".factor", "missing (required by rope_type llama3)");
    if (!p.low_freq_factor) r.fail(k + ".low_freq_factor", "missing (required by llama3)");
    if (!p.high_freq_factor) r.fail(k + ".high_freq_factor", "missing (required by llama3)");
    if (!p.original_max_position_embeddings)
      r.fail(k + ".original_max_position_embeddings", "missing (required by llama3)");
  }
  return p;
}

}  // namespace detail

inline llama_config llama_config::from_json(const nlohmann::json& j, std::string src) {
  llama_config c;
  c.source = std::move(src);
  if (!j.is_object())
    throw invalid_config(c.source + ": expected a JSON object at the top level, got " +
                         std::string(j.type_name()));
  const detail::config_reader r(j, c.source);

  const auto* mt = r.find("model_type");
  if (!mt) r.fail("model_type", "missing (required)");
  if (!mt->is_string()) r.fail("model_type", "expected a string, got " + r.type_of(*mt));
  c.model_type = mt->get<std::string>();
  if (c.model_type == "llama")
    c.family = llama_family::llama;
  else if (c.model_type == "mistral")
    c.family = llama_family::mistral;
  else if (c.model_type == "qwen2")
    c.family = llama_family::qwen2;
  else
    r.fail("model_type",
           "unsupported model type \"" + c.model_type + "\" (supported: llama, mistral, qwen2)");

  c.vocab_size = r.integer("vocab_size", std::nullopt);
  c.hidden_size = r.integer("hidden_size", std::nullopt);
  c.intermediate_size = r.integer("intermediate_size", std::nullopt);
  c.num_hidden_layers = r.integer("num_hidden_layers", std::nullopt, 0);
  c.num_attention_heads = r.integer("num_attention_heads", std::nullopt);
  c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail("num_key_value_heads", "num_attention_heads (" + std::to_string(c.num_attention_heads) +
                                      ") is not a multiple of num_key_value_heads (" +
                                      std::to_string(c.num_key_value_heads) + ")");
  if (r.find("head_dim")) {
    c.head_dim = r.integer("head_dim", std::nullopt);
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      r.fail("hidden_size", "hidden_size (" + std::to_string(c.hidden_size) +
                                ") is not divisible by num_attention_heads (" +
                                std::to_string(c.num_attention_heads) +
                                ") and head_dim is not set");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  c.attention_bias = r.boolean("attention_bias", false);
  c.mlp_bias = r.boolean("mlp_bias", false);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  if (const auto* act = r.find("hidden_act")) {
    if (!act->is_string()) r.fail("hidden_act", "expected a string, got " + r.type_of(*act));
    c.hidden_act = act->get<std::string>();
    if (activation_class_name(c.hidden_act).empty())
      r.fail("hidden_act", "unsupported activation \"" + c.hidden_act + "\"");
  }
  const std::int64_t default_max_pos = c.family == llama_family::llama     ? 2048
                                       : c.family == llama_family::mistral ? 4096 * 32
                                                                           : 32768;
  c.max_position_embeddings = r.integer("max_position_embeddings", default_max_pos);

  // Rope: v4 configs have rope_theta + rope_scaling; v5 configs a rope_parameters object
  // that holds rope_theta and the scaling keys together.
  c.rope_theta = r.number("rope_theta", 10000.0);
  if (const auto* rs = r.find("rope_scaling")) {
    c.rope_scaling_parsed = detail::parse_rope_scaling(r, "rope_scaling", *rs);
    c.rope_scaling = *rs;
  } else if (const auto* rp = r.find("rope_parameters")) {
    auto p = detail::parse_rope_scaling(r, "rope_parameters", *rp);
    if (auto t = rp->find("rope_theta"); t != rp->end() && !t->is_null()) {
      if (!t->is_number() || !(t->get<double>() > 0))
        r.fail("rope_parameters.rope_theta", "expected a positive number");
      c.rope_theta = t->get<double>();
    }
    if (p.rope_type != "default") {
      c.rope_scaling_parsed = std::move(p);
      c.rope_scaling = *rp;
    }
  }

  if (const auto* d = r.find("torch_dtype") ? r.find("torch_dtype") : r.find("dtype")) {
    const char* key = r.find("torch_dtype") ? "torch_dtype" : "dtype";
    if (!d->is_string()) r.fail(key, "expected a dtype name, got " + r.type_of(*d));
    auto dt = parse_dtype(d->get<std::string>());
    if (!dt || !is_floating_point(*dt))
      r.fail(key, "unknown floating dtype \"" + d->get<std::string>() + "\"");
    c.torch_dtype = *dt;
  }
  c.bos_token_id = r.int_or_list("bos_token_id");
  c.eos_token_id = r.int_or_list("eos_token_id");
  if (r.find("pad_token_id")) c.pad_token_id = r.integer("pad_token_id", std::nullopt, 0);
  return c;
}

inline llama_config llama_config::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw invalid_config(path + ": not valid JSON: " + e.what());
  }
  return from_json(j, path);
}

}  // namespace stowage::models
