// stowage/precision/nf4.hpp: the 4-bit precisions precision::nf4<Compute, DoubleQuant,
// BlockSize> and precision::fp4<...>, and the typed quantize/dequantize/double-quantize calls
// behind them. Byte layout, scales and nested statistics are bitsandbytes' (formats-spec §1),
// so a tensor quantized here can be written as a Transformers 4-bit checkpoint and back.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/dynamic_map.hpp>
#include <stowage/precision/floating.hpp>
#include <stowage/precision/kernels_cpu.hpp>
#include <stowage/precision/quant_state.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace stowage::precision {

/// A bitsandbytes 4-bit policy: weights stored as packed uint8 codes of `Type`, block scales
/// (double-quantized when DoubleQuant), dequantized to Compute's dtype for compute.
template <precision_policy Compute, quant_type Type, bool DoubleQuant, std::size_t BlockSize>
struct quant_4bit {
  static_assert(!is_quantized_v<Compute>,
                "precision::nf4/fp4<Compute, ...>: Compute must be fp32, fp16 or bf16");
  static_assert(is_valid_4bit_blocksize(BlockSize),
                "precision::nf4/fp4<..., BlockSize>: BlockSize must be 64, 128, 256, 512, 1024, "
                "2048 or 4096 (bitsandbytes' 4-bit block sizes)");
  static constexpr dtype storage_dtype = dtype::uint8;
  static constexpr dtype compute_dtype = Compute::compute_dtype;
  static constexpr std::string_view name = Type == quant_type::nf4 ? "nf4" : "fp4";
  static constexpr bool quantized = true;
  static constexpr quant_type type = Type;
  static constexpr bool double_quant = DoubleQuant;
  static constexpr std::size_t block_size = BlockSize;

  /// Exact bytes of a parameter of `numel` elements stored in this precision.
  static constexpr quantized_4bit_size size(std::uint64_t numel) noexcept {
    return quantized_size_4bit(numel, BlockSize, DoubleQuant);
  }
};

/// NF4 (transformers' `bnb_4bit_quant_type="nf4"`), default block size 64.
template <precision_policy Compute = bf16, bool DoubleQuant = false, std::size_t BlockSize = 64>
using nf4 = quant_4bit<Compute, quant_type::nf4, DoubleQuant, BlockSize>;
/// bitsandbytes' FP4 (E2M1, bias 2, scaled by 1/12).
template <precision_policy Compute = bf16, bool DoubleQuant = false, std::size_t BlockSize = 64>
using fp4 = quant_4bit<Compute, quant_type::fp4, DoubleQuant, BlockSize>;

/// A precision policy that is one of the 4-bit policies above.
template <class P>
concept quantized_4bit_policy = precision_policy<P> && requires {
  { P::type } -> std::convertible_to<quant_type>;
  { P::double_quant } -> std::convertible_to<bool>;
  { P::block_size } -> std::convertible_to<std::size_t>;
} && is_valid_4bit_blocksize(P::block_size);

/// A quantized 4-bit tensor: the packed bytes (`<prefix>weight`, shape [ceil(numel/2), 1]) and
/// its QuantState.
struct quantized_4bit {
  std::vector<std::uint8_t> packed;
  quant_state_4bit state;
};

/// Options of quantize_4bit.
struct quantize_4bit_options {
  quant_type type = quant_type::nf4;
  std::size_t blocksize = 64;
  bool double_quant = false;
  /// Nested offset to use instead of computing mean(absmax) (see absmax_mean: torch's float32
  /// mean is not reproducible bit for bit, so pass bitsandbytes' value when matching a file).
  std::optional<float> offset;
};

/// Double quantization of float32 block scales (bitsandbytes compress_statistics):
/// offset = mean(absmax), (qabsmax, nested_absmax) = quantize_blockwise(absmax - offset,
/// dynamic map, 256); state.absmax becomes the dequantized scales that dequantization uses.
inline void double_quantize(quant_state_4bit& s, std::optional<float> offset = std::nullopt) {
  const std::size_t nb = s.absmax.size();
  s.offset = offset ? *offset : absmax_mean(s.absmax.data(), nb);
  std::vector<float> centred(nb);
  for (std::size_t b = 0; b < nb; ++b) centred[b] = s.absmax[b] - s.offset;
  s.nested = true;
  s.nested_quant_map = dynamic_map();
  s.qabsmax.assign(nb, 0);
  s.nested_absmax.assign((nb + nested_blocksize - 1) / nested_blocksize, 0.0f);
  quantize_blockwise_8bit(centred, s.nested_quant_map, nested_blocksize, s.qabsmax,
                          s.nested_absmax);
  dequantize_nested_absmax(s.qabsmax.data(), nb, s.nested_absmax.data(), s.nested_quant_map.data(),
                           s.offset, s.absmax.data());
}

