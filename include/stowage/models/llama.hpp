// stowage/models/llama.hpp: the Llama family's structure (Llama 1/2/3.x, Mistral, Qwen2) as
// typed module containers. Members are declared in the order Transformers' modeling_llama.py /
// modeling_mistral.py / modeling_qwen2.py register them, so walking the struct gives exactly
// the torch state-dict keys, shapes and order:
//   model.embed_tokens.weight
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight (+ .bias where the family has one)
//   model.layers.N.mlp.{gate,up,down}_proj.weight
//   model.layers.N.{input,post_attention}_layernorm.weight
//   model.norm.weight, model.rotary_emb.{inv_freq,original_inv_freq} (non-persistent, float32)
//   lm_head.weight (tied to model.embed_tokens.weight when tie_word_embeddings)
// One C++ type serves the three families; class names ("MistralDecoderLayer") come from the
// config's model_type at run time, the static class name is the Llama one.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/models/llama_config.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/leaf_modules.hpp>
#include <stowage/module/module_list.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/traverse.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/floating.hpp>

#include <boost/hana/define_struct.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace stowage::models {

namespace detail {
/// Transformers' class names per family, in one table so no name is built at run time.
struct family_class_names {
  std::string_view causal_lm, model, decoder_layer, attention, mlp, rms_norm, rotary;
};
inline constexpr std::array<family_class_names, 3> family_names{{
    {"LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP",
     "LlamaRMSNorm", "LlamaRotaryEmbedding"},
    {"MistralForCausalLM", "MistralModel", "MistralDecoderLayer", "MistralAttention", "MistralMLP",
     "MistralRMSNorm", "MistralRotaryEmbedding"},
    {"Qwen2ForCausalLM", "Qwen2Model", "Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP",
     "Qwen2RMSNorm", "Qwen2RotaryEmbedding"},
}};
constexpr const family_class_names& names_of(llama_family f) noexcept {
  return family_names[static_cast<std::size_t>(f)];
}
}  // namespace detail

/// RMSNorm with the family's class name (LlamaRMSNorm): weight [hidden_size].
struct llama_rms_norm {
  static constexpr std::string_view class_name = "LlamaRMSNorm";
  BOOST_HANA_DEFINE_STRUCT(llama_rms_norm, (parameter, weight));
  double eps = 1e-6;
  llama_family family = llama_family::llama;

  llama_rms_norm() = default;
  llama_rms_norm(std::int64_t dim, dtype d, double epsilon, llama_family f)
      : weight({dim}, d), eps(epsilon), family(f) {}
  std::string_view runtime_class_name() const noexcept { return detail::names_of(family).rms_norm; }
};

/// The rotary embedding: its inverse frequencies are two non-persistent float32 buffers of
/// ceil(head_dim / 2) elements (inv_freq and the unscaled copy original_inv_freq), computed at
/// construction in Transformers and never part of a checkpoint.
struct llama_rotary_embedding {
  static constexpr std::string_view class_name = "LlamaRotaryEmbedding";
  BOOST_HANA_DEFINE_STRUCT(llama_rotary_embedding, (buffer, inv_freq), (buffer, original_inv_freq));
  llama_family family = llama_family::llama;

  llama_rotary_embedding() = default;
  explicit llama_rotary_embedding(const llama_config& c)
      : inv_freq({(c.head_dim + 1) / 2}, dtype::float32, false),
        original_inv_freq({(c.head_dim + 1) / 2}, dtype::float32, false),
        family(c.family) {}
  std::string_view runtime_class_name() const noexcept { return detail::names_of(family).rotary; }
};

/// Self-attention projections. Bias: Llama follows attention_bias on all four; Mistral has
/// none; Qwen2 has q/k/v bias and no o_proj bias.
template <precision_policy Precision>
struct basic_llama_attention {
  static constexpr std::string_view class_name = "LlamaAttention";
  BOOST_HANA_DEFINE_STRUCT(basic_llama_attention, (linear<Precision>, q_proj),
                           (linear<Precision>, k_proj), (linear<Precision>, v_proj),
                           (linear<Precision>, o_proj));
  llama_family family = llama_family::llama;

  basic_llama_attention() = default;
  explicit basic_llama_attention(const llama_config& c) : family(c.family) {
    const bool qkv_bias =
        c.family == llama_family::qwen2 || (c.family == llama_family::llama && c.attention_bias);
    const bool o_bias = c.family == llama_family::llama && c.attention_bias;
    const std::int64_t q = c.num_attention_heads * c.head_dim;
    const std::int64_t kv = c.num_key_value_heads * c.head_dim;
    q_proj = linear<Precision>(c.hidden_size, q, qkv_bias);
    k_proj = linear<Precision>(c.hidden_size, kv, qkv_bias);
    v_proj = linear<Precision>(c.hidden_size, kv, qkv_bias);
    o_proj = linear<Precision>(q, c.hidden_size, o_bias);
  }
  std::string_view runtime_class_name() const noexcept {
    return detail::names_of(family).attention;
  }
};

