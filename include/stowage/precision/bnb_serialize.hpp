// stowage/precision/bnb_serialize.hpp: reading bitsandbytes' serialised quantized weights back
// (the inverse of quant_state_tensors): a Linear4bit's `weight` + `weight.absmax`,
// `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
// `weight.quant_state.bitsandbytes__nf4|fp4` become a quantized_4bit (QuantState.from_dict /
// Params4bit.from_prequantized, formats-spec §1.8), and a Linear8bitLt's `weight` + `SCB`
// (+ `weight_format`) a quantized_int8 (§2.3). Also the int8 tensors as a checkpoint holds
// them. Every check that fails throws checkpoint_error naming the tensor.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/precision/int8.hpp>
#include <stowage/precision/nf4.hpp>
#include <stowage/precision/quant_state.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace stowage::precision {

/// A serialised tensor as a reader sees it (bytes are little-endian, C-contiguous).
struct state_tensor_view {
  dtype type = dtype::uint8;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;
};

/// Looks up `<weight name>.<suffix>` ("absmax", "quant_state.bitsandbytes__nf4", ...).
using state_tensor_lookup = std::function<std::optional<state_tensor_view>(std::string_view)>;

/// The key suffixes a 4-bit weight may carry (QuantState.from_dict's accepted set).
inline constexpr std::string_view quant_state_suffixes[] = {"absmax",
                                                            "quant_map",
                                                            "nested_absmax",
                                                            "nested_quant_map",
                                                            "quant_state.bitsandbytes__nf4",
                                                            "quant_state.bitsandbytes__fp4"};

namespace detail {

inline std::uint64_t numel_of(const std::vector<std::int64_t>& s) {
  std::uint64_t n = 1;
  for (auto d : s) n *= static_cast<std::uint64_t>(d);
  return n;
}

template <class T>
std::vector<T> copy_elements(const state_tensor_view& v) {
  std::vector<T> out(v.bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), v.bytes.data(), out.size() * sizeof(T));
  return out;
}

}  // namespace detail