/// Quantizes a tensor of `shape` whose elements (dtype `in_type`: fp32/fp16/bf16) start at
/// `data`, as bitsandbytes.functional.quantize_4bit does (CUDA rules where its backends differ).
inline quantized_4bit quantize_4bit(const void* data, dtype in_type,
                                    std::span<const std::int64_t> shape,
                                    const quantize_4bit_options& opt = {}) {
  quantized_4bit q;
  q.state.type = opt.type;
  q.state.blocksize = opt.blocksize;
  q.state.original_dtype = in_type;
  q.state.shape.assign(shape.begin(), shape.end());
  for (auto d : shape)
    if (d < 0) throw invalid_config("quantize_4bit: negative dimension in shape");
  const auto n = static_cast<std::size_t>(q.state.numel());
  q.packed.assign((n + 1) / 2, 0);
  q.state.absmax.assign(static_cast<std::size_t>(blocks_4bit(n, opt.blocksize)), 0.0f);
  quantize_4bit_raw(data, in_type, n, opt.type, opt.blocksize, q.packed.data(),
                    q.state.absmax.data());
  if (opt.double_quant) double_quantize(q.state, opt.offset);
  return q;
}

/// quantize_4bit with the type, block size and double quantization of a policy.
template <quantized_4bit_policy P>
quantized_4bit quantize(std::span<const float> values, std::span<const std::int64_t> shape) {
  return quantize_4bit(
      values.data(), dtype::float32, shape,
      {.type = P::type, .blocksize = P::block_size, .double_quant = P::double_quant, .offset = {}});
}

/// Dequantizes into `out` (numel elements of `out_type`: fp32 as float, fp16/bf16 as uint16
/// bits), bit-identical to bitsandbytes' dequantize_4bit(..., dtype=out_type).
inline void dequantize_4bit(const quantized_4bit& q, dtype out_type, void* out) {
  const auto n = static_cast<std::size_t>(q.state.numel());
  if (q.packed.size() != (n + 1) / 2 || q.state.absmax.size() != q.state.blocks())
    throw invalid_config("dequantize_4bit: packed bytes or absmax do not match the shape");
  dequantize_4bit_raw(q.packed.data(), q.state.absmax.data(), n, q.state.type, q.state.blocksize,
                      out_type, out);
}

/// Dequantizes to float32.
inline std::vector<float> dequantize_4bit(const quantized_4bit& q) {
  std::vector<float> out(static_cast<std::size_t>(q.state.numel()));
  dequantize_4bit(q, dtype::float32, out.data());
  return out;
}

/// Y [M, N] = X [M, K] * W^T for a quantized Linear weight W of shape [N, K] (fused, float32).
inline void gemm_4bit(std::span<const float> x, std::size_t M, const quantized_4bit& w,
                      std::span<float> y) {
  if (w.state.shape.size() != 2)
    throw invalid_config("gemm_4bit: weight must be 2-D [out_features, in_features]");
  const auto N = static_cast<std::size_t>(w.state.shape[0]);
  const auto K = static_cast<std::size_t>(w.state.shape[1]);
  if (x.size() != M * K || y.size() != M * N)
    throw invalid_config("gemm_4bit: x must be [M, " + std::to_string(K) + "] and y [M, " +
                         std::to_string(N) + "]");
  gemm_4bit_raw(x.data(), M, w.packed.data(), w.state.absmax.data(), w.state.type,
                w.state.blocksize, N, K, y.data());
}

}  // namespace stowage::precision

static_assert(stowage::precision::quantized_4bit_policy<stowage::precision::nf4<>>);
static_assert(stowage::precision::quantized_4bit_policy<
              stowage::precision::fp4<stowage::precision::fp16, true, 4096>>);
static_assert(
    stowage::precision_policy<stowage::precision::nf4<stowage::precision::fp32, true, 128>>);