/// The gated MLP: down(act(gate(x)) * up(x)). Only Llama has an mlp_bias option.
template <precision_policy Precision>
struct basic_llama_mlp {
  static constexpr std::string_view class_name = "LlamaMLP";
  BOOST_HANA_DEFINE_STRUCT(basic_llama_mlp, (linear<Precision>, gate_proj),
                           (linear<Precision>, up_proj), (linear<Precision>, down_proj),
                           (activation, act_fn));
  llama_family family = llama_family::llama;

  basic_llama_mlp() = default;
  explicit basic_llama_mlp(const llama_config& c) : act_fn(c.hidden_act), family(c.family) {
    const bool bias = c.family == llama_family::llama && c.mlp_bias;
    gate_proj = linear<Precision>(c.hidden_size, c.intermediate_size, bias);
    up_proj = linear<Precision>(c.hidden_size, c.intermediate_size, bias);
    down_proj = linear<Precision>(c.intermediate_size, c.hidden_size, bias);
  }
  std::string_view runtime_class_name() const noexcept { return detail::names_of(family).mlp; }
};

/// One transformer block; the unit placement never splits (Transformers' _no_split_modules).
template <precision_policy Precision>
struct basic_llama_decoder_layer {
  static constexpr std::string_view class_name = "LlamaDecoderLayer";
  BOOST_HANA_DEFINE_STRUCT(basic_llama_decoder_layer, (basic_llama_attention<Precision>, self_attn),
                           (basic_llama_mlp<Precision>, mlp), (llama_rms_norm, input_layernorm),
                           (llama_rms_norm, post_attention_layernorm));
  llama_family family = llama_family::llama;

  basic_llama_decoder_layer() = default;
  explicit basic_llama_decoder_layer(const llama_config& c)
      : self_attn(c),
        mlp(c),
        input_layernorm(c.hidden_size, Precision::compute_dtype, c.rms_norm_eps, c.family),
        post_attention_layernorm(c.hidden_size, Precision::compute_dtype, c.rms_norm_eps, c.family),
        family(c.family) {}
  std::string_view runtime_class_name() const noexcept {
    return detail::names_of(family).decoder_layer;
  }
};

/// The decoder stack without its head (LlamaModel).
template <precision_policy Precision>
struct basic_llama_model {
  static constexpr std::string_view class_name = "LlamaModel";
  BOOST_HANA_DEFINE_STRUCT(basic_llama_model, (embedding, embed_tokens),
                           (module_list<basic_llama_decoder_layer<Precision>>, layers),
                           (llama_rms_norm, norm), (llama_rotary_embedding, rotary_emb));
  llama_family family = llama_family::llama;

  basic_llama_model() = default;
  explicit basic_llama_model(const llama_config& c)
      : embed_tokens(c.vocab_size, c.hidden_size, Precision::compute_dtype),
        layers(static_cast<std::size_t>(c.num_hidden_layers),
               [&](std::size_t) { return basic_llama_decoder_layer<Precision>(c); }),
        norm(c.hidden_size, Precision::compute_dtype, c.rms_norm_eps, c.family),
        rotary_emb(c),
        family(c.family) {}
  std::string_view runtime_class_name() const noexcept { return detail::names_of(family).model; }
};

/// The causal language model: the decoder stack and lm_head. lm_head is never quantized
/// (bitsandbytes leaves it alone), so it uses the policy's compute precision.
template <precision_policy Precision>
struct llama_for_causal_lm {
  using precision_type = Precision;
  using config_type = llama_config;
  static constexpr std::string_view class_name = "LlamaForCausalLM";
  BOOST_HANA_DEFINE_STRUCT(llama_for_causal_lm, (basic_llama_model<Precision>, model),
                           (linear<precision::compute_t<Precision>>, lm_head));
  llama_config config;

  llama_for_causal_lm() = default;
  explicit llama_for_causal_lm(const llama_config& c)
      : model(c), lm_head(c.hidden_size, c.vocab_size, false), config(c) {}

  std::string_view runtime_class_name() const noexcept {
    return detail::names_of(config.family).causal_lm;
  }
  /// Transformers' _tied_weights_keys, active when tie_word_embeddings is set.
  std::span<const tied_weight> tied_weights() const noexcept {
    static constexpr tied_weight ties[] = {{"lm_head.weight", "model.embed_tokens.weight"}};
    return config.tie_word_embeddings ? std::span<const tied_weight>(ties)
                                      : std::span<const tied_weight>();
  }
  /// Transformers' _no_split_modules for this family (["LlamaDecoderLayer"]).
  std::span<const std::string_view> no_split_modules() const noexcept {
    return {&detail::names_of(config.family).decoder_layer, 1};
  }
};

/// The module types by their usual names. A block's class name does not depend on precision,
/// so `no_split<llama_decoder_layer>` names it for every llama_for_causal_lm<P>.
using llama_decoder_layer = basic_llama_decoder_layer<precision::bf16>;
using llama_attention = basic_llama_attention<precision::bf16>;
using llama_mlp = basic_llama_mlp<precision::bf16>;
using llama_model = basic_llama_model<precision::bf16>;

}  // namespace stowage::models
