// stowage/dispatch/quantized_weights.hpp: reading bitsandbytes-quantized weights out of a
// weight_store. A quantized Linear weight is stored as bitsandbytes' state dict has it (what
// load_checkpoint_in_model produces for quantize-on-load and for already-quantized
// checkpoints): 4-bit: `<w>` packed uint8 [ceil(n/2), 1] + `<w>.absmax`, `<w>.quant_map`
// (+ `<w>.nested_absmax`, `<w>.nested_quant_map`) + `<w>.quant_state.bitsandbytes__nf4|fp4`
// (the QuantState JSON); LLM.int8: `<m>.weight` int8 [out, in] + `<m>.SCB` (+ weight_format).
// quantized_weight finds those pieces, checks them against each other and dequantizes row
// ranges to float32 bit-identically to bitsandbytes (formats-spec §1.5, §2.1) straight from the
// storage (host memory or a mapped offload file; nothing is copied but the nested scales, which
// must be decoded once), and hands the execution engine an exec::cpu::weight_ref whose
// row_decoder does the same and whose fused_matmul multiplies straight from the packed bytes.
// bnb_config_for<P>() maps a precision policy to the bitsandbytes config that quantizes like it.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/exec/cpu/weight_ref.hpp>
#include <stowage/precision/bnb_config.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/int8.hpp>
#include <stowage/precision/kernels_cpu.hpp>
#include <stowage/precision/nf4.hpp>
#include <stowage/precision/quant_state.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace stowage {

/// How a stored weight is laid out.
enum class quantized_layout : std::uint8_t { none, bnb_4bit, bnb_int8 };

/// What a 4-bit QuantState JSON (`<w>.quant_state.bitsandbytes__<type>`) says.
struct quant_state_header {
  precision::quant_type type = precision::quant_type::nf4;
  std::size_t blocksize = 64;
  dtype original_dtype = dtype::float32;
  std::vector<std::int64_t> shape;
  bool nested = false;
  float offset = 0.0f;
  std::uint64_t numel() const noexcept {
    std::uint64_t n = 1;
    for (auto d : shape) n *= static_cast<std::uint64_t>(d);
    return n;
  }
  std::size_t blocks() const noexcept {
    return static_cast<std::size_t>(precision::blocks_4bit(numel(), blocksize));
  }
};

/// The bitsandbytes config that quantizes as precision policy P does (nf4/fp4<Compute,
/// DoubleQuant, BlockSize> or int8<Compute>); static_assert for a floating policy.
template <precision_policy P>
precision::bnb_config bnb_config_for() {
  static_assert(stowage::is_quantized_v<P>,
                "bnb_config_for<P>: P must be a quantized precision (nf4, fp4 or int8)");
  precision::bnb_config c;
  if constexpr (precision::quantized_4bit_policy<P>) {
    c.load_in_4bit = true;
    c.bnb_4bit_quant_type = P::type;
    c.bnb_4bit_use_double_quant = P::double_quant;
    c.blocksize = P::block_size;
    c.bnb_4bit_compute_dtype = P::compute_dtype;
  } else {
    c.load_in_8bit = true;
  }
  return c;
}

