// stowage/exec/cpu/matvec.hpp: y = x W^T for decode-sized batches (at most matvec_max_rows rows
// of x: decode, and short prefills) straight from a float32, bfloat16 or float16 weight. Decode is
// memory-bandwidth bound: the product must read each weight byte once and do nothing else with it.
// Widening a 16-bit weight tile to float32 in memory first (what linear() does for prefill) writes
// and re-reads twice the weight's bytes, and Eigen compiled without -march multiplies with SSE2.
// Here each weight vector is widened in registers (bf16: zero-extend to 32 bits and shift left 16;
// fp16: F16C vcvtph2ps) and multiplied with FMA into one accumulator per (batch row, weight row),
// reused across every batch row so a weight byte is loaded once per call whatever the batch.
// AVX2+FMA+F16C and AVX-512 versions are compiled with __attribute__((target)) and chosen at
// run time, under the same switch as the quantization kernels (precision::kernel_simd()), so the
// library needs no -march; the portable loop is the fallback. The loops over batch and weight
// rows are unrolled by pragma so the accumulators live in registers at -O2 too. Summation order
// differs between the three (lane-wise partial sums), within float32 rounding of the exact product.
#pragma once

#include <stowage/core/dtype.hpp>
#include <stowage/exec/cpu/weight_ref.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/precision/kernels_cpu.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>

#if defined(STOWAGE_QUANT_X86)
#include <immintrin.h>
#define STOWAGE_MATVEC_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define STOWAGE_MATVEC_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#endif

namespace stowage::exec::cpu::detail {

/// Batches up to this many rows of x take these kernels. Decode (1-8 rows) is what they are
/// for; a short prefill still beats Eigen's SSE2 GEMM with them (16 rows x [5632, 1024]:
/// 2.7 ms fp32 / 1.6 ms bf16 against 5.1 / 5.6 ms on the 2-vCPU VM, AVX-512), the weight
/// streamed once and re-read from L2 by each group of 8 rows (mv_row_tile).
inline constexpr std::int64_t matvec_max_rows = 16;

/// Row stride for a copy of x with `cols` floats a row: rows a multiple of 4 KiB apart map to
/// the same L1 sets (hidden 1024/2048 in float32: 4/8 KiB), and eight of them plus a weight
/// row evict each other every step. One extra cache line per row spreads them over the sets.
inline std::int64_t padded_ld(std::int64_t cols) noexcept {
  const std::int64_t ld = (cols + 15) / 16 * 16;
  return ld % 1024 == 0 ? ld + 16 : ld;
}

/// How the weight's elements widen to float32.
enum class mv_elem : int { f32, bf16, f16 };

/// The arguments of one call over weight rows [r0, r1): y[i * ld_y + r] for i < m.
struct mv_args {
  const void* w = nullptr;
  std::int64_t cols = 0;
  const float* x = nullptr;  ///< m rows of cols floats, ld_x apart
  float* y = nullptr;
  std::int64_t ld_y = 0;
  std::int64_t ld_x = 0;
};

template <mv_elem E>
inline float mv_scalar_load(const void* w, std::int64_t i) noexcept {
  if constexpr (E == mv_elem::f32) {
    return static_cast<const float*>(w)[i];
  } else if constexpr (E == mv_elem::bf16) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(w)[i])
                                << 16);
  } else {
    return precision::fp16_bits_to_fp32(static_cast<const std::uint16_t*>(w)[i]);
  }
}

/// The portable reference: eight lane-wise partial sums per output (the compiler vectorises the
/// inner loop), added pairwise at the end.
template <mv_elem E>
void mv_rows_scalar(const mv_args& a, std::int64_t m, std::int64_t r0, std::int64_t r1) {
  const std::int64_t K = a.cols;
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t i = 0; i < m; ++i) {
      const float* x = a.x + i * a.ld_x;
      float lane[8] = {};
      std::int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; ++l) lane[l] += mv_scalar_load<E>(a.w, r * K + k + l) * x[k + l];
      float s =
          ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
      for (; k < K; ++k) s += mv_scalar_load<E>(a.w, r * K + k) * x[k];
      a.y[i * a.ld_y + r] = s;
    }
}

#if defined(STOWAGE_QUANT_X86)
namespace mv_avx2 {

template <mv_elem E>
STOWAGE_MATVEC_AVX2_FN inline __m256 load8(const void* w, std::int64_t i) noexcept {
  if constexpr (E == mv_elem::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(w) + i));
    if constexpr (E == mv_elem::bf16)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);
  }
}

STOWAGE_MATVEC_AVX2_FN inline float hsum(__m256 v) noexcept {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/// MB batch rows x R weight rows at a time: MB * R accumulators, each weight vector widened
/// once and used MB times.
template <mv_elem E, int MB, int R>
STOWAGE_MATVEC_AVX2_FN void tile(const mv_args& a, std::int64_t i0, std::int64_t r) noexcept {
  const std::int64_t K = a.cols;
  __m256 acc[MB][R];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[i][j] = _mm256_setzero_ps();
  std::int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) wv[j] = load8<E>(a.w, (r + j) * K + k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(a.x + (i0 + i) * a.ld_x + k);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      float s = hsum(acc[i][j]);
      for (std::int64_t t = k; t < K; ++t)
        s += mv_scalar_load<E>(a.w, (r + j) * K + t) * a.x[(i0 + i) * a.ld_x + t];
      a.y[(i0 + i) * a.ld_y + r + j] = s;
    }
}

