// stowage/placement/quantized_sizes.hpp: how many bytes a bitsandbytes-quantized weight takes,
// for the planner. Exact: the bytes quantize-on-load (dispatch/load.hpp) stores for it, i.e.
// the packed weight plus its QuantState tensors (absmax, quant_map, nested_absmax,
// nested_quant_map, the quant_state JSON) for 4-bit, or the int8 weight plus SCB and the
// weight_format byte for LLM.int8. Or Transformers' estimate (HfQuantizer.quantized_element_size:
// 0.5 or 1 byte per element, state tensors ignored), to reproduce its device maps.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/precision/bnb_config.hpp>
#include <stowage/precision/quant_state.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace stowage {

/// How the planner counts a quantized weight.
enum class quantized_size_estimate : std::uint8_t {
  /// What quantize-on-load stores (the packed weight and every state tensor).
  exact,
  /// Transformers v5's compute_module_sizes(model, hf_quantizer): numel x 0.5 (4-bit, a Python
  /// float) or numel x 1 (8-bit); absmax, quant maps, nested statistics, the QuantState JSON and
  /// SCB are not counted.
  transformers,
};

/// The longest Python repr of a non-negative float32 widened to double (17 significant digits
/// plus "0.000" or "." and "e-XX"): the room the planner keeps for `nested_offset` in the
/// QuantState JSON, whose digits depend on the weights (the offset is the mean absmax).
inline constexpr std::uint64_t max_nested_offset_chars = 22;

/// Bytes of the QuantState JSON of a 4-bit weight of this shape (formats-spec §1.8). With
/// double quantization the offset's digits are unknown before the weights are read: they are
/// counted as max_nested_offset_chars (the JSON is then at most 19 bytes longer than stored).
inline std::uint64_t quant_state_json_bytes(precision::quant_type type, std::size_t blocksize,
                                            dtype original, const shape& dims, bool nested) {
  precision::quant_state_4bit q;
  q.type = type;
  q.blocksize = blocksize;
  q.original_dtype = original;
  q.shape.assign(dims.begin(), dims.end());
  q.nested = nested;
  q.offset = 0.0f;  // written "0.0"
  const std::uint64_t n = precision::quant_state_json(q).size();
  return nested ? n - 3 + max_nested_offset_chars : n;
}

/// Exact bytes quantize-on-load stores for a 2-D Linear weight `w` quantized by `c` from
/// `quant_input` (the float dtype the weight is converted to first; it is the JSON's `dtype`).
inline std::uint64_t quantized_weight_bytes(const tensor_entry& w, const precision::bnb_config& c,
                                            dtype quant_input) {
  const auto numel = static_cast<std::uint64_t>(w.shape.numel());
  if (c.load_in_4bit) {
    const auto s = precision::quantized_size_4bit(numel, c.blocksize, c.bnb_4bit_use_double_quant);
    // The float32 offset lives in the JSON, not in a tensor of its own.
    return s.packed + s.absmax + s.quant_map + s.nested_absmax + s.nested_quant_map +
           quant_state_json_bytes(c.bnb_4bit_quant_type, c.blocksize, quant_input, w.shape,
                                  c.bnb_4bit_use_double_quant);
  }
  const auto rows = static_cast<std::uint64_t>(w.shape.rank() > 0 ? w.shape[0] : 1);
  return precision::quantized_size_int8(rows, numel / (rows ? rows : 1), true).total();
}

/// Per quantized weight, the size the planner gives it: every `<m>.weight` of a module
/// precision::modules_to_quantize(tree, c, output_embeddings) selects (2-D and floating point,
/// not named by `special` — a special dtype keeps a tensor unquantized), quantized from
/// `dtype` when set, else from its own dtype (as dispatch/load.hpp does).
inline tensor_size_overrides quantized_tensor_sizes(
    const module_tree& tree, const precision::bnb_config& c, std::optional<dtype> target = {},
    const special_dtypes& special = {},
    quantized_size_estimate estimate = quantized_size_estimate::exact,
    std::string_view output_embeddings = "lm_head") {
  c.validate();
  tensor_size_overrides out;
  for (const auto& m : precision::modules_to_quantize(tree, c, output_embeddings)) {
    std::string w = join_name(m, "weight");
    const auto t = tree.find_tensor(w);
    if (!t || t->is_buffer) continue;
    bool is_special = false;
    for (const auto& sd : special) is_special = is_special || sd.first == w;
    if (is_special) continue;
    const tensor_entry& e = tree.node(t->module).parameters[t->index];
    if (e.shape.rank() != 2 || !is_floating_point(e.dtype)) continue;
    const auto numel = e.shape.numel();
    byte_size b;
    if (estimate == quantized_size_estimate::transformers)
      b = c.load_in_4bit ? byte_size::from_eighths(numel * 4, true) : byte_size(numel);
    else
      b = byte_size(static_cast<std::int64_t>(
          quantized_weight_bytes(e, c, target && is_floating_point(*target) ? *target : e.dtype)));
    out.emplace_back(std::move(w), b);
  }
  return out;
}

}  // namespace stowage