namespace detail {

/// Parses a QuantState JSON as QuantState.from_dict does (formats-spec §1.8); `key` names the
/// tensor in messages. Throws checkpoint_error.
inline quant_state_header parse_quant_state_json(const std::string& file, const std::string& key,
                                                 std::span<const std::byte> bytes) {
  auto fail = [&](const std::string& what) -> void {
    throw checkpoint_error(file, key, std::nullopt, "bitsandbytes QuantState JSON: " + what);
  };
  const auto* b = reinterpret_cast<const char*>(bytes.data());
  const nlohmann::json j = nlohmann::json::parse(b, b + bytes.size(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("not a JSON object");
  quant_state_header h;
  const auto qt = j.find("quant_type");
  if (qt == j.end() || !qt->is_string() || (*qt != "nf4" && *qt != "fp4"))
    fail("quant_type must be \"nf4\" or \"fp4\"");
  h.type = *qt == "nf4" ? precision::quant_type::nf4 : precision::quant_type::fp4;
  if (!key.ends_with(std::string(precision::name(h.type))))
    fail("quant_type does not match the key's suffix");
  const auto bs = j.find("blocksize");
  if (bs == j.end() || !bs->is_number_unsigned()) fail("blocksize missing or not an integer");
  h.blocksize = bs->get<std::size_t>();
  if (!precision::is_valid_4bit_blocksize(h.blocksize))
    fail("unsupported blocksize " + std::to_string(h.blocksize));
  const auto dt = j.find("dtype");
  if (dt == j.end() || !dt->is_string() ||
      (*dt != "float32" && *dt != "float16" && *dt != "bfloat16"))
    fail("dtype must be float32, float16 or bfloat16");
  h.original_dtype = dtype_from_name(dt->get<std::string>());
  const auto sh = j.find("shape");
  if (sh == j.end() || !sh->is_array()) fail("shape missing");
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned()) fail("shape holds a non-integer or negative entry");
    h.shape.push_back(d.get<std::int64_t>());
  }
  h.nested = j.contains("nested_offset") || j.contains("nested_blocksize");
  if (h.nested) {
    if (!j["nested_offset"].is_number()) fail("nested_offset missing or not a number");
    if (j.value("nested_blocksize", std::size_t{0}) != precision::nested_blocksize)
      fail("nested_blocksize must be 256");
    if (j.value("nested_dtype", std::string()) != "float32") fail("nested_dtype must be float32");
    h.offset = static_cast<float>(j["nested_offset"].get<double>());
  }
  return h;
}

/// The JSON key of a 4-bit weight in `has` (a predicate on names), "" when none.
template <class Has>
std::string quant_state_key(const std::string& weight, Has&& has) {
  for (auto t : {precision::quant_type::nf4, precision::quant_type::fp4}) {
    std::string k = weight + ".quant_state.bitsandbytes__" + std::string(precision::name(t));
    if (has(k)) return k;
  }
  return {};
}

/// "<module>.SCB" for "<module>.weight" ("" for other names).
inline std::string scb_key(const std::string& weight) {
  return weight.ends_with(".weight") ? weight.substr(0, weight.size() - 6) + "SCB" : std::string();
}

}  // namespace detail