template <mv_elem E, int MB>
STOWAGE_MATVEC_AVX2_FN void rows(const mv_args& a, std::int64_t i0, std::int64_t r0,
                                 std::int64_t r1) noexcept {
  constexpr int R = MB == 1 ? 4 : MB == 2 ? 2 : 1;
  std::int64_t r = r0;
  for (; r + R <= r1; r += R) tile<E, MB, R>(a, i0, r);
  for (; r < r1; ++r) tile<E, MB, 1>(a, i0, r);
}

}  // namespace mv_avx2

namespace mv_avx512 {

// The maskz forms with a full mask are the plain instructions; GCC 12's unmasked intrinsics pass
// an "undefined" register that trips -Wmaybe-uninitialized (GCC PR 105593).
inline constexpr __mmask16 all16 = 0xffff;

STOWAGE_MATVEC_AVX512_FN inline float hsum(__m512 v) noexcept {
  const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 0));
  const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 1));
  return mv_avx2::hsum(_mm256_add_ps(lo, hi));
}

template <mv_elem E>
STOWAGE_MATVEC_AVX512_FN inline __m512 load16(const void* w, std::int64_t i) noexcept {
  if constexpr (E == mv_elem::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(w) + i));
    if constexpr (E == mv_elem::bf16)
      return _mm512_castsi512_ps(
          _mm512_maskz_slli_epi32(all16, _mm512_maskz_cvtepu16_epi32(all16, h), 16));
    else
      return _mm512_maskz_cvtph_ps(all16, h);
  }
}

/// The last n < 16 elements, the rest zero (masked loads never touch bytes past the row).
template <mv_elem E>
STOWAGE_MATVEC_AVX512_FN inline __m512 load_tail(const void* w, std::int64_t i,
                                                 __mmask16 mask) noexcept {
  if constexpr (E == mv_elem::f32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(w) + i);
    if constexpr (E == mv_elem::bf16)
      return _mm512_castsi512_ps(
          _mm512_maskz_slli_epi32(all16, _mm512_maskz_cvtepu16_epi32(all16, h), 16));
    else
      return _mm512_maskz_cvtph_ps(all16, h);
  }
}

template <mv_elem E, int MB, int R>
STOWAGE_MATVEC_AVX512_FN void tile(const mv_args& a, std::int64_t i0, std::int64_t r) noexcept {
  const std::int64_t K = a.cols;
  __m512 acc[MB][R];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[i][j] = _mm512_setzero_ps();
  std::int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) wv[j] = load16<E>(a.w, (r + j) * K + k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(a.x + (i0 + i) * a.ld_x + k);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
    }
  }
  if (k < K) {
    const auto mask = static_cast<__mmask16>((1u << static_cast<unsigned>(K - k)) - 1u);
    __m512 wv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) wv[j] = load_tail<E>(a.w, (r + j) * K + k, mask);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, a.x + (i0 + i) * a.ld_x + k);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) a.y[(i0 + i) * a.ld_y + r + j] = hsum(acc[i][j]);
}

template <mv_elem E, int MB>
STOWAGE_MATVEC_AVX512_FN void rows(const mv_args& a, std::int64_t i0, std::int64_t r0,
                                   std::int64_t r1) noexcept {
  constexpr int R = MB == 1 ? 4 : MB == 2 ? 2 : 1;
  std::int64_t r = r0;
  for (; r + R <= r1; r += R) tile<E, MB, R>(a, i0, r);
  for (; r < r1; ++r) tile<E, MB, 1>(a, i0, r);
}

}  // namespace mv_avx512
#endif

/// Weight rows per pass over the batch groups: 32 rows of up to 8 KiB stay in L2 while each
/// group of 8 batch rows reads them, so a batch of more than 8 rows still streams the weight
/// from memory once.
inline constexpr std::int64_t mv_row_tile = 32;

/// Rows [r0, r1) of y for all m rows of x, with the best kernel the CPU and
/// precision::kernel_simd() allow. Batch rows go 8, 4, 2, 1 at a time.
template <mv_elem E>
void mv_rows(const mv_args& a, std::int64_t m, std::int64_t r0, std::int64_t r1) {
#if defined(STOWAGE_QUANT_X86)
  const bool v512 = precision::detail::use_avx512(), v256 = precision::detail::use_avx2();
  if (v512 || v256) {
    for (std::int64_t t0 = r0; t0 < r1; t0 += mv_row_tile) {
      const std::int64_t t1 = std::min(r1, t0 + mv_row_tile);
      std::int64_t i0 = 0;
      auto run = [&]<int MB>() {
        if (v512)
          mv_avx512::rows<E, MB>(a, i0, t0, t1);
        else
          mv_avx2::rows<E, MB>(a, i0, t0, t1);
        i0 += MB;
      };
      while (i0 < m) {
        const std::int64_t left = m - i0;
        if (left >= 8)
          run.template operator()<8>();
        else if (left >= 4)
          run.template operator()<4>();
        else if (left >= 2)
          run.template operator()<2>();
        else
          run.template operator()<1>();
      }
    }
    return;
  }
#endif
  mv_rows_scalar<E>(a, m, r0, r1);
}

/// Dispatch on the weight's storage type (float32, bfloat16 or float16, read directly).
/// x: m rows, ld_x floats apart (>= w.cols); y: m rows of w.rows floats.
inline void matvec_rows(const weight_ref& w, const float* x, std::int64_t ld_x, std::int64_t m,
                        float* y, std::int64_t r0, std::int64_t r1) {
  const mv_args a{w.data, w.cols, x, y, w.rows, ld_x};
  switch (w.type) {
    case dtype::bfloat16:
      mv_rows<mv_elem::bf16>(a, m, r0, r1);
      return;
    case dtype::float16:
      mv_rows<mv_elem::f16>(a, m, r0, r1);
      return;
    default:
      mv_rows<mv_elem::f32>(a, m, r0, r1);
      return;
  }
}

}  // namespace stowage::exec::cpu::detail
