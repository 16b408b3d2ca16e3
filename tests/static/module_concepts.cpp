// Compile-time checks for the typed-module concepts and traits: precision_policy, module_type,
// class names (static, specialised, run-time), meta vs bound parameters.
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/leaf_modules.hpp>
#include <stowage/module/module_list.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/floating.hpp>

#include <boost/hana/define_struct.hpp>

#include <cstddef>
#include <string_view>

namespace sw = stowage;
namespace p = sw::precision;

// Precision policies.
static_assert(sw::precision_policy<p::fp32> && sw::precision_policy<p::fp16> &&
              sw::precision_policy<p::bf16>);
static_assert(p::bf16::storage_dtype == sw::dtype::bfloat16 && p::bf16::name == "bf16");
static_assert(sw::storage_dtype_v<p::fp16> == sw::dtype::float16);
static_assert(!sw::is_quantized_v<p::fp32>);
static_assert(!sw::precision_policy<int>);
static_assert(!sw::precision_policy<float>);
struct int8_like {
  static constexpr sw::dtype storage_dtype = sw::dtype::int8;
  static constexpr sw::dtype compute_dtype = sw::dtype::float16;
  static constexpr std::string_view name = "int8";
  static constexpr bool quantized = true;
};
static_assert(sw::precision_policy<int8_like> && sw::is_quantized_v<int8_like>);
static_assert(std::is_same_v<p::compute_t<int8_like>, p::fp16>);
struct bad_compute {  // an integer compute type is not a precision
  static constexpr sw::dtype storage_dtype = sw::dtype::int8;
  static constexpr sw::dtype compute_dtype = sw::dtype::int32;
  static constexpr std::string_view name = "bad";
};
static_assert(!sw::precision_policy<bad_compute>);

// Modules and class names.
static_assert(sw::module_type<sw::linear<p::bf16>> && sw::module_type<sw::embedding> &&
              sw::module_type<sw::rms_norm> && sw::module_type<sw::layer_norm> &&
              sw::module_type<sw::activation>);
static_assert(!sw::module_type<sw::parameter> && !sw::module_type<int>);
static_assert(sw::module_class_name_v<sw::linear<p::fp16>> == "Linear");
static_assert(sw::module_class_name_v<sw::models::llama_decoder_layer> == "LlamaDecoderLayer");
static_assert(sw::module_class_name_v<sw::models::basic_llama_decoder_layer<p::fp32>> ==
              "LlamaDecoderLayer");
static_assert(sw::module_class_name_v<sw::models::llama_for_causal_lm<p::bf16>> ==
              "LlamaForCausalLM");
static_assert(sw::module_class_name_v<sw::models::llama_rms_norm> == "LlamaRMSNorm");
static_assert(sw::module_class_name_v<sw::models::llama_rotary_embedding> ==
              "LlamaRotaryEmbedding");
static_assert(sw::has_runtime_class_name<sw::models::llama_decoder_layer>);
static_assert(!sw::has_runtime_class_name<sw::linear<p::bf16>>);
static_assert(sw::is_module_list_v<sw::module_list<sw::embedding>> &&
              !sw::is_module_list_v<sw::embedding>);
static_assert(sw::has_tied_weights<sw::models::llama_for_causal_lm<p::bf16>>);
static_assert(!sw::has_tied_weights<sw::linear<p::bf16>>);

// A struct that is reflected but has no class name is not a module...
struct plain {
  BOOST_HANA_DEFINE_STRUCT(plain, (int, x));
};
static_assert(sw::reflected_struct<plain> && !sw::module_type<plain>);
// ...until the trait is specialised for it.
struct foreign_block {
  BOOST_HANA_DEFINE_STRUCT(foreign_block, (sw::parameter, w));
};
template <>
inline constexpr std::string_view sw::module_class_name_v<foreign_block> = "ForeignBlock";
static_assert(sw::module_type<foreign_block>);

// Meta vs bound: a parameter is always meta, a bound parameter never is; a parameter holds no
// pointer (its size is the shape plus the dtype).
static_assert(sw::parameter::is_meta() && !sw::bound_parameter<>::is_meta());
static_assert(sizeof(sw::parameter) <= sizeof(sw::shape) + 8);
static_assert(std::is_trivially_copyable_v<sw::parameter>);
constexpr sw::parameter meta_w({4, 8}, sw::dtype::bfloat16);
static_assert(meta_w.nbytes() == 64 && meta_w.shape()[1] == 8);

// init_empty needs a module constructible from its config.
template <class M, class C>
concept can_init_empty = requires(const C& c) {
  sw::init_empty<M>(c);
};
static_assert(can_init_empty<sw::models::llama_for_causal_lm<p::bf16>, sw::models::llama_config>);
static_assert(!can_init_empty<sw::models::llama_for_causal_lm<p::bf16>, int>);
static_assert(!can_init_empty<int, sw::models::llama_config>);
