// stowage/exec/llama_forward.hpp: the Llama / Mistral / Qwen2 decoder forward pass on the CPU
// (embeddings -> layers -> final norm -> lm_head), prefill and KV-cached decode, and a generate
// loop with EOS stop. Numerics live in exec/cpu/*; this file is only the plumbing. Weights come
// through llama_weights_source, asked for one layer at a time right before it runs and told
// when the layer is done, so a dispatched model can bring offloaded layers in (and prefetch the
// next) behind the same interface that a plain checkpoint lookup implements.
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/exec/cpu/attention.hpp>
#include <stowage/exec/cpu/embedding.hpp>
#include <stowage/exec/cpu/linear.hpp>
#include <stowage/exec/cpu/mlp.hpp>
#include <stowage/exec/cpu/rms_norm.hpp>
#include <stowage/exec/cpu/rope.hpp>
#include <stowage/exec/cpu/sampling.hpp>
#include <stowage/exec/cpu/weight_ref.hpp>
#include <stowage/exec/thread_pool.hpp>
#include <stowage/models/llama_config.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stowage::exec {

using cpu::weight_ref;

/// The sizes and constants the forward pass needs (a subset of config.json).
struct llama_dims {
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  float rms_norm_eps = 1e-6f;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  ///< Qwen2; Llama's attention_bias also sets o_proj's
  bool o_bias = false;
  bool mlp_bias = false;
  std::optional<std::int64_t> sliding_window;  ///< Mistral
  cpu::rope_params rope;

  /// From a validated llama_config (sliding_window is not part of it: pass it separately).
  static llama_dims from_config(const models::llama_config& c,
                                std::optional<std::int64_t> window = std::nullopt) {
    if (c.hidden_act != "silu")
      throw invalid_config(c.source + ": key `hidden_act`: '" + c.hidden_act +
                           "' is not supported (silu is)");
    llama_dims d;
    d.vocab_size = c.vocab_size;
    d.hidden_size = c.hidden_size;
    d.intermediate_size = c.intermediate_size;
    d.num_layers = c.num_hidden_layers;
    d.num_heads = c.num_attention_heads;
    d.num_kv_heads = c.num_key_value_heads;
    d.head_dim = c.head_dim;
    d.rms_norm_eps = static_cast<float>(c.rms_norm_eps);
    d.tie_word_embeddings = c.tie_word_embeddings;
    d.qkv_bias = c.family == models::llama_family::qwen2 || c.attention_bias;
    d.o_bias = c.family == models::llama_family::llama && c.attention_bias;
    d.mlp_bias = c.family == models::llama_family::llama && c.mlp_bias;
    d.sliding_window = window;
    d.rope.theta = c.rope_theta;
    d.rope.dim = c.head_dim;
    d.rope.max_position_embeddings = c.max_position_embeddings;
    if (c.rope_scaling_parsed) {
      const auto& r = *c.rope_scaling_parsed;
      d.rope.type = r.rope_type;
      if (r.factor) d.rope.factor = *r.factor;
      if (r.low_freq_factor) d.rope.low_freq_factor = *r.low_freq_factor;
      if (r.high_freq_factor) d.rope.high_freq_factor = *r.high_freq_factor;
      if (r.original_max_position_embeddings)
        d.rope.original_max_position_embeddings = *r.original_max_position_embeddings;
    }
    if (d.num_heads % d.num_kv_heads != 0)
      throw invalid_config(c.source +
                           ": num_attention_heads must be a multiple of num_key_value_heads");
    return d;
  }

  /// Reads config.json: llama_config plus Mistral's sliding_window (Qwen2's per-layer window,
  /// use_sliding_window = true, is rejected).
  static llama_dims from_file(const std::string& path) {
    const auto c = models::llama_config::from_file(path);
    std::ifstream in(path);
    const auto j = nlohmann::json::parse(in, nullptr, false);
    std::optional<std::int64_t> window;
    if (j.is_object()) {
      if (c.family == models::llama_family::mistral) {
        if (auto it = j.find("sliding_window");
            it != j.end() && it->is_number_integer() && it->get<std::int64_t>() > 0)
          window = it->get<std::int64_t>();
      } else if (c.family == models::llama_family::qwen2) {
        if (auto it = j.find("use_sliding_window");
            it != j.end() && it->is_boolean() && it->get<bool>())
          throw invalid_config(
              path + ": key `use_sliding_window`: true is not supported by the CPU forward");
      }
    }
    return from_config(c, window);
  }
};

