// stowage/precision/kernels_cpu.hpp: the CPU loops behind int8/nf4/fp4: 4-bit quantize and
// dequantize (bit-exact with bitsandbytes), LLM.int8 row-wise quantization, and fused
// dequantize-and-multiply kernels for matrix-vector and small-batch products. Loops are written
// for auto-vectorisation (-O3), with AVX2/FMA intrinsics where the compiler targets them and a
// portable fallback, and split over row/block ranges on a few std::threads.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/precision/quant_state.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define STOWAGE_QUANT_AVX2 1
#endif

namespace stowage::precision {

// ---------------------------------------------------------------------------------------------
// Threads

/// Threads the quantization kernels may use (0 = std::thread::hardware_concurrency()).
inline std::atomic<unsigned>& kernel_threads() {
  static std::atomic<unsigned> n{0};
  return n;
}

namespace detail {

inline unsigned kernel_thread_count() {
  unsigned n = kernel_threads().load(std::memory_order_relaxed);
  if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// Splits [0, count) into contiguous chunks of at least `grain` items and runs fn(begin, end) on
// up to kernel_thread_count() threads (the caller's thread takes the first chunk). Small jobs run
// inline: spawning costs more than it saves below a few hundred microseconds of work.
template <class Fn>
void parallel_for(std::size_t count, std::size_t grain, Fn&& fn) {
  if (count == 0) return;
  const std::size_t max_chunks = grain == 0 ? count : (count + grain - 1) / grain;
  const std::size_t chunks = std::min<std::size_t>(kernel_thread_count(), max_chunks);
  if (chunks <= 1) {
    fn(std::size_t{0}, count);
    return;
  }
  const std::size_t per = (count + chunks - 1) / chunks;
  std::vector<std::thread> pool;
  pool.reserve(chunks - 1);
  for (std::size_t c = 1; c < chunks; ++c) {
    const std::size_t b = c * per, e = std::min(count, b + per);
    if (b < e) pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(std::size_t{0}, std::min(count, per));
  for (auto& t : pool) t.join();
}

// Element access by runtime dtype (fp32, fp16, bf16 only).
inline float load_as_f32(const void* p, std::size_t i, dtype t) noexcept {
  if (t == dtype::float32) return static_cast<const float*>(p)[i];
  const std::uint16_t h = static_cast<const std::uint16_t*>(p)[i];
  return t == dtype::bfloat16 ? bf16_bits_to_fp32(h) : fp16_bits_to_fp32(h);
}

inline void check_float_dtype(dtype t, const char* what) {
  if (t != dtype::float32 && t != dtype::float16 && t != dtype::bfloat16)
    throw invalid_dtype(std::string(what) + ": dtype " + std::string(stowage::name(t)) +
                        " is not float32, float16 or bfloat16");
}

// Rounds a float32 to `t` and back (the value a tensor of dtype t would hold).
inline float round_to(float v, dtype t) noexcept {
  if (t == dtype::bfloat16) return bf16_bits_to_fp32(fp32_to_bf16_bits(v));
  if (t == dtype::float16) return fp16_bits_to_fp32(fp32_to_fp16_bits(v));
  return v;
}

// NF4 code of a scaled value: number of thresholds strictly below s (NaN -> 0, as CUDA's tree).
inline std::uint8_t nf4_code_of(float s) noexcept {
  unsigned c = 0;
  for (float t : nf4_thresholds) c += s > t ? 1u : 0u;
  return static_cast<std::uint8_t>(c);
}

// FP4 code of a scaled value, CUDA rule: sign bit from s < 0, magnitude from the kernel's
// literal boundaries (NaN -> 0).
inline std::uint8_t fp4_code_of(float s) noexcept {
  const float a = std::fabs(s);
  unsigned r = 0;
  for (float b : fp4_cuda_boundaries) r += a > b ? 1u : 0u;
  return static_cast<std::uint8_t>(fp4_rank_to_bits[r] | (s < 0.0f ? 8u : 0u));
}

template <quant_type Q, class In, class Load>
void quantize_4bit_block(const In* in, Load load, std::size_t begin, std::size_t end,
                         std::uint8_t* packed, float* absmax_out) {
  // Load the block as float32 (exact for every input dtype), then absmax, then codes. Every
  // loop runs over the elements with a fixed body, so each one vectorises.
  constexpr std::size_t chunk = 4096;
  alignas(64) float buf[chunk];
  const std::size_t n = end - begin;
  for (std::size_t i = 0; i < n; ++i) buf[i] = load(in[begin + i]);
  float am = 0.0f;
  for (std::size_t i = 0; i < n; ++i) {
    const float a = std::fabs(buf[i]);
    am = a > am ? a : am;  // NaN never wins (CUDA's fmaxf ignores NaN too)
  }
  *absmax_out = am;
  // CUDA: reciprocal first, then multiply. absmax 0 gives inf and 0 * inf = NaN -> code 0.
  const float inv = 1.0f / am;
  for (std::size_t i = 0; i < n; ++i) buf[i] *= inv;
  alignas(64) std::uint8_t codes[chunk + 1];
  if constexpr (Q == quant_type::nf4) {
    for (std::size_t i = 0; i < n; ++i) codes[i] = 0;
    for (float t : nf4_thresholds)
      for (std::size_t i = 0; i < n; ++i)
        codes[i] = static_cast<std::uint8_t>(codes[i] + (buf[i] > t ? 1 : 0));
  } else {
    alignas(64) std::uint8_t rank[chunk];
    for (std::size_t i = 0; i < n; ++i) rank[i] = 0;
    for (float b : fp4_cuda_boundaries)
      for (std::size_t i = 0; i < n; ++i)
        rank[i] = static_cast<std::uint8_t>(rank[i] + (std::fabs(buf[i]) > b ? 1 : 0));
    for (std::size_t i = 0; i < n; ++i)
      codes[i] = static_cast<std::uint8_t>(fp4_rank_to_bits[rank[i]] | (buf[i] < 0.0f ? 8 : 0));
  }
  if (n % 2) codes[n] = zero_code(Q);  // only the very last block can be odd
  std::uint8_t* dst = packed + begin / 2;
  for (std::size_t k = 0; k < (n + 1) / 2; ++k)
    dst[k] = static_cast<std::uint8_t>((codes[2 * k] << 4) | codes[2 * k + 1]);
}

template <quant_type Q>
void quantize_4bit_block_any(const void* in, dtype in_type, std::size_t begin, std::size_t end,
                             std::uint8_t* packed, float* absmax_out) {
  if (in_type == dtype::float32)
    quantize_4bit_block<Q>(
        static_cast<const float*>(in), [](float v) { return v; }, begin, end, packed, absmax_out);
  else if (in_type == dtype::bfloat16)
    quantize_4bit_block<Q>(
        static_cast<const std::uint16_t*>(in), [](std::uint16_t h) { return bf16_bits_to_fp32(h); },
        begin, end, packed, absmax_out);
  else
    quantize_4bit_block<Q>(
        static_cast<const std::uint16_t*>(in), [](std::uint16_t h) { return fp16_bits_to_fp32(h); },
        begin, end, packed, absmax_out);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// 4-bit quantize / dequantize

/// Quantizes `numel` values of dtype `in_type` (fp32/fp16/bf16) at `in` to bitsandbytes' 4-bit
/// layout: `packed` gets ceil(numel/2) bytes (even element in the high nibble), `absmax`
/// ceil(numel/blocksize) float32. CUDA semantics (formats-spec §1.3): s = x * (1/absmax); NF4 by
/// the threshold table, FP4 by the CUDA literals; an all-zero block gives code 0 (bytes 0x00)
/// where bnb's pure-torch CPU path writes 0x77, and NaN elements are ignored by absmax and get
/// code 0.
inline void quantize_4bit_raw(const void* in, dtype in_type, std::size_t numel, quant_type type,
                              std::size_t blocksize, std::uint8_t* packed, float* absmax) {
  detail::check_float_dtype(in_type, "quantize_4bit");
  if (!is_valid_4bit_blocksize(blocksize))
    throw invalid_config("quantize_4bit: blocksize " + std::to_string(blocksize) +
                         " is not one of 64, 128, 256, 512, 1024, 2048, 4096");
  const std::size_t blocks = (numel + blocksize - 1) / blocksize;
  const std::size_t grain = std::max<std::size_t>(1, (std::size_t{1} << 16) / blocksize);
  detail::parallel_for(blocks, grain, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t b = b0; b < b1; ++b) {
      const std::size_t begin = b * blocksize, end = std::min(numel, begin + blocksize);
      if (type == quant_type::nf4)
        detail::quantize_4bit_block_any<quant_type::nf4>(in, in_type, begin, end, packed,
                                                         absmax + b);
      else
        detail::quantize_4bit_block_any<quant_type::fp4>(in, in_type, begin, end, packed,
                                                         absmax + b);
    }
  });
}

namespace detail {

template <class Out, class Convert>
void dequantize_4bit_blocks(const std::uint8_t* packed, const float* absmax, std::size_t numel,
                            const std::array<float, 16>& code, std::size_t blocksize, Out* out,
                            Convert convert) {
  const std::size_t blocks = (numel + blocksize - 1) / blocksize;
  const std::size_t grain = std::max<std::size_t>(1, (std::size_t{1} << 16) / blocksize);
  parallel_for(blocks, grain, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t b = b0; b < b1; ++b) {
      // f32(code * absmax) rounded to the output type: the same 16 values for the whole block.
      Out table[16];
      for (int i = 0; i < 16; ++i)
        table[i] = convert(code[static_cast<std::size_t>(i)] * absmax[b]);
      const std::size_t begin = b * blocksize, end = std::min(numel, begin + blocksize);
      const std::uint8_t* src = packed + begin / 2;
      Out* dst = out + begin;
      const std::size_t pairs = (end - begin) / 2;
      for (std::size_t k = 0; k < pairs; ++k) {
        const std::uint8_t byte = src[k];
        dst[2 * k] = table[byte >> 4];
        dst[2 * k + 1] = table[byte & 15];
      }
      if ((end - begin) % 2) dst[2 * pairs] = table[src[pairs] >> 4];
    }
  });
}

}  // namespace detail

/// Dequantizes bitsandbytes 4-bit data: out[i] = float32(code[nibble i] * absmax[i/blocksize]),
/// then rounded to `out_type` (fp32/fp16/bf16) with RNE. Bit-identical to
/// bitsandbytes.functional.dequantize_4bit (CPU and CUDA agree). `absmax` is float32 (for
/// double-quantized states pass the dequantized scales, see dequantize_nested_absmax).
inline void dequantize_4bit_raw(const std::uint8_t* packed, const float* absmax, std::size_t numel,
                                quant_type type, std::size_t blocksize, dtype out_type, void* out) {
  detail::check_float_dtype(out_type, "dequantize_4bit");
  if (blocksize == 0 || blocksize % 2)
    throw invalid_config("dequantize_4bit: blocksize must be even and > 0");
  const auto& code = code_table(type);
  if (out_type == dtype::float32)
    detail::dequantize_4bit_blocks(packed, absmax, numel, code, blocksize, static_cast<float*>(out),
                                   [](float v) { return v; });
  else if (out_type == dtype::bfloat16)
    detail::dequantize_4bit_blocks(packed, absmax, numel, code, blocksize,
                                   static_cast<std::uint16_t*>(out),
                                   [](float v) { return fp32_to_bf16_bits(v); });
  else
    detail::dequantize_4bit_blocks(packed, absmax, numel, code, blocksize,
                                   static_cast<std::uint16_t*>(out),
                                   [](float v) { return fp32_to_fp16_bits(v); });
}

/// The float32 scales of a double-quantized state: f32(f32(map[q] * nested_absmax[b/256]) +
/// offset), two roundings as bitsandbytes' explicit dequantize_4bit (formats-spec §1.6).
inline void dequantize_nested_absmax(const std::uint8_t* qabsmax, std::size_t blocks,
                                     const float* nested_absmax, const float* map, float offset,
                                     float* absmax) {
  for (std::size_t b = 0; b < blocks; ++b) {
    // The product must round before the add: with FMA available, GCC's default
    // -ffp-contract=fast would fuse `a * b + c` into one rounding (the fused CUDA GEMM's answer,
    // not dequantize_4bit's). A volatile store forces the rounding; this runs once per block.
    volatile float t = map[qabsmax[b]] * nested_absmax[b / nested_blocksize];
    absmax[b] = t + offset;
  }
}

/// float32 mean of the absmax (bitsandbytes' `offset`). torch's own float32 reduction order is
/// not reproducible, so this is the correctly rounded mean (accumulated in double); it can
/// differ from torch's by an ulp. Pass torch's value explicitly where it is known.
inline float absmax_mean(const float* absmax, std::size_t blocks) noexcept {
  double s = 0.0;
  for (std::size_t b = 0; b < blocks; ++b) s += static_cast<double>(absmax[b]);
  return blocks ? static_cast<float>(s / static_cast<double>(blocks)) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Fused 4-bit dequantize + multiply: Y[m, n] = sum_k X[m, k] * W[n, k] for a bnb-quantized
// weight W [N, K] (the flattened tensor quantized in blocks, blocks may cross rows). Weights are
// the exact float32 dequantized values; accumulation is float32 in a fixed order. Not
// bit-identical to "dequantize then torch matmul" (bitsandbytes' own fast paths are not either).

namespace detail {

inline constexpr std::size_t max_fused_batch = 8;

#if defined(STOWAGE_QUANT_AVX2)
inline float hsum256(__m256 v) noexcept {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// 8 codes from 4 packed bytes, in element order (high nibble first), as float values of table.
inline __m256 decode8(const std::uint8_t* src, __m256 tlo, __m256 thi) noexcept {
  std::int32_t word;
  std::memcpy(&word, src, 4);
  const __m128i v = _mm_cvtsi32_si128(word);
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  const __m128i lo = _mm_and_si128(v, mask);
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
  const __m256 a = _mm256_permutevar8x32_ps(tlo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

// acc[m] += sum_{k in [k0,k1)} X[m, k] * table[code(flat0 + k - k0)] for one block segment whose
// first flat element index is even (byte aligned). MB = batch rows handled at once.
#if defined(STOWAGE_QUANT_AVX2)
template <std::size_t MB>
struct fused_acc {
  __m256 v[MB];
};
#else
template <std::size_t MB>
struct fused_acc {};
#endif

template <std::size_t MB>
void fused_segment(const float* const* x, std::size_t k0, std::size_t len, const std::uint8_t* src,
                   const float* table, float* acc, [[maybe_unused]] fused_acc<MB>& vacc) {
  std::size_t k = 0;
#if defined(STOWAGE_QUANT_AVX2)
  const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
  __m256* va = vacc.v;
  for (; k + 16 <= len; k += 16) {
    const __m256 w0 = decode8(src + k / 2, tlo, thi);
    const __m256 w1 = decode8(src + k / 2 + 4, tlo, thi);
    for (std::size_t m = 0; m < MB; ++m) {
      va[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[m] + k0 + k), va[m]);
      va[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[m] + k0 + k + 8), va[m]);
    }
  }
#else
  // Portable: decode 64 weights at a time, then 8-lane dot products the compiler vectorises.
  float w[64];
  for (; k + 64 <= len; k += 64) {
    for (std::size_t j = 0; j < 32; ++j) {
      const std::uint8_t byte = src[k / 2 + j];
      w[2 * j] = table[byte >> 4];
      w[2 * j + 1] = table[byte & 15];
    }
    for (std::size_t m = 0; m < MB; ++m) {
      float lane[8] = {};
      const float* xm = x[m] + k0 + k;
      for (std::size_t j = 0; j < 64; j += 8)
        for (std::size_t l = 0; l < 8; ++l) lane[l] += w[j + l] * xm[j + l];
      float s = 0.0f;
      for (float v : lane) s += v;
      acc[m] += s;
    }
  }
#endif
  for (; k < len; ++k) {
    const std::uint8_t byte = src[k / 2];
    const float wv = table[(k % 2) ? (byte & 15) : (byte >> 4)];
    for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k0 + k];
  }
}

template <std::size_t MB>
void fused_4bit_rows(const float* const* x, const std::uint8_t* packed, const float* absmax,
                     const std::array<float, 16>& code, std::size_t K, std::size_t blocksize,
                     std::size_t n0, std::size_t n1, float* const* y) {
  for (std::size_t n = n0; n < n1; ++n) {
    float acc[MB] = {};
    fused_acc<MB> vacc;
#if defined(STOWAGE_QUANT_AVX2)
    for (std::size_t m = 0; m < MB; ++m) vacc.v[m] = _mm256_setzero_ps();
#endif
    std::size_t k = 0;
    while (k < K) {
      const std::size_t flat = n * K + k;
      const std::size_t b = flat / blocksize;
      const std::size_t len = std::min(K - k, (b + 1) * blocksize - flat);
      float table[16];
      for (std::size_t i = 0; i < 16; ++i) table[i] = code[i] * absmax[b];
      if (flat % 2 == 0) {
        fused_segment<MB>(x, k, len, packed + flat / 2, table, acc, vacc);
      } else {
        // Odd start (only when K is odd): one element from a low nibble, then byte aligned.
        const float wv = table[packed[flat / 2] & 15];
        for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k];
        if (len > 1)
          fused_segment<MB>(x, k + 1, len - 1, packed + (flat + 1) / 2, table, acc, vacc);
      }
      k += len;
    }
#if defined(STOWAGE_QUANT_AVX2)
    for (std::size_t m = 0; m < MB; ++m) acc[m] += hsum256(vacc.v[m]);
#endif
    for (std::size_t m = 0; m < MB; ++m) y[m][n] = acc[m];
  }
}

template <class RowFn>
void dispatch_batch(std::size_t M, RowFn&& fn) {
  // Calls fn.template operator()<MB>(m0) over batch chunks of at most max_fused_batch rows.
  for (std::size_t m0 = 0; m0 < M;) {
    const std::size_t r = M - m0;
    if (r >= 8) {
      fn.template operator()<8>(m0);
      m0 += 8;
    } else if (r >= 4) {
      fn.template operator()<4>(m0);
      m0 += 4;
    } else if (r >= 2) {
      fn.template operator()<2>(m0);
      m0 += 2;
    } else {
      fn.template operator()<1>(m0);
      m0 += 1;
    }
  }
}

}  // namespace detail

/// Y [M, N] = X [M, K] * W^T for a 4-bit weight W [N, K] (`packed`, float32 `absmax`). X and Y
/// are row-major float32. Rows of W are split over threads; batch rows are processed up to 8 at
/// a time so each weight byte is decoded once per 8 activations.
inline void gemm_4bit_raw(const float* x, std::size_t M, const std::uint8_t* packed,
                          const float* absmax, quant_type type, std::size_t blocksize,
                          std::size_t N, std::size_t K, float* y) {
  if (blocksize == 0 || blocksize % 2)
    throw invalid_config("gemm_4bit: blocksize must be even and > 0");
  const auto& code = code_table(type);
  detail::parallel_for(
      N, std::max<std::size_t>(1, (std::size_t{1} << 18) / std::max<std::size_t>(K, 1)),
      [&](std::size_t n0, std::size_t n1) {
        detail::dispatch_batch(M, [&]<std::size_t MB>(std::size_t m0) {
          const float* xs[MB];
          float* ys[MB];
          for (std::size_t m = 0; m < MB; ++m) {
            xs[m] = x + (m0 + m) * K;
            ys[m] = y + (m0 + m) * N;
          }
          detail::fused_4bit_rows<MB>(xs, packed, absmax, code, K, blocksize, n0, n1, ys);
        });
      });
}

// ---------------------------------------------------------------------------------------------
// LLM.int8 (formats-spec §2)

/// Row-wise int8 quantization as bitsandbytes' Int8Params does it: the row is first rounded to
/// float16 (RNE, >65504 -> inf), SCB[r] = max|row| (float32 of the fp16 value),
/// CB = round_half_even(b * f32(127 * f32(1 / SCB[r]))) (torch's scalar/tensor division). An
/// all-zero row gives zeros (CUDA's NaN -> 0 conversion). `threshold` > 0 zeroes elements with |b|
/// >= threshold before the absmax and quantization (the activation path); 0 disables it.
inline void quantize_int8_rowwise_raw(const void* in, dtype in_type, std::size_t rows,
                                      std::size_t cols, std::int8_t* cb, float* scb,
                                      float threshold = 0.0f) {
  detail::check_float_dtype(in_type, "quantize_int8");
  detail::parallel_for(
      rows, std::max<std::size_t>(1, 65536 / std::max<std::size_t>(cols, 1)),
      [&](std::size_t r0, std::size_t r1) {
        std::vector<float> b(cols);
        for (std::size_t r = r0; r < r1; ++r) {
          if (in_type == dtype::float16) {
            const auto* src = static_cast<const std::uint16_t*>(in) + r * cols;
            for (std::size_t c = 0; c < cols; ++c) b[c] = fp16_bits_to_fp32(src[c]);
          } else if (in_type == dtype::bfloat16) {
            const auto* src = static_cast<const std::uint16_t*>(in) + r * cols;
            for (std::size_t c = 0; c < cols; ++c)
              b[c] = fp16_bits_to_fp32(fp32_to_fp16_bits(bf16_bits_to_fp32(src[c])));
          } else {
            const auto* src = static_cast<const float*>(in) + r * cols;
            for (std::size_t c = 0; c < cols; ++c)
              b[c] = fp16_bits_to_fp32(fp32_to_fp16_bits(src[c]));
          }
          if (threshold > 0.0f)
            for (std::size_t c = 0; c < cols; ++c)
              if (std::fabs(b[c]) >= threshold) b[c] = 0.0f;
          float am = 0.0f;
          for (std::size_t c = 0; c < cols; ++c) am = std::fmax(am, std::fabs(b[c]));
          scb[r] = am;
          // torch evaluates `127.0 / row_stats` as 127 * (1 / row_stats) (a reciprocal, then a
          // multiply): not always the correctly rounded quotient, and the tensor bnb writes.
          const float scale = 127.0f * (1.0f / am);
          std::int8_t* dst = cb + r * cols;
          for (std::size_t c = 0; c < cols; ++c) {
            const float q = std::nearbyint(b[c] * scale);  // default rounding mode: half to even
            dst[c] = std::isnan(q) ? std::int8_t{0}
                                   : static_cast<std::int8_t>(std::clamp(q, -128.0f, 127.0f));
          }
        }
      });
}

/// bitsandbytes' int8 dequantization: w = f32(f32(CB * SCB) * float32(1/127)).
inline float int8_dequant_value(std::int8_t q, float scb) noexcept {
  return static_cast<float>(q) * scb * 7.874015718698502e-3f;
}

/// Weight-only fused int8 product: Y [M, N] = X [M, K] * (CB * SCB / 127)^T, float32 in and out,
/// accumulated as sum(X * CB) then scaled once per output (not bit-identical to dequantize then
/// multiply; within float32 rounding of it).
inline void gemm_int8_weight_only_raw(const float* x, std::size_t M, const std::int8_t* cb,
                                      const float* scb, std::size_t N, std::size_t K, float* y) {
  detail::parallel_for(
      N, std::max<std::size_t>(1, (std::size_t{1} << 18) / std::max<std::size_t>(K, 1)),
      [&](std::size_t n0, std::size_t n1) {
        detail::dispatch_batch(M, [&]<std::size_t MB>(std::size_t m0) {
          for (std::size_t n = n0; n < n1; ++n) {
            const std::int8_t* w = cb + n * K;
            float acc[MB] = {};
            std::size_t k = 0;
#if defined(STOWAGE_QUANT_AVX2)
            __m256 va[MB];
            for (std::size_t m = 0; m < MB; ++m) va[m] = _mm256_setzero_ps();
            for (; k + 8 <= K; k += 8) {
              std::int64_t word;
              std::memcpy(&word, w + k, 8);
              const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(word)));
              for (std::size_t m = 0; m < MB; ++m)
                va[m] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + (m0 + m) * K + k), va[m]);
            }
            for (std::size_t m = 0; m < MB; ++m) acc[m] = detail::hsum256(va[m]);
#else
        for (; k + 8 <= K; k += 8)
          for (std::size_t m = 0; m < MB; ++m) {
            float lane[8];
            const float* xm = x + (m0 + m) * K + k;
            for (std::size_t l = 0; l < 8; ++l) lane[l] = static_cast<float>(w[k + l]) * xm[l];
            float s = 0.0f;
            for (float v : lane) s += v;
            acc[m] += s;
          }
#endif
            for (; k < K; ++k)
              for (std::size_t m = 0; m < MB; ++m)
                acc[m] += static_cast<float>(w[k]) * x[(m0 + m) * K + k];
            const float scale = scb[n] * 7.874015718698502e-3f;
            for (std::size_t m = 0; m < MB; ++m) y[(m0 + m) * N + n] = acc[m] * scale;
          }
        });
      });
}

/// int32 product of row-quantized activations and weights: acc[m, n] = sum_k CA[m,k] * CB[n,k].
inline void int8_linear_matmul_raw(const std::int8_t* ca, std::size_t M, const std::int8_t* cb,
                                   std::size_t N, std::size_t K, std::int32_t* acc) {
  detail::parallel_for(
      N, std::max<std::size_t>(1, 65536 / std::max<std::size_t>(K, 1)),
      [&](std::size_t n0, std::size_t n1) {
        for (std::size_t n = n0; n < n1; ++n)
          for (std::size_t m = 0; m < M; ++m) {
            const std::int8_t* a = ca + m * K;
            const std::int8_t* b = cb + n * K;
            std::int32_t s = 0;  // integer sums: any order is exact, so this loop vectorises
            for (std::size_t k = 0; k < K; ++k)
              s += static_cast<std::int32_t>(a[k]) * static_cast<std::int32_t>(b[k]);
            acc[m * N + n] = s;
          }
      });
}

}  // namespace stowage::precision
