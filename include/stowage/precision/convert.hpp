// stowage/precision/convert.hpp: float32 <-> float16 / bfloat16 conversion, bit-identical to
// PyTorch's CPU tensor `.to(dtype)` (formats-spec §4): round to nearest even on the binary32 bit
// pattern, subnormals rounded (never flushed), overflow to infinity. NaN follows the vectorised
// CPU kernels that `.to()` uses on tensors: bfloat16 NaN -> 0xffff; float16 NaN keeps the sign
// and the top 10 payload bits with the quiet bit set (what F16C's vcvtps2ph produces).
// Widening (fp16/bf16 -> fp32) is exact. The bulk loops are branch-light so the compiler can
// vectorise them; with F16C available the float16 loops use the hardware instructions, which
// give the same bits; float32 -> bfloat16 uses an AVX2 loop where the CPU has AVX2 (runtime
// check, so baseline builds stay portable), same arithmetic, same bits, also in a form with
// non-temporal stores for large destinations (fp32_to_bf16_bytes_streaming; a checkpoint load).
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#if defined(__F16C__) && (defined(__x86_64__) || defined(__i386__))
#define STOWAGE_HAS_F16C 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
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

namespace detail {

/// The portable float32 -> bfloat16 loop over byte buffers (any alignment): branch-free, so
/// the compiler vectorises it with whatever the baseline ISA offers.
inline void fp32_to_bf16_bytes_portable(const std::byte* src, std::byte* dst,
                                        std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, src + 4 * i, 4);
    const std::uint32_t rounded = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
    const bool nan = (u & 0x7fffffffU) > 0x7f800000U;
    const auto h = static_cast<std::uint16_t>(nan ? 0xffffU : rounded);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define STOWAGE_HAS_AVX2_DISPATCH 1
/// AVX2 form of the same arithmetic, 16 elements per step: (u + 0x7fff + lsb) >> 16, NaN lanes
/// forced to 0xffff by OR-ing the compare mask's low half; packus keeps every value (all are
/// <= 0xffff) and the permute undoes its lane interleave. Used only where the CPU has AVX2
/// (runtime check), so a baseline build still runs everywhere. `Stream`: non-temporal stores
/// (the destination's head is converted up to a 32-byte boundary first, an sfence ends the
/// loop), for a large destination that is not read back soon: a load writing freshly faulted
/// memory skips the read-for-ownership of every line the kernel has just zeroed and evicted.
template <bool Stream>
__attribute__((target("avx2"))) inline void fp32_to_bf16_bytes_avx2_loop(const std::byte* src,
                                                                         std::byte* dst,
                                                                         std::size_t n) noexcept {
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  std::size_t i = 0;
  if constexpr (Stream) {
    // An odd destination address never reaches a 32-byte boundary in whole elements: such a
    // call takes ordinary stores throughout.
    const auto addr = reinterpret_cast<std::uintptr_t>(dst);
    if (addr % 2 != 0) {
      fp32_to_bf16_bytes_avx2_loop<false>(src, dst, n);
      return;
    }
    i = std::min<std::size_t>(n, ((32 - addr % 32) % 32) / 2);
    fp32_to_bf16_bytes_portable(src, dst, i);
  }
  for (; i + 16 <= n; i += 16) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * i + 32));
    const __m256i ra =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, bias),
                                           _mm256_and_si256(_mm256_srli_epi32(a, 16), one)),
                          16);
    const __m256i rb =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, bias),
                                           _mm256_and_si256(_mm256_srli_epi32(b, 16), one)),
                          16);
    const __m256i na =
        _mm256_srli_epi32(_mm256_cmpgt_epi32(_mm256_and_si256(a, abs_mask), inf), 16);
    const __m256i nb =
        _mm256_srli_epi32(_mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), inf), 16);
    const __m256i packed = _mm256_packus_epi32(_mm256_or_si256(ra, na), _mm256_or_si256(rb, nb));
    if constexpr (Stream)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 2 * i),
                          _mm256_permute4x64_epi64(packed, 0xd8));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i),
                          _mm256_permute4x64_epi64(packed, 0xd8));
  }
  if constexpr (Stream) _mm_sfence();
  if (i < n) fp32_to_bf16_bytes_portable(src + 4 * i, dst + 2 * i, n - i);
}

__attribute__((target("avx2"))) inline void fp32_to_bf16_bytes_avx2(const std::byte* src,
                                                                    std::byte* dst,
                                                                    std::size_t n) noexcept {
  fp32_to_bf16_bytes_avx2_loop<false>(src, dst, n);
}

inline bool cpu_supports_avx2_for_bf16() noexcept {
  static const bool has = __builtin_cpu_supports("avx2") != 0;
  return has;
}
#endif

}  // namespace detail

/// Bulk float32 -> bfloat16 on little-endian byte buffers of any alignment (`n` elements):
/// the loop every bfloat16 load of a float32 checkpoint runs over all its bytes. Same bits as
/// fp32_to_bf16_bits; AVX2 where the CPU has it.
inline void fp32_to_bf16_bytes(const std::byte* src, std::byte* dst, std::size_t n) noexcept {
#ifdef STOWAGE_HAS_AVX2_DISPATCH
  if (n >= 16 && detail::cpu_supports_avx2_for_bf16()) {
    detail::fp32_to_bf16_bytes_avx2(src, dst, n);
    return;
  }
#endif
  detail::fp32_to_bf16_bytes_portable(src, dst, n);
}

/// fp32_to_bf16_bytes with non-temporal stores where the CPU has AVX2 (same bits): for a large
/// destination that nobody reads back soon, such as the fresh memory a checkpoint load fills.
/// The stores bypass the cache, so the kernel-zeroed lines need not be read back first; do not
/// use it for a buffer that is consumed right away (staging), which ordinary stores keep cached.
inline void fp32_to_bf16_bytes_streaming(const std::byte* src, std::byte* dst,
                                         std::size_t n) noexcept {
#ifdef STOWAGE_HAS_AVX2_DISPATCH
  if (n >= 16 && detail::cpu_supports_avx2_for_bf16()) {
    detail::fp32_to_bf16_bytes_avx2_loop<true>(src, dst, n);
    return;
  }
#endif
  detail::fp32_to_bf16_bytes_portable(src, dst, n);
}

/// Bulk float32 -> bfloat16 (sizes must match; caller's precondition).
inline void fp32_to_bf16(std::span<const float> src, std::span<std::uint16_t> dst) noexcept {
  STOWAGE_ASSERT(src.size() == dst.size(), "fp32_to_bf16: sizes differ");
  fp32_to_bf16_bytes(reinterpret_cast<const std::byte*>(src.data()),
                     reinterpret_cast<std::byte*>(dst.data()), src.size());
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
