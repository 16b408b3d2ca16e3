// stowage/precision/convert.hpp: float32 <-> float16 / bfloat16 conversion, bit-identical to
// PyTorch's CPU tensor `.to(dtype)` (formats-spec §4): round to nearest even on the binary32 bit
// pattern, subnormals rounded (never flushed), overflow to infinity. NaN follows the vectorised
// CPU kernels that `.to()` uses on tensors: bfloat16 NaN -> 0xffff; float16 NaN keeps the sign
// and the top 10 payload bits with the quiet bit set (what F16C's vcvtps2ph produces).
// Widening (fp16/bf16 -> fp32) is exact. The bulk loops are branch-light so the compiler can
// vectorise them; with F16C available the float16 loops use the hardware instructions, which
// give the same bits.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#if defined(__F16C__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define STOWAGE_HAS_F16C 1
#endif

namespace stowage::precision {

/// float32 -> bfloat16 bits, RNE; NaN -> 0xffff as torch's vectorised CPU kernel writes it.
constexpr std::uint16_t fp32_to_bf16_bits(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffU) > 0x7f800000U) return 0xffffU;
  return static_cast<std::uint16_t>((u + 0x7fffU + ((u >> 16) & 1U)) >> 16);
}

/// bfloat16 bits -> float32 (exact: the bits become the top half).
constexpr float bf16_bits_to_fp32(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// float32 -> float16 bits, RNE with subnormals and overflow to infinity; NaN keeps the sign
/// and the top payload bits, quieted.
constexpr std::uint16_t fp32_to_fp16_bits(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000U);
  const std::uint32_t a = u & 0x7fffffffU;
  if (a > 0x7f800000U)  // NaN
    return static_cast<std::uint16_t>(sign | 0x7e00U | ((a & 0x7fffffU) >> 13));
  if (a >= 0x477ff000U) return static_cast<std::uint16_t>(sign | 0x7c00U);  // >= 65520 or inf
  if (a >= 0x38800000U) {  // normal float16: rebias the exponent (127 -> 15), round 13 bits
    const std::uint32_t r = a + 0xfffU + ((a >> 13) & 1U);
    return static_cast<std::uint16_t>(sign | ((r - 0x38000000U) >> 13));
  }
  if (a <= 0x33000000U) return sign;  // <= 2^-25: rounds to zero (the tie goes to even 0)
  // Subnormal result: value = m * 2^(e-150); the float16 unit is 2^-24.
  const std::uint32_t e = a >> 23;
  const std::uint32_t m = (a & 0x7fffffU) | 0x800000U;
  const std::uint32_t shift = 126U - e;  // 14..24
  std::uint32_t h = m >> shift;
  const std::uint32_t rem = m & ((1U << shift) - 1U);
  const std::uint32_t half = 1U << (shift - 1U);
  if (rem > half || (rem == half && (h & 1U))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

/// float16 bits -> float32 (exact for numbers; a NaN keeps its sign and payload and is quieted,
/// as torch's F16C-based widening does).
constexpr float fp16_bits_to_fp32(std::uint16_t h) noexcept {
  const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000U) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fU;
  std::uint32_t m = h & 0x3ffU;
  if (e == 0x1fU)
    return std::bit_cast<float>(sign | 0x7f800000U | (m << 13) | (m ? 0x400000U : 0U));
  if (e != 0) return std::bit_cast<float>(sign | ((e + 112U) << 23) | (m << 13));
  if (m == 0) return std::bit_cast<float>(sign);
  // Subnormal: normalise.
  std::uint32_t exp = 113U;
  while ((m & 0x400U) == 0) {
    m <<= 1;
    --exp;
  }
  return std::bit_cast<float>(sign | (exp << 23) | ((m & 0x3ffU) << 13));
}

/// Bulk float32 -> bfloat16 (sizes must match; caller's precondition).
inline void fp32_to_bf16(std::span<const float> src, std::span<std::uint16_t> dst) noexcept {
  STOWAGE_ASSERT(src.size() == dst.size(), "fp32_to_bf16: sizes differ");
  const float* s = src.data();
  std::uint16_t* d = dst.data();
  const std::size_t n = src.size();
  for (std::size_t i = 0; i < n; ++i) d[i] = fp32_to_bf16_bits(s[i]);
}

inline void bf16_to_fp32(std::span<const std::uint16_t> src, std::span<float> dst) noexcept {
  STOWAGE_ASSERT(src.size() == dst.size(), "bf16_to_fp32: sizes differ");
  for (std::size_t i = 0; i < src.size(); ++i) dst[i] = bf16_bits_to_fp32(src[i]);
}

inline void fp32_to_fp16(std::span<const float> src, std::span<std::uint16_t> dst) noexcept {
  STOWAGE_ASSERT(src.size() == dst.size(), "fp32_to_fp16: sizes differ");
  std::size_t i = 0;
#ifdef STOWAGE_HAS_F16C
  for (; i + 8 <= src.size(); i += 8) {
    const __m256 v = _mm256_loadu_ps(src.data() + i);
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst.data() + i), h);
  }
