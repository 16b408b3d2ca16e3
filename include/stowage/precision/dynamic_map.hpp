// stowage/precision/dynamic_map.hpp: bitsandbytes' 8-bit "dynamic" quantization map
// (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)) and the blockwise 8-bit
// quantizer that uses it. bitsandbytes double-quantizes the NF4/FP4 block scales with it
// (formats-spec §1.6, §1.7).
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace stowage::precision {

namespace detail {

// torch.linspace(start, end, steps, dtype=float32) on the CPU (torch 2.x): the step is
// (end - start) / (steps - 1) in float, the first half counts up from `start` and the second
// half down from `end`, each value one fused multiply-add. Non-fused arithmetic differs in the
// last bit for 14 of the 134 values the dynamic map needs, so the FMA matters.
inline float torch_linspace_at(float start, float end, std::int64_t steps, std::int64_t i) {
  const float step = (end - start) / static_cast<float>(steps - 1);
  const std::int64_t half = steps / 2;
  if (i < half) return std::fma(step, static_cast<float>(i), start);
  return std::fma(-step, static_cast<float>(steps - i - 1), end);
}

inline std::array<float, 256> build_dynamic_map() {
  // For exponent i = 0..6: 2^i + 1 linspace boundaries in [0.1, 1], their float32 midpoints
  // scaled by float32(10^(i-6)), positive and negative; then 0 and 1.0; sorted ascending.
  std::array<float, 256> m{};
  std::size_t n = 0;
  for (int i = 0; i < 7; ++i) {
    const std::int64_t items = (std::int64_t{1} << i) + 1;
    const auto scale = static_cast<float>(std::pow(10.0, i - 6));
    for (std::int64_t k = 0; k + 1 < items; ++k) {
      const float mean =
          (torch_linspace_at(0.1f, 1.0f, items, k) + torch_linspace_at(0.1f, 1.0f, items, k + 1)) /
          2.0f;
      m[n++] = scale * mean;
      m[n++] = -(scale * mean);
    }
  }
  m[n++] = 0.0f;
  m[n++] = 1.0f;
  // Insertion sort: 256 values, once per process.
  for (std::size_t a = 1; a < m.size(); ++a)
    for (std::size_t b = a; b > 0 && m[b - 1] > m[b]; --b) std::swap(m[b - 1], m[b]);
  return m;
}

}  // namespace detail

/// The 256-entry signed dynamic map, sorted ascending (index 0 = -0.99296874, 127 = 0.0,
/// 255 = 1.0; there is no -1.0). Bit-identical to bitsandbytes.functional.create_dynamic_map()
/// on x86-64 torch 2.x (checked against tests/fixtures/bnb/maps.json). Readers of a checkpoint
/// should still prefer the stored `nested_quant_map`.
inline const std::array<float, 256>& dynamic_map() {
  static const std::array<float, 256> map = detail::build_dynamic_map();
  return map;
}

/// Index of the entry of a sorted `code` nearest to s; an exact midpoint goes to the lower index
/// (torch.bucketize on binary32 midpoints, bitsandbytes' default backend; the CUDA kernel agrees
/// except that some exact-midpoint ties go up). NaN maps to the last index, as bucketize does.
inline std::uint8_t nearest_code_index(std::span<const float, 256> code, float s) noexcept {
  if (std::isnan(s)) return 255;
  // Binary search over the 255 binary32 midpoints: first midpoint >= s.
  std::size_t lo = 0, hi = 255;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    const float b = (code[mid] + code[mid + 1]) / 2.0f;
    if (b < s)
      lo = mid + 1;
    else
      hi = mid;
  }
  return static_cast<std::uint8_t>(lo);
}

/// bitsandbytes quantize_blockwise: per block of `blocksize` consecutive values,
/// absmax = max|v|, s = v * (1 / absmax) clamped to [-1, 1], code = nearest map entry.
/// An all-zero block stores absmax 0 and code of 0.0 (bnb's default backend; CUDA's 0*inf NaN
/// path has no defined answer). `codes` has in.size() entries, `absmax` ceil(n / blocksize).
inline void quantize_blockwise_8bit(std::span<const float> in, std::span<const float, 256> code,
                                    std::size_t blocksize, std::span<std::uint8_t> codes,
                                    std::span<float> absmax) {
  if (blocksize == 0) throw invalid_config("quantize_blockwise_8bit: blocksize must be > 0");
  const std::size_t blocks = (in.size() + blocksize - 1) / blocksize;
  if (codes.size() != in.size() || absmax.size() != blocks)
    throw invalid_config("quantize_blockwise_8bit: output spans have the wrong size (codes " +
                         std::to_string(codes.size()) + ", absmax " +
                         std::to_string(absmax.size()) + ")");
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::size_t begin = b * blocksize;
    const std::size_t end = begin + blocksize < in.size() ? begin + blocksize : in.size();
    float am = 0.0f;
    for (std::size_t i = begin; i < end; ++i) am = std::fmax(am, std::fabs(in[i]));
    absmax[b] = am;
    const float inv = 1.0f / (am > 1e-38f ? am : 1e-38f);
    for (std::size_t i = begin; i < end; ++i) {
      float s = in[i] * inv;
      s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
      codes[i] = nearest_code_index(code, s);
    }
  }
}

/// bitsandbytes dequantize_blockwise: out[i] = float32(code[q[i]] * absmax[i / blocksize]).
inline void dequantize_blockwise_8bit(std::span<const std::uint8_t> codes,
                                      std::span<const float, 256> code,
                                      std::span<const float> absmax, std::size_t blocksize,
                                      std::span<float> out) {
  if (blocksize == 0 || out.size() != codes.size() ||
      absmax.size() != (codes.size() + blocksize - 1) / blocksize)
    throw invalid_config("dequantize_blockwise_8bit: spans do not match the block size");
  for (std::size_t i = 0; i < codes.size(); ++i) out[i] = code[codes[i]] * absmax[i / blocksize];
}

}  // namespace stowage::precision
