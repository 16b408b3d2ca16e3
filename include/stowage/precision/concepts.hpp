// stowage/precision/concepts.hpp: the precision_policy concept, i.e. what a precision tag
// (precision::fp32, bf16, int8, nf4<...>) must tell the rest of stowage. A precision says how a
// weight is stored (storage_dtype) and which floating type it is turned back into for compute
// (compute_dtype). Module containers use it to describe their parameters; loaders use it to
// convert checkpoint tensors. Keep this small: quantized policies add their own members (block
// size, quant-state tensors) and the code that needs them checks for them with its own concept.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>

#include <concepts>
#include <string_view>
#include <type_traits>

namespace stowage {

/// A precision policy is an empty tag type with
///   - `static constexpr stowage::dtype storage_dtype`: the element type a weight is stored in
///     (bfloat16 for bf16, int8 for LLM.int8, uint8 for packed nf4);
///   - `static constexpr stowage::dtype compute_dtype`: the floating type it is used as
///     (and the type of the tensors the policy does not quantize: biases, norms, embeddings);
///   - `static constexpr std::string_view name`: a short name for messages and command lines
///     ("bf16", "int8", "nf4").
/// Quantized policies (another header) also set `static constexpr bool quantized = true`.
template <class P>
concept precision_policy = std::is_empty_v<P> && std::is_trivially_copyable_v<P> && requires {
  { P::storage_dtype } -> std::convertible_to<dtype>;
  { P::compute_dtype } -> std::convertible_to<dtype>;
  { P::name } -> std::convertible_to<std::string_view>;
} && is_floating_point(P::compute_dtype);

/// True for policies that store weights in another form than their compute type (int8, nf4).
/// Reads `P::quantized` when present; false otherwise.
template <precision_policy P>
inline constexpr bool is_quantized_v = [] {
  if constexpr (requires {
                  { P::quantized } -> std::convertible_to<bool>;
                })
    return static_cast<bool>(P::quantized);
  else
    return false;
}();

/// The storage dtype of a precision policy.
template <precision_policy P>
inline constexpr dtype storage_dtype_v = P::storage_dtype;

/// The compute dtype of a precision policy.
template <precision_policy P>
inline constexpr dtype compute_dtype_v = P::compute_dtype;

}  // namespace stowage