/// A quantized weight in a weight_store, ready to dequantize. Holds pointers into the store's
/// storage: valid while the store lives (and does not move its storages, which it never does).
class quantized_weight {
 public:
  /// The weight stored under `name`; model_error when it is not quantized, when a state tensor
  /// is missing or inconsistent, or when it lives in GPU memory (copy it to the host first).
  static quantized_weight from_store(const weight_store& s, std::string_view name) {
    const std::string w(name);
    const auto& packed = s.at(w);
    auto host = [&](const storage::tensor_storage& st) {
      if (!st.host_accessible())
        throw model_error("quantized_weight: `" + st.desc().name +
                          "` is not host-accessible (GPU memory); copy it to the host first");
      return st.bytes();
    };
    auto fail = [&](const std::string& key, const std::string& what) -> void {
      throw model_error("quantized_weight: `" + key + "`: " + what);
    };
    quantized_weight q;
    q.name_ = w;
    const std::string js =
        detail::quant_state_key(w, [&](const std::string& k) { return s.contains(k); });
    if (!js.empty()) {
      q.layout_ = quantized_layout::bnb_4bit;
      q.state_ = detail::parse_quant_state_json("", js, host(s.at(js)));
      const auto& h = q.state_;
      if (h.shape.size() != 2) fail(js, "a Linear weight's shape must be 2-D");
      q.rows_ = h.shape[0];
      q.cols_ = h.shape[1];
      const auto pb = host(packed);
      if (pb.size() != (h.numel() + 1) / 2)
        fail(w, "packed weight holds " + std::to_string(pb.size()) + " bytes, the shape needs " +
                    std::to_string((h.numel() + 1) / 2));
      q.packed_ = reinterpret_cast<const std::uint8_t*>(pb.data());
      const std::size_t nb = h.blocks();
      auto need = [&](const std::string& suffix, dtype t, std::size_t count) {
        const auto* st = s.find(w + "." + suffix);
        if (!st) fail(w + "." + suffix, "missing");
        if (st->desc().dtype != t || st->desc().numel() != static_cast<std::int64_t>(count))
          fail(w + "." + suffix,
               "expected " + std::string(stowage::name(t)) + " [" + std::to_string(count) + "]");
        return host(*st);
      };
      const auto qm = need("quant_map", dtype::float32, 16);
      const auto& table = precision::serialized_quant_map(h.type);
      for (std::size_t i = 0; i < 16; ++i) {
        float v;
        std::memcpy(&v, qm.data() + 4 * i, 4);
        if (!(v == table[i]))
          fail(w + ".quant_map", "not bitsandbytes' table (custom maps are not supported)");
      }
      if (!h.nested) {
        const auto am = need("absmax", dtype::float32, nb);
        if (reinterpret_cast<std::uintptr_t>(am.data()) % alignof(float) == 0) {
          q.absmax_ = reinterpret_cast<const float*>(am.data());
        } else {
          q.owned_absmax_.resize(nb);
          std::memcpy(q.owned_absmax_.data(), am.data(), nb * 4);
          q.absmax_ = q.owned_absmax_.data();
        }
      } else {
        const auto qa = need("absmax", dtype::uint8, nb);
        const std::size_t nn = (nb + precision::nested_blocksize - 1) / precision::nested_blocksize;
        const auto na = need("nested_absmax", dtype::float32, nn);
        const auto nm = need("nested_quant_map", dtype::float32, 256);
        std::vector<float> nested(nn), map(256);
        std::memcpy(nested.data(), na.data(), nn * 4);
        std::memcpy(map.data(), nm.data(), 256 * 4);
        q.owned_absmax_.resize(nb);
        precision::dequantize_nested_absmax(reinterpret_cast<const std::uint8_t*>(qa.data()), nb,
                                            nested.data(), map.data(), h.offset,
                                            q.owned_absmax_.data());
        q.absmax_ = q.owned_absmax_.data();
      }
      return q;
    }
    const std::string scb = detail::scb_key(w);
    if (!scb.empty() && s.contains(scb) && packed.desc().dtype == dtype::int8) {
      q.layout_ = quantized_layout::bnb_int8;
      if (packed.desc().shape.rank() != 2) fail(w, "an LLM.int8 weight must be 2-D");
      q.rows_ = packed.desc().shape[0];
      q.cols_ = packed.desc().shape[1];
      const auto& sd = s.at(scb);
      if (sd.desc().dtype != dtype::float32 || sd.desc().numel() != q.rows_)
        fail(scb, "expected float32 [" + std::to_string(q.rows_) + "]");
      const auto fmt = w.substr(0, w.size() - 6) + "weight_format";
      if (const auto* f = s.find(fmt)) {
        const auto fb = host(*f);
        if (f->desc().dtype != dtype::uint8 || fb.size() != 1 || fb[0] != std::byte{0})
          fail(fmt, "only the row format (uint8 0) is supported");
      }
      q.cb_ = reinterpret_cast<const std::int8_t*>(host(packed).data());
      const auto sb = host(sd);
      q.owned_absmax_.resize(static_cast<std::size_t>(q.rows_));
      std::memcpy(q.owned_absmax_.data(), sb.data(), sb.size());
      q.absmax_ = q.owned_absmax_.data();
      return q;
    }
    fail(w, "not a bitsandbytes-quantized weight (no QuantState JSON, no SCB)");
    return q;
  }

  quantized_layout layout() const noexcept { return layout_; }
  const std::string& name() const noexcept { return name_; }
  std::int64_t rows() const noexcept { return rows_; }  ///< out_features
  std::int64_t cols() const noexcept { return cols_; }  ///< in_features
  /// 4-bit only: what the QuantState JSON says.
  const quant_state_header& state() const noexcept { return state_; }
  /// The float32 scales used by dequantization: per block (4-bit, nested ones decoded) or
  /// per row (int8 SCB).
  std::span<const float> scales() const noexcept {
    const std::size_t n =
        layout_ == quantized_layout::bnb_4bit ? state_.blocks() : static_cast<std::size_t>(rows_);
    return {absmax_, n};
  }

  /// Rows [r0, r1) as float32 into `out` ((r1 - r0) * cols() values), bit-identical to
  /// bitsandbytes' dequantize_4bit(..., float32) / int8_vectorwise_dequant. Blocks may cross
  /// rows (in_features not a multiple of the block size): handled element-wise at the edges.
  void dequantize_rows(std::int64_t r0, std::int64_t r1, float* out) const {
    if (r0 < 0 || r1 < r0 || r1 > rows_)
      throw invalid_size("quantized_weight `" + name_ + "`: rows [" + std::to_string(r0) + ", " +
                         std::to_string(r1) + ") outside [0, " + std::to_string(rows_) + ")");
    const auto cols = static_cast<std::size_t>(cols_);
    if (layout_ == quantized_layout::bnb_int8) {
      precision::dequantize_int8_raw(cb_ + static_cast<std::size_t>(r0) * cols, absmax_ + r0,
                                     static_cast<std::size_t>(r1 - r0), cols, out);
      return;
    }
    const std::size_t bs = state_.blocksize;
    std::size_t i = static_cast<std::size_t>(r0) * cols;
    const std::size_t end = static_cast<std::size_t>(r1) * cols;
    const auto& code = precision::code_table(state_.type);
    float* o = out;
    // Up to the first block boundary element-wise (same product, f32(code * absmax)).
    for (; i < end && i % bs != 0; ++i) {
      const std::uint8_t byte = packed_[i / 2];
      *o++ = code[(i % 2) ? (byte & 15u) : (byte >> 4)] * absmax_[i / bs];
    }
    if (i < end) {
      precision::dequantize_4bit_raw(packed_ + i / 2, absmax_ + i / bs, end - i, state_.type, bs,
                                     dtype::float32, o);
    }
  }