/// Rebuilds a 4-bit quantized weight named `weight_name` from its packed `weight` tensor and
/// the state tensors `lookup` finds (QuantState.from_dict + Params4bit.from_prequantized).
/// Checks the JSON, dtypes, shapes and sizes against each other; the stored quant_map must be
/// bitsandbytes' table for the type (stowage dequantizes with its own copy); the nested
/// dynamic map is used as stored. With double quantization `state.absmax` is the dequantized
/// scales (two roundings, as dequantize_4bit computes them).
inline quantized_4bit quant_state_from_tensors(std::string_view weight_name,
                                               const state_tensor_view& weight,
                                               const state_tensor_lookup& lookup) {
  const std::string wn(weight_name);
  auto fail = [&](const std::string& suffix, const std::string& what) -> void {
    throw checkpoint_error("", suffix.empty() ? wn : wn + "." + suffix, std::nullopt,
                           "bitsandbytes 4-bit state: " + what);
  };
  std::optional<state_tensor_view> js;
  quant_type type = quant_type::nf4;
  for (auto t : {quant_type::nf4, quant_type::fp4}) {
    auto v = lookup("quant_state.bitsandbytes__" + std::string(name(t)));
    if (!v) continue;
    if (js) fail("quant_state", "both quant_state.bitsandbytes__nf4 and __fp4 are present");
    js = std::move(v);
    type = t;
  }
  const std::string js_suffix = "quant_state.bitsandbytes__" + std::string(name(type));
  if (!js) fail("quant_state.bitsandbytes__nf4", "missing (not a bitsandbytes 4-bit weight)");
  if (js->type != dtype::uint8 || js->shape.size() != 1)
    fail(js_suffix, "expected a 1-D uint8 tensor");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(reinterpret_cast<const char*>(js->bytes.data()),
                              reinterpret_cast<const char*>(js->bytes.data()) + js->bytes.size());
  } catch (const nlohmann::json::exception& e) {
    fail(js_suffix, std::string("invalid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(js_suffix, "JSON is not an object");
  static constexpr std::string_view allowed[] = {"quant_type",   "blocksize",        "dtype",
                                                 "shape",        "nested_blocksize", "nested_dtype",
                                                 "nested_offset"};
  for (const auto& [k, v] : j.items()) {
    bool ok = false;
    for (auto a : allowed) ok = ok || k == a;
    if (!ok) fail(js_suffix, "unexpected key `" + k + "`");
  }
  quantized_4bit q;
  auto& s = q.state;
  s.type = type;
  if (!j.contains("quant_type") || j["quant_type"] != std::string(name(type)))
    fail(js_suffix, "quant_type does not match the key's suffix");
  if (!j.contains("blocksize") || !j["blocksize"].is_number_unsigned())
    fail(js_suffix, "blocksize missing or not a positive integer");
  s.blocksize = j["blocksize"].get<std::size_t>();
  if (!is_valid_4bit_blocksize(s.blocksize) && s.blocksize != 32)
    fail(js_suffix, "unsupported blocksize " + std::to_string(s.blocksize));
  if (!j.contains("dtype") || !j["dtype"].is_string()) fail(js_suffix, "dtype missing");
  const std::string dt = j["dtype"].get<std::string>();
  if (dt != "float32" && dt != "float16" && dt != "bfloat16")
    fail(js_suffix, "dtype must be float32, float16 or bfloat16, got " + dt);
  s.original_dtype = dtype_from_name(dt);
  if (!j.contains("shape") || !j["shape"].is_array()) fail(js_suffix, "shape missing");
  for (const auto& d : j["shape"]) {
    if (!d.is_number_unsigned()) fail(js_suffix, "shape holds a non-integer or negative entry");
    s.shape.push_back(d.get<std::int64_t>());
  }
  const std::uint64_t n = detail::numel_of(s.shape);
  const std::size_t nb = s.blocks();
  // The packed weight: uint8 [ceil(n/2), 1] (other quant_storage dtypes are the same bytes).
  if (weight.bytes.size() != (n + 1) / 2)
    fail("", "packed weight holds " + std::to_string(weight.bytes.size()) + " bytes, the shape " +
                 j["shape"].dump() + " needs " + std::to_string((n + 1) / 2));
  q.packed.resize(weight.bytes.size());
  if (!q.packed.empty()) std::memcpy(q.packed.data(), weight.bytes.data(), q.packed.size());

  auto need = [&](const char* suffix, dtype t, std::uint64_t count) {
    auto v = lookup(suffix);
    if (!v) fail(suffix, "missing");
    if (v->type != t || v->shape.size() != 1 || detail::numel_of(v->shape) != count ||
        v->bytes.size() != count * element_size(t))
      fail(suffix, "expected " + std::string(name(t)) + " [" + std::to_string(count) + "]");
    return *v;
  };
  const auto qm = detail::copy_elements<float>(need("quant_map", dtype::float32, 16));
  const auto& table = serialized_quant_map(type);
  for (std::size_t i = 0; i < 16; ++i)
    if (!(qm[i] == table[i]))
      fail("quant_map", "entry " + std::to_string(i) + " is not bitsandbytes' " +
                            std::string(name(type)) + " table (custom maps are not supported)");
  s.nested = j.contains("nested_offset") || j.contains("nested_blocksize");
  if (!s.nested) {
    s.absmax = detail::copy_elements<float>(need("absmax", dtype::float32, nb));
    if (lookup("nested_absmax") || lookup("nested_quant_map"))
      fail("nested_absmax", "present but the JSON has no nested_* entries");
    return q;
  }
  if (!j["nested_offset"].is_number()) fail(js_suffix, "nested_offset missing or not a number");
  if (j.value("nested_blocksize", std::size_t{0}) != nested_blocksize)
    fail(js_suffix, "nested_blocksize must be 256");
  if (j.value("nested_dtype", std::string()) != "float32")
    fail(js_suffix, "nested_dtype must be float32");
  // Python writes offset.item(), the float32 as a double: converting back is exact.
  s.offset = static_cast<float>(j["nested_offset"].get<double>());
  s.qabsmax = detail::copy_elements<std::uint8_t>(need("absmax", dtype::uint8, nb));
  s.nested_absmax = detail::copy_elements<float>(
      need("nested_absmax", dtype::float32, (nb + nested_blocksize - 1) / nested_blocksize));
  const auto nqm = detail::copy_elements<float>(need("nested_quant_map", dtype::float32, 256));
  std::copy(nqm.begin(), nqm.end(), s.nested_quant_map.begin());
  s.absmax.assign(nb, 0.0f);
  dequantize_nested_absmax(s.qabsmax.data(), nb, s.nested_absmax.data(), s.nested_quant_map.data(),
                           s.offset, s.absmax.data());
  return q;
}

/// The tensors Linear8bitLt's state dict holds besides `weight` (int8 [rows, cols]):
/// `SCB` (float32 [rows]; key `<module>.SCB`) and `weight_format` (uint8 scalar 0 = row;
/// key `<module>.weight_format`), in that order. Transformers 5 writes both and reads SCB.
inline std::vector<state_tensor> int8_state_tensors(const quantized_int8& q) {
  std::vector<state_tensor> out;
  out.push_back({"SCB",
                 dtype::float32,
                 {static_cast<std::int64_t>(q.rows)},
                 detail::raw_bytes(q.scb.data(), q.scb.size())});
  out.push_back({"weight_format", dtype::uint8, {}, {static_cast<std::uint8_t>(q.format)}});
  return out;
}

/// Rebuilds an LLM.int8 weight from `<module>.weight` (int8 [rows, cols]), `<module>.SCB`
/// and, when present, `<module>.weight_format` (which must say "row": bitsandbytes no longer
/// reads the tiled formats either).
inline quantized_int8 int8_from_tensors(std::string_view module_name,
                                        const state_tensor_view& weight,
                                        const std::optional<state_tensor_view>& scb,
                                        const std::optional<state_tensor_view>& weight_format) {
  const std::string m(module_name);
  auto fail = [&](const char* key, const std::string& what) -> void {
    throw checkpoint_error("", m + "." + key, std::nullopt, "LLM.int8 weight: " + what);
  };
  if (weight.type != dtype::int8 || weight.shape.size() != 2)
    fail("weight", "expected a 2-D int8 tensor");
  quantized_int8 q;
  q.rows = static_cast<std::size_t>(weight.shape[0]);
  q.cols = static_cast<std::size_t>(weight.shape[1]);
  if (weight.bytes.size() != q.rows * q.cols) fail("weight", "byte count does not match its shape");
  if (!scb) fail("SCB", "missing");
  if (scb->type != dtype::float32 || scb->shape.size() != 1 || scb->shape[0] != weight.shape[0] ||
      scb->bytes.size() != q.rows * 4)
    fail("SCB", "expected float32 [" + std::to_string(q.rows) + "]");
  if (weight_format) {
    if (weight_format->type != dtype::uint8 || weight_format->bytes.size() != 1)
      fail("weight_format", "expected a uint8 scalar");
    if (std::to_integer<std::uint8_t>(weight_format->bytes[0]) != 0)
      fail("weight_format", "only the row format (0) is supported");
  }
  q.cb.resize(q.rows * q.cols);
  if (!q.cb.empty()) std::memcpy(q.cb.data(), weight.bytes.data(), q.cb.size());
  q.scb = detail::copy_elements<float>(*scb);
  return q;
}

}  // namespace stowage::precision