/// The weights of one decoder layer. Biases are empty refs when the model has none.
struct llama_layer_weights {
  weight_ref input_layernorm, post_attention_layernorm;
  weight_ref q_proj, k_proj, v_proj, o_proj;
  weight_ref q_bias, k_bias, v_bias, o_bias;
  weight_ref gate_proj, up_proj, down_proj;
  weight_ref gate_bias, up_bias, down_bias;
};

/// Where the forward pass gets its weights. layer(i) is called right before layer i runs and
/// release_layer(i) right after, every forward call: an offloading source fetches in layer()
/// (and may start fetching i + 1), and frees in release_layer().
class llama_weights_source {
 public:
  virtual ~llama_weights_source() = default;
  virtual weight_ref embed_tokens() = 0;
  virtual llama_layer_weights layer(std::int64_t i) = 0;
  virtual void release_layer(std::int64_t /*i*/) {}
  virtual weight_ref final_norm() = 0;
  virtual weight_ref lm_head() = 0;
};

/// Looks a tensor up by its checkpoint name ("model.layers.0.self_attn.q_proj.weight");
/// nullopt when absent.
using tensor_lookup = std::function<std::optional<weight_ref>(std::string_view name)>;

/// A source over named tensors (a safetensors file, a state dict, a dispatched model's host
/// storage). Every tensor is looked up and its shape checked once, at construction.
class named_llama_weights final : public llama_weights_source {
 public:
  named_llama_weights(const llama_dims& d, const tensor_lookup& get) {
    const std::int64_t q_out = d.num_heads * d.head_dim, kv_out = d.num_kv_heads * d.head_dim;
    embed_ = need(get, "model.embed_tokens.weight", d.vocab_size, d.hidden_size);
    norm_ = need(get, "model.norm.weight", 1, d.hidden_size);
    if (auto h = get("lm_head.weight"); h && !d.tie_word_embeddings) {
      lm_head_ = checked(std::move(*h), "lm_head.weight", d.vocab_size, d.hidden_size);
    } else if (d.tie_word_embeddings) {
      lm_head_ = embed_;  // tied: the checkpoint usually omits lm_head.weight
    } else {
      throw model_error("lm_head.weight: missing and tie_word_embeddings is false");
    }
    for (std::int64_t i = 0; i < d.num_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      llama_layer_weights l;
      l.input_layernorm = need(get, p + "input_layernorm.weight", 1, d.hidden_size);
      l.post_attention_layernorm =
          need(get, p + "post_attention_layernorm.weight", 1, d.hidden_size);
      l.q_proj = need(get, p + "self_attn.q_proj.weight", q_out, d.hidden_size);
      l.k_proj = need(get, p + "self_attn.k_proj.weight", kv_out, d.hidden_size);
      l.v_proj = need(get, p + "self_attn.v_proj.weight", kv_out, d.hidden_size);
      l.o_proj = need(get, p + "self_attn.o_proj.weight", d.hidden_size, q_out);
      if (d.qkv_bias) {
        l.q_bias = need(get, p + "self_attn.q_proj.bias", 1, q_out);
        l.k_bias = need(get, p + "self_attn.k_proj.bias", 1, kv_out);
        l.v_bias = need(get, p + "self_attn.v_proj.bias", 1, kv_out);
      }
      if (d.o_bias) l.o_bias = need(get, p + "self_attn.o_proj.bias", 1, d.hidden_size);
      l.gate_proj = need(get, p + "mlp.gate_proj.weight", d.intermediate_size, d.hidden_size);
      l.up_proj = need(get, p + "mlp.up_proj.weight", d.intermediate_size, d.hidden_size);
      l.down_proj = need(get, p + "mlp.down_proj.weight", d.hidden_size, d.intermediate_size);
      if (d.mlp_bias) {
        l.gate_bias = need(get, p + "mlp.gate_proj.bias", 1, d.intermediate_size);
        l.up_bias = need(get, p + "mlp.up_proj.bias", 1, d.intermediate_size);
        l.down_bias = need(get, p + "mlp.down_proj.bias", 1, d.hidden_size);
      }
      layers_.push_back(std::move(l));
    }
  }

  weight_ref embed_tokens() override { return embed_; }
  llama_layer_weights layer(std::int64_t i) override {
    return layers_.at(static_cast<std::size_t>(i));
  }
  weight_ref final_norm() override { return norm_; }
  weight_ref lm_head() override { return lm_head_; }