  /// y[m, rows()] = x[m, cols()] * W^T without widening W: the precision engine's fused
  /// kernels (gemm_4bit: each nibble times its block's absmax, multiplied in; LLM.int8
  /// weight-only: sum(x * CB) scaled by SCB / 127 once per output). Equal to dequantize_rows
  /// then a float32 product up to the order of the sums.
  void matmul(const float* x, std::int64_t m, float* y) const {
    if (m < 0) throw invalid_size("quantized_weight `" + name_ + "`: negative batch");
    if (m == 0 || rows_ == 0) return;
    const auto M = static_cast<std::size_t>(m), N = static_cast<std::size_t>(rows_),
               K = static_cast<std::size_t>(cols_);
    if (layout_ == quantized_layout::bnb_int8)
      precision::gemm_int8_weight_only_raw(x, M, cb_, absmax_, N, K, y);
    else
      precision::gemm_4bit_raw(x, M, packed_, absmax_, state_.type, state_.blocksize, N, K, y);
  }

  /// A weight_ref the CPU kernels read through this object's row decoder (any batch) and fused
  /// product (small batches, exec::cpu::linear). Valid while this quantized_weight (and its
  /// store) lives; do not move this object while refs are in use.
  exec::cpu::weight_ref weight_ref() const {
    exec::cpu::weight_ref r;
    r.data = layout_ == quantized_layout::bnb_4bit ? reinterpret_cast<const std::byte*>(packed_)
                                                   : reinterpret_cast<const std::byte*>(cb_);
    r.type = layout_ == quantized_layout::bnb_4bit ? dtype::uint8 : dtype::int8;
    r.rows = rows_;
    r.cols = cols_;
    r.decode = &decode;
    r.decode_ctx = this;
    r.name = name_;
    r.matmul = &fused;
    return r;
  }

 private:
  static void decode(const void* ctx, std::int64_t r0, std::int64_t r1, float* out) {
    static_cast<const quantized_weight*>(ctx)->dequantize_rows(r0, r1, out);
  }
  static void fused(const void* ctx, const float* x, std::int64_t m, float* y) {
    static_cast<const quantized_weight*>(ctx)->matmul(x, m, y);
  }

  std::string name_;
  quantized_layout layout_ = quantized_layout::none;
  std::int64_t rows_ = 0, cols_ = 0;
  quant_state_header state_;
  const std::uint8_t* packed_ = nullptr;
  const std::int8_t* cb_ = nullptr;
  const float* absmax_ = nullptr;
  std::vector<float> owned_absmax_;
};

/// How the weight stored under `name` is laid out (none: a plain tensor or not stored).
inline quantized_layout quantized_layout_of(const weight_store& s, std::string_view name) {
  const std::string w(name);
  if (!s.contains(w)) return quantized_layout::none;
  if (!detail::quant_state_key(w, [&](const std::string& k) { return s.contains(k); }).empty())
    return quantized_layout::bnb_4bit;
  const std::string scb = detail::scb_key(w);
  if (!scb.empty() && s.contains(scb) && s.at(w).desc().dtype == dtype::int8)
    return quantized_layout::bnb_int8;
  return quantized_layout::none;
}

/// Dequantizes rows [row_begin, row_end) of the quantized weight `name` to float32 `out`.
inline void dequantize_into(const weight_store& s, std::string_view name, float* out,
                            std::int64_t row_begin, std::int64_t row_end) {
  quantized_weight::from_store(s, name).dequantize_rows(row_begin, row_end, out);
}

/// Dequantizes the whole weight (rows() * cols() floats).
inline void dequantize_into(const weight_store& s, std::string_view name, float* out) {
  const auto q = quantized_weight::from_store(s, name);
  q.dequantize_rows(0, q.rows(), out);
}

}  // namespace stowage
