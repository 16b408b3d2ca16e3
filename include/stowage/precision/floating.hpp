// stowage/precision/floating.hpp: the plain floating-point precisions (fp32, fp16, bf16): a
// weight is stored in the same type it is computed in, so storage_dtype == compute_dtype.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/precision/concepts.hpp>

#include <string_view>

namespace stowage::precision {

namespace detail {
constexpr std::string_view floating_name(dtype d) noexcept {
  switch (d) {
    case dtype::float32:
      return "fp32";
    case dtype::float16:
      return "fp16";
    case dtype::bfloat16:
      return "bf16";
    default:
      return "";
  }
}
}  // namespace detail

/// Weights stored and computed in the floating dtype D (float32, float16 or bfloat16).
template <dtype D>
  requires(D == dtype::float32 || D == dtype::float16 || D == dtype::bfloat16)
struct floating {
  static constexpr dtype storage_dtype = D;
  static constexpr dtype compute_dtype = D;
  static constexpr std::string_view name = detail::floating_name(D);
  static constexpr bool quantized = false;
};

using fp32 = floating<dtype::float32>;
using fp16 = floating<dtype::float16>;
using bf16 = floating<dtype::bfloat16>;

/// The unquantized precision a policy computes in: `compute_t<nf4<bf16...>>` is bf16. Modules
/// a quantizer leaves alone (lm_head, embeddings) use it.
template <precision_policy P>
using compute_t = floating<P::compute_dtype>;

}  // namespace stowage::precision

static_assert(stowage::precision_policy<stowage::precision::fp32>);
static_assert(stowage::precision_policy<stowage::precision::fp16>);
static_assert(stowage::precision_policy<stowage::precision::bf16>);