 private:
  static weight_ref checked(weight_ref w, const std::string& name, std::int64_t rows,
                            std::int64_t cols) {
    w.name = name;
    cpu::check_readable(w);
    if (w.numel() != rows * cols || (rows > 1 && w.rows != rows))
      throw model_error(name + ": shape [" + std::to_string(w.rows) + ", " +
                        std::to_string(w.cols) + "] does not match the config's [" +
                        std::to_string(rows) + ", " + std::to_string(cols) + "]");
    w.rows = rows;
    w.cols = cols;
    return w;
  }
  static weight_ref need(const tensor_lookup& get, const std::string& name, std::int64_t rows,
                         std::int64_t cols) {
    auto w = get(name);
    if (!w) throw model_error(name + ": missing from the weights");
    return checked(std::move(*w), name, rows, cols);
  }

  weight_ref embed_, norm_, lm_head_;
  std::vector<llama_layer_weights> layers_;
};

enum class logits_mode : std::uint8_t { last, all };

struct generate_options {
  std::int64_t max_new_tokens = 32;
  std::vector<std::int64_t> eos_token_ids;  ///< a row stops after producing one of these
  cpu::sampling_options sampling;
};

/// The CPU forward of one model. Not thread-safe (the rope cache of "dynamic" is state).
class llama_cpu_forward {
 public:
  llama_cpu_forward(llama_dims d, llama_weights_source& w,
                    thread_pool& pool = default_thread_pool())
      : d_(std::move(d)), w_(w), pool_(pool), rope_([&] {
          auto r = d_.rope;
          r.dim = d_.head_dim;
          return r;
        }()) {}

  const llama_dims& dims() const noexcept { return d_; }

  cpu::kv_cache make_cache(std::int64_t batch, std::int64_t capacity) const {
    return cpu::kv_cache(d_.num_layers, batch, d_.num_kv_heads, d_.head_dim, capacity);
  }

  /// Runs `ids` ([batch, seq] row-major, seq = ids.size() / batch) at positions
  /// cache.length() ... and returns logits [batch, vocab] (last) or [batch, seq, vocab] (all).
  std::vector<float> forward(std::span<const std::int64_t> ids, std::int64_t batch,
                             cpu::kv_cache& cache, logits_mode mode = logits_mode::last) {
    if (batch <= 0 || ids.empty() || ids.size() % static_cast<std::size_t>(batch) != 0)
      throw invalid_size("llama forward: " + std::to_string(ids.size()) + " ids do not form " +
                         std::to_string(batch) + " equal rows");
    if (cache.batch() != batch)
      throw invalid_size("llama forward: cache batch " + std::to_string(cache.batch()) +
                         " != " + std::to_string(batch));
    const std::int64_t seq = static_cast<std::int64_t>(ids.size()) / batch;
    const std::int64_t rows = batch * seq, hid = d_.hidden_size;
    const std::int64_t past = cache.length();
    rope_.update(past + seq);

    std::vector<float> x(static_cast<std::size_t>(rows * hid));
    cpu::embedding(w_.embed_tokens(), ids, x);

    // cos/sin of every new position (shared by all rows and layers).
    const auto half = static_cast<std::size_t>(d_.head_dim / 2);
    std::vector<float> cosv(static_cast<std::size_t>(seq) * half), sinv(cosv.size());
    for (std::int64_t t = 0; t < seq; ++t)
      rope_.angles(past + t, cosv.data() + static_cast<std::size_t>(t) * half,
                   sinv.data() + static_cast<std::size_t>(t) * half);

    std::vector<float> h(x.size()),
        attn(static_cast<std::size_t>(rows * d_.num_heads * d_.head_dim)), tmp(x.size());
    const cpu::attention_shape as{batch,           seq,         d_.num_heads,
                                  d_.num_kv_heads, d_.head_dim, d_.sliding_window};
    for (std::int64_t li = 0; li < d_.num_layers; ++li) {
      const llama_layer_weights l = w_.layer(li);
      cpu::rms_norm(x, cpu::to_f32(l.input_layernorm), d_.rms_norm_eps, h);
      auto q = cpu::linear(h, rows, l.q_proj, bias(l.q_bias), pool_);
      auto k = cpu::linear(h, rows, l.k_proj, bias(l.k_bias), pool_);
      const auto v = cpu::linear(h, rows, l.v_proj, bias(l.v_bias), pool_);
      for (std::int64_t r = 0; r < rows; ++r) {
        const auto t = static_cast<std::size_t>(r % seq);
        rope_.apply(q.data() + static_cast<std::size_t>(r * d_.num_heads * d_.head_dim),
                    d_.num_heads, cosv.data() + t * half, sinv.data() + t * half);
        rope_.apply(k.data() + static_cast<std::size_t>(r * d_.num_kv_heads * d_.head_dim),
                    d_.num_kv_heads, cosv.data() + t * half, sinv.data() + t * half);
      }
      cpu::attention(q, k, v, cache, li, as, attn, pool_);
      cpu::linear(attn, rows, l.o_proj, bias(l.o_bias), tmp, pool_);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
      cpu::rms_norm(x, cpu::to_f32(l.post_attention_layernorm), d_.rms_norm_eps, h);
      cpu::mlp_weights mw{l.gate_proj,       l.up_proj,       l.down_proj,
                          bias(l.gate_bias), bias(l.up_bias), bias(l.down_bias)};
      cpu::gated_mlp(h, rows, mw, tmp, pool_);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
      w_.release_layer(li);
    }
    cache.advance(seq);

    // Final norm and lm_head only on the rows whose logits are wanted.
    std::vector<float> sel;
    std::int64_t out_rows = rows;
    if (mode == logits_mode::last) {
      out_rows = batch;
      sel.resize(static_cast<std::size_t>(batch * hid));
      for (std::int64_t b = 0; b < batch; ++b)
        std::copy_n(x.data() + static_cast<std::size_t>(((b + 1) * seq - 1) * hid), hid,
                    sel.data() + static_cast<std::size_t>(b * hid));
    } else {
      sel = std::move(x);
    }
    cpu::rms_norm(sel, cpu::to_f32(w_.final_norm()), d_.rms_norm_eps, sel);
    return cpu::linear(sel, out_rows, w_.lm_head(), {}, pool_);
  }