#endif
  for (; i < src.size(); ++i) dst[i] = fp32_to_fp16_bits(src[i]);
}

inline void fp16_to_fp32(std::span<const std::uint16_t> src, std::span<float> dst) noexcept {
  STOWAGE_ASSERT(src.size() == dst.size(), "fp16_to_fp32: sizes differ");
  std::size_t i = 0;
#ifdef STOWAGE_HAS_F16C
  for (; i + 8 <= src.size(); i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src.data() + i));
    _mm256_storeu_ps(dst.data() + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < src.size(); ++i) dst[i] = fp16_bits_to_fp32(src[i]);
}

/// True where convert_elements can turn `from` into `to`.
constexpr bool can_convert(dtype from, dtype to) noexcept {
  auto ok = [](dtype d) {
    return d == dtype::float32 || d == dtype::float16 || d == dtype::bfloat16 ||
           d == dtype::float64;
  };
  return from == to || (ok(from) && ok(to));
}

/// Converts `n` elements between float32/float16/bfloat16/float64 as torch's `.to()` does on a
/// CPU tensor (through float32: fp16 <-> bf16 widen exactly, then round once; float64 is first
/// rounded to float32, which is what torch's float64 -> half/bfloat16 path does). Unaligned
/// byte buffers are fine; same dtype is a copy. Throws invalid_dtype for other pairs.
inline void convert_elements(const std::byte* src, dtype from, std::byte* dst, dtype to,
                             std::size_t n) {
  if (from == to) {
    if (n) std::memcpy(dst, src, n * element_size(from));
    return;
  }
  if (!can_convert(from, to))
    throw invalid_dtype("convert_elements: cannot convert " + std::string(name(from)) + " to " +
                        std::string(name(to)) + " (only float32/float16/bfloat16/float64)");
  constexpr std::size_t chunk = 1024;
  float buf[chunk];
  std::uint16_t hbuf[chunk];
  const std::size_t in_size = element_size(from), out_size = element_size(to);
  for (std::size_t base = 0; base < n; base += chunk) {
    const std::size_t m = n - base < chunk ? n - base : chunk;
    const std::byte* s = src + base * in_size;
    switch (from) {
      case dtype::float32:
        std::memcpy(buf, s, m * 4);
        break;
      case dtype::float64:
        for (std::size_t i = 0; i < m; ++i) {
          double v;
          std::memcpy(&v, s + i * 8, 8);
          buf[i] = static_cast<float>(v);
        }
        break;
      case dtype::float16:
        std::memcpy(hbuf, s, m * 2);
        fp16_to_fp32({hbuf, m}, {buf, m});
        break;
      default:  // bfloat16
        std::memcpy(hbuf, s, m * 2);
        bf16_to_fp32({hbuf, m}, {buf, m});
        break;
    }
    std::byte* d = dst + base * out_size;
    switch (to) {
      case dtype::float32:
        std::memcpy(d, buf, m * 4);
        break;
      case dtype::float64:
        for (std::size_t i = 0; i < m; ++i) {
          const double v = buf[i];
          std::memcpy(d + i * 8, &v, 8);
        }
        break;
      case dtype::float16:
        fp32_to_fp16({buf, m}, {hbuf, m});
        std::memcpy(d, hbuf, m * 2);
        break;
      default:  // bfloat16
        fp32_to_bf16({buf, m}, {hbuf, m});
        std::memcpy(d, hbuf, m * 2);
        break;
    }
  }
}

}  // namespace stowage::precision