  /// Greedy or sampled generation for `batch` equal-length prompts ([batch, seq] row-major).
  /// Returns the new tokens of each row; a row ends with its EOS token when it produced one,
  /// and the loop stops when every row has, or after max_new_tokens.
  std::vector<std::vector<std::int64_t>> generate(std::span<const std::int64_t> prompt,
                                                  std::int64_t batch, const generate_options& o) {
    if (o.max_new_tokens < 0) throw invalid_config("generate: max_new_tokens must be >= 0");
    if (batch <= 0 || prompt.empty() || prompt.size() % static_cast<std::size_t>(batch) != 0)
      throw invalid_size("generate: prompt does not form " + std::to_string(batch) + " equal rows");
    const auto seq = static_cast<std::int64_t>(prompt.size()) / batch;
    auto cache = make_cache(batch, seq + std::max<std::int64_t>(o.max_new_tokens, 1));
    std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(batch));
    std::vector<bool> done(static_cast<std::size_t>(batch), false);
    std::vector<cpu::sampler> samplers;
    for (std::int64_t b = 0; b < batch; ++b) {
      auto so = o.sampling;
      so.seed += static_cast<std::uint64_t>(b);
      samplers.emplace_back(so);
    }
    if (o.max_new_tokens == 0) return out;
    auto logits = forward(prompt, batch, cache, logits_mode::last);
    const auto V = static_cast<std::size_t>(d_.vocab_size);
    std::vector<std::int64_t> next(static_cast<std::size_t>(batch));
    for (std::int64_t step = 0; step < o.max_new_tokens; ++step) {
      bool all_done = true;
      for (std::size_t b = 0; b < next.size(); ++b) {
        // A finished row keeps feeding its EOS token (its outputs are discarded).
        if (done[b]) continue;
        next[b] = samplers[b].next(std::span<const float>(logits.data() + b * V, V));
        out[b].push_back(next[b]);
        if (std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), next[b]) !=
            o.eos_token_ids.end())
          done[b] = true;
        all_done = all_done && done[b];
      }
      if (all_done || step + 1 == o.max_new_tokens) break;
      logits = forward(next, batch, cache, logits_mode::last);
    }
    return out;
  }

 private:
  static std::vector<float> bias(const weight_ref& w) {
    return w.empty() ? std::vector<float>{} : cpu::to_f32(w);
  }

  llama_dims d_;
  llama_weights_source& w_;
  thread_pool& pool_;
  cpu::rotary_embedding rope_;
};

}  // namespace stowage::exec
