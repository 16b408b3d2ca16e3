// stowage/precision/kernels_cpu.hpp: the CPU loops behind int8/nf4/fp4: 4-bit quantize and
// dequantize (bit-exact with bitsandbytes), LLM.int8 row-wise quantization, and fused
// dequantize-and-multiply kernels for matrix-vector and small-batch products.
// Every kernel has a portable scalar version (the reference) and, on x86-64 with GCC/Clang, an
// AVX2/FMA/F16C version compiled with __attribute__((target)) and chosen at run time
// (__builtin_cpu_supports), so the library needs no -march flag and still uses AVX2 where the
// machine has it. Both produce the same bytes (tests/unit/precision_kernels_simd.cpp). Work is
// split over blocks / rows on stowage's thread pool (exec/thread_pool.hpp), chunks handed out
// dynamically so a core that another process steals does not hold the others up.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/exec/thread_pool.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/precision/quant_state.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#include <immintrin.h>
#define STOWAGE_QUANT_X86 1
// Functions compiled for AVX2 + FMA + F16C whatever the translation unit's -march; only called
// after detail::cpu_has_avx2() said yes.
#define STOWAGE_QUANT_AVX2_FN __attribute__((target("avx2,fma,f16c")))
// The fused 4-bit product also has an AVX-512 version: one vpermps holds the whole 16-entry
// table, halving the decode work per weight.
#define STOWAGE_QUANT_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#endif

namespace stowage::precision {

// ---------------------------------------------------------------------------------------------
// Threads and instruction sets

/// Threads the quantization kernels may use (0 = std::thread::hardware_concurrency()).
inline std::atomic<unsigned>& kernel_threads() {
  static std::atomic<unsigned> n{0};
  return n;
}

/// Instruction-set levels of the kernels: the portable loops, AVX2 (+FMA, F16C), AVX-512.
enum class simd_level : int { scalar = 0, avx2 = 1, avx512 = 2 };

/// The highest level the kernels may use where the CPU has it (default avx512: the best there
/// is). Lower it to run the portable reference loops or the AVX2 ones (tests compare them).
inline std::atomic<simd_level>& kernel_simd() {
  static std::atomic<simd_level> level{simd_level::avx512};
  return level;
}

namespace detail {

inline unsigned kernel_thread_count() {
  unsigned n = kernel_threads().load(std::memory_order_relaxed);
  if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

/// The CPU has AVX2, FMA and F16C (checked once).
inline bool cpu_has_avx2() noexcept {
#if defined(STOWAGE_QUANT_X86)
  static const bool yes = [] {
    __builtin_cpu_init();
    // F16C through cpuid: not every compiler's __builtin_cpu_supports knows "f16c".
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  return yes;
#else
  return false;
#endif
}

/// The CPU (and OS) support AVX-512 F/BW/VL besides AVX2 (checked once).
inline bool cpu_has_avx512() noexcept {
#if defined(STOWAGE_QUANT_X86)
  static const bool yes = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

/// Take the AVX2 path now.
inline bool use_avx2() noexcept {
  return kernel_simd().load(std::memory_order_relaxed) >= simd_level::avx2 && cpu_has_avx2();
}

/// Take the AVX-512 path now (where a kernel has one).
inline bool use_avx512() noexcept {
  return kernel_simd().load(std::memory_order_relaxed) >= simd_level::avx512 && cpu_has_avx512();
}

// Splits [0, count) into chunks of at least `grain` items and runs fn(begin, end) on up to
// kernel_thread_count() threads of exec::default_thread_pool() (the caller takes part). Chunks
// (a few per thread) are claimed from an atomic counter: on a shared machine a thread that
// loses its core leaves its remaining chunks to the others. Small jobs run inline. No
// allocation per call.
template <class Fn>
void parallel_for(std::size_t count, std::size_t grain, Fn&& fn) {
  if (count == 0) return;
  grain = std::max<std::size_t>(grain, 1);
  const std::size_t max_chunks = (count + grain - 1) / grain;
  const std::size_t threads = std::min<std::size_t>(kernel_thread_count(), max_chunks);
  if (threads <= 1) {
    fn(std::size_t{0}, count);
    return;
  }
  const std::size_t chunks = std::min<std::size_t>(max_chunks, threads * 4);
  std::atomic<std::size_t> next{0};
  exec::default_thread_pool().parallel_for(threads, 1, [&](std::size_t, std::size_t) {
    for (std::size_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(count * c / chunks, count * (c + 1) / chunks);
  });
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

// Bucket tables of the 4-bit quantize lookup (the AVX-512 path). A scaled value s in [-1, 1]
// (or NaN) falls in bucket k = floor(15.5 * s + offset), offset 15.5 for NF4 (k in 0..31) and 16
// for FP4 (s = +-0 in bucket 16, every s < 0 below it: the sign rule is a bucket edge). The SIMD
// code computes k exactly: one FMA rounded toward -inf (floor(round_down(v)) == floor(v) for
// every real v, since the integers are floats), then a truncating conversion (v >= 0 here). Buckets
// are 1 / 15.5 = 0.0645 wide, narrower than the closest NF4 thresholds (0.0796 apart) and FP4
// boundaries (0.0833, and their mirrors on the negative side), so each bucket holds at most one
// decision point (buckets_separate), and code = map[base[k] + (s > mid[k])] — the strict
// compare of the reference; mid = +inf where a bucket holds no point. The index j = base + gt
// grows with s: for NF4 it is the code (map = identity); for FP4 it is 8 + rank for s >= 0 and
// 7 - rank for s < 0, where |s| > b is s < -b, i.e. !(s > pred(-b)) with pred the next float
// toward -inf, so mid is pred(-b) there. A NaN s converts to INT_MIN, whose low 5 bits (all
// vpermt2ps reads) pick bucket 0, and fails the compare: base[0] leads to the NaN code 0 (FP4:
// j = 16, and mid[0] = -inf sends the real values there to j = 17, code 11). Outside [-1, 1]
// the tables do not apply: callers use them only when 1 / absmax is a normal float, which
// bounds |x * (1 / absmax)| by 1 (checked over every float in
// tests/unit/precision_quant_lookup.cpp).
struct bucket_tables {
  float scale = 15.5f, offset = 0.0f;
  std::array<float, 32> mid{};
  std::array<std::int32_t, 32> base{}, map{};
};

// Position of a decision point on the bucket axis, exact in double (15.5 * t needs 29 bits,
// the sum at most 42 for |t| >= 2^-9).
constexpr double bucket_position(float t, float offset) noexcept {
  return 15.5 * static_cast<double>(t) + static_cast<double>(offset);
}

constexpr bucket_tables make_bucket_tables(quant_type q) noexcept {
  constexpr float inf = std::numeric_limits<float>::infinity();
  bucket_tables t;
  t.offset = q == quant_type::nf4 ? 15.5f : 16.0f;
  for (std::size_t j = 0; j < 32; ++j) {
    if (q == quant_type::nf4)
      t.map[j] = static_cast<std::int32_t>(j & 15);
    else if (j < 8)  // s < 0, rank 7 - j
      t.map[j] = fp4_rank_to_bits[7 - j] | 8;
    else if (j < 16)  // s >= 0, rank j - 8
      t.map[j] = fp4_rank_to_bits[j - 8];
    else  // 16: NaN; 17: the real values of bucket 0 (rank 7, negative)
      t.map[j] = j == 17 ? fp4_rank_to_bits[7] | 8 : 0;
  }
  for (int k = 0; k < 32; ++k) {
    const auto kd = static_cast<double>(k);
    const auto uk = static_cast<std::size_t>(k);
    int base = 0;
    float mid = inf;
    if (q == quant_type::nf4) {
      for (float th : nf4_thresholds) {
        const double p = bucket_position(th, t.offset);
        if (p < kd) ++base;
        if (p >= kd && p < kd + 1) mid = th;
      }
    } else if (k >= 16) {  // s >= 0 (and -0.0): j = 8 + rank of s
      base = 8;
      for (float b : fp4_cuda_boundaries) {
        const double p = bucket_position(b, t.offset);
        if (p < kd) ++base;
        if (p >= kd && p < kd + 1) mid = b;
      }
    } else {  // s < 0: rank = #{b : s < -b}, j = 7 - rank
      int rank = 0;
      for (float b : fp4_cuda_boundaries) {
        const double p = bucket_position(-b, t.offset);
        if (p >= kd + 1) ++rank;
        if (p >= kd && p < kd + 1) {
          ++rank;  // s <= pred(-b) is below the point: counted
          mid = std::bit_cast<float>(std::bit_cast<std::uint32_t>(-b) + 1u);
        }
      }
      base = 7 - rank;
      if (k == 0) {  // NaN lands here, no decision point does (buckets_separate)
        base = 16;
        mid = -inf;
      }
    }
    t.mid[uk] = mid;
    t.base[uk] = base;
  }
  return t;
}

// Decision points per bucket (at most one, none in bucket 0) and buckets in range.
constexpr bool buckets_separate(quant_type q) noexcept {
  const float offset = q == quant_type::nf4 ? 15.5f : 16.0f;
  std::array<int, 32> count{};
  auto add = [&](float point) {
    const double p = bucket_position(point, offset);
    if (p < 0.0 || p >= 32.0) return false;
    ++count[static_cast<std::size_t>(p)];
    return true;
  };
  bool ok = true;
  if (q == quant_type::nf4)
    for (float th : nf4_thresholds) ok = ok && add(th);
  else
    for (float b : fp4_cuda_boundaries) ok = ok && add(b) && add(-b);
  for (std::size_t k = 0; k < 32; ++k) ok = ok && count[k] <= (k == 0 ? 0 : 1);
  return ok;
}
static_assert(buckets_separate(quant_type::nf4) && buckets_separate(quant_type::fp4),
              "make_bucket_tables: each bucket must hold at most one decision point, bucket 0 "
              "(where NaN lands) none");

inline constexpr bucket_tables nf4_buckets = make_bucket_tables(quant_type::nf4);
inline constexpr bucket_tables fp4_buckets = make_bucket_tables(quant_type::fp4);

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

// ---------------------------------------------------------------------------------------------
// AVX2 versions. Same operations in the same order as the scalar loops above (IEEE single
// multiplies and strict compares, no fused multiply-add where the scalar code rounds twice), so
// the output bytes are identical.

#if defined(STOWAGE_QUANT_X86)
namespace avx2 {

enum class in_kind { f32, bf16, f16 };

template <in_kind K>
STOWAGE_QUANT_AVX2_FN inline __m256 load8(const void* base, std::size_t i) noexcept {
  if constexpr (K == in_kind::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (K == in_kind::bf16)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);  // exact, subnormals included
  }
}

STOWAGE_QUANT_AVX2_FN inline float hmax(__m256 v) noexcept {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

STOWAGE_QUANT_AVX2_FN inline float hsum(__m256 v) noexcept {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Branch-free binary search for the NF4 code (number of thresholds strictly below s): four
// levels, each a strict compare against the threshold the previous answers select (level 2 by
// blend, levels 3 and 4 by a permute of 4 / 8 candidates). NaN fails every compare -> 0.
struct nf4_search {
  __m256 t7, t3, t11, tab4, tab8;
  STOWAGE_QUANT_AVX2_FN static nf4_search make() noexcept {
    const auto& t = nf4_thresholds;
    return {_mm256_set1_ps(t[7]), _mm256_set1_ps(t[3]), _mm256_set1_ps(t[11]),
            _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0),
            _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14])};
  }
  STOWAGE_QUANT_AVX2_FN __m256i code(__m256 s) const noexcept {
    const __m256 m1 = _mm256_cmp_ps(s, t7, _CMP_GT_OQ);
    __m256i idx = _mm256_and_si256(_mm256_castps_si256(m1), _mm256_set1_epi32(8));
    const __m256 m2 = _mm256_cmp_ps(s, _mm256_blendv_ps(t3, t11, m1), _CMP_GT_OQ);
    idx = _mm256_or_si256(idx, _mm256_and_si256(_mm256_castps_si256(m2), _mm256_set1_epi32(4)));
    const __m256 m3 =
        _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(tab4, _mm256_srli_epi32(idx, 2)), _CMP_GT_OQ);
    idx = _mm256_or_si256(idx, _mm256_and_si256(_mm256_castps_si256(m3), _mm256_set1_epi32(2)));
    const __m256 m4 =
        _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(tab8, _mm256_srli_epi32(idx, 1)), _CMP_GT_OQ);
    return _mm256_or_si256(idx, _mm256_and_si256(_mm256_castps_si256(m4), _mm256_set1_epi32(1)));
  }
};

// FP4, CUDA rule: rank of |s| among the 7 boundaries (strict >), mapped to the magnitude bits,
// plus 8 when s < 0 (false for -0.0 and NaN).
struct fp4_search {
  __m256 b3, b1, b5, tab4, absmask;
  __m256i bits;
  STOWAGE_QUANT_AVX2_FN static fp4_search make() noexcept {
    const auto& b = fp4_cuda_boundaries;
    const auto& r = fp4_rank_to_bits;
    return {_mm256_set1_ps(b[3]),
            _mm256_set1_ps(b[1]),
            _mm256_set1_ps(b[5]),
            _mm256_setr_ps(b[0], b[2], b[4], b[6], 0, 0, 0, 0),
            _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)),
            _mm256_setr_epi32(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])};
  }
  STOWAGE_QUANT_AVX2_FN __m256i code(__m256 s) const noexcept {
    const __m256 a = _mm256_and_ps(s, absmask);
    const __m256 m1 = _mm256_cmp_ps(a, b3, _CMP_GT_OQ);
    __m256i r = _mm256_and_si256(_mm256_castps_si256(m1), _mm256_set1_epi32(4));
    const __m256 m2 = _mm256_cmp_ps(a, _mm256_blendv_ps(b1, b5, m1), _CMP_GT_OQ);
    r = _mm256_or_si256(r, _mm256_and_si256(_mm256_castps_si256(m2), _mm256_set1_epi32(2)));
    const __m256 m3 =
        _mm256_cmp_ps(a, _mm256_permutevar8x32_ps(tab4, _mm256_srli_epi32(r, 1)), _CMP_GT_OQ);
    r = _mm256_or_si256(r, _mm256_and_si256(_mm256_castps_si256(m3), _mm256_set1_epi32(1)));
    const __m256 neg = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_or_si256(_mm256_permutevar8x32_epi32(bits, r),
                           _mm256_and_si256(_mm256_castps_si256(neg), _mm256_set1_epi32(8)));
  }
};

// 32 codes (four vectors of 8 int32, element order) -> 16 packed bytes, even element high.
STOWAGE_QUANT_AVX2_FN inline void pack32(__m256i c0, __m256i c1, __m256i c2, __m256i c3,
                                         std::uint8_t* dst) noexcept {
  const __m256i p8 = _mm256_packus_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // (even << 4) | odd as 16-bit sums: maddubs multiplies byte pairs by (16, 1) and adds them.
  const __m256i pairs = _mm256_maddubs_epi16(ordered, _mm256_set1_epi16(0x0110));
  const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(bytes));
}

// One full block (n a multiple of 32): absmax, then codes. Bytes equal quantize_4bit_block's.
template <quant_type Q, in_kind K, class Search>
STOWAGE_QUANT_AVX2_FN void quantize_block(const void* in, std::size_t begin, std::size_t n,
                                          const Search& search, std::uint8_t* packed,
                                          float* absmax_out) noexcept {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  for (std::size_t i = 0; i < n; i += 16) {
    // max_ps(a, m) returns m when a is NaN: NaN never wins, as in the scalar loop.
    m0 = _mm256_max_ps(_mm256_and_ps(load8<K>(in, begin + i), absmask), m0);
    m1 = _mm256_max_ps(_mm256_and_ps(load8<K>(in, begin + i + 8), absmask), m1);
  }
  const float am = hmax(_mm256_max_ps(m0, m1));
  *absmax_out = am;
  const __m256 inv = _mm256_set1_ps(1.0f / am);
  std::uint8_t* dst = packed + begin / 2;
  for (std::size_t i = 0; i < n; i += 32) {
    const __m256i c0 = search.code(_mm256_mul_ps(load8<K>(in, begin + i), inv));
    const __m256i c1 = search.code(_mm256_mul_ps(load8<K>(in, begin + i + 8), inv));
    const __m256i c2 = search.code(_mm256_mul_ps(load8<K>(in, begin + i + 16), inv));
    const __m256i c3 = search.code(_mm256_mul_ps(load8<K>(in, begin + i + 24), inv));
    pack32(c0, c1, c2, c3, dst + i / 2);
  }
}

template <quant_type Q, in_kind K>
STOWAGE_QUANT_AVX2_FN void quantize_blocks(const void* in, std::size_t blocksize, std::size_t b0,
                                           std::size_t b1, std::uint8_t* packed,
                                           float* absmax) noexcept {
  if constexpr (Q == quant_type::nf4) {
    const auto search = nf4_search::make();
    for (std::size_t b = b0; b < b1; ++b)
      quantize_block<Q, K>(in, b * blocksize, blocksize, search, packed, absmax + b);
  } else {
    const auto search = fp4_search::make();
    for (std::size_t b = b0; b < b1; ++b)
      quantize_block<Q, K>(in, b * blocksize, blocksize, search, packed, absmax + b);
  }
}

template <quant_type Q>
STOWAGE_QUANT_AVX2_FN void quantize_blocks_any(const void* in, dtype t, std::size_t blocksize,
                                               std::size_t b0, std::size_t b1, std::uint8_t* packed,
                                               float* absmax) noexcept {
  if (t == dtype::float32)
    quantize_blocks<Q, in_kind::f32>(in, blocksize, b0, b1, packed, absmax);
  else if (t == dtype::bfloat16)
    quantize_blocks<Q, in_kind::bf16>(in, blocksize, b0, b1, packed, absmax);
  else
    quantize_blocks<Q, in_kind::f16>(in, blocksize, b0, b1, packed, absmax);
}

// ---- AVX-512 quantization: 16 lanes, the binary search through per-level 16-entry tables
// (vpermps reads each lane's threshold by the code so far), compares into mask registers. The
// maskz forms with a full mask are the plain instructions; GCC 12's unmasked intrinsics pass an
// "undefined" register that trips -Wmaybe-uninitialized (GCC PR 105593).

inline constexpr __mmask16 all16 = 0xffff;

template <in_kind K>
STOWAGE_QUANT_AVX512_FN inline __m512 load16(const void* base, std::size_t i) noexcept {
  if constexpr (K == in_kind::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + i));
    if constexpr (K == in_kind::bf16)
      return _mm512_castsi512_ps(
          _mm512_maskz_slli_epi32(all16, _mm512_maskz_cvtepu16_epi32(all16, h), 16));
    else
      return _mm512_maskz_cvtph_ps(all16, h);
  }
}

STOWAGE_QUANT_AVX512_FN inline float hmax512(__m512 v) noexcept {
  const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 0));
  const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 1));
  return hmax(_mm256_max_ps(lo, hi));
}

// Search tables: entry i of level L holds the threshold compared when the code so far is i.
struct search512 {
  __m512 first, l2, l3, l4;
  __m512i bits;
  bool fp4;
  STOWAGE_QUANT_AVX512_FN static search512 make(quant_type q) noexcept {
    alignas(64) float t2[16], t3[16], t4[16];
    alignas(64) std::int32_t bits[16] = {};
    search512 s{};
    s.fp4 = q == quant_type::fp4;
    if (!s.fp4) {
      const auto& t = nf4_thresholds;  // codes 0..15: levels 8, 4, 2, 1
      for (std::size_t i = 0; i < 16; ++i) {
        t2[i] = t[std::min<std::size_t>(i + 3, 14)];
        t3[i] = t[std::min<std::size_t>(i + 1, 14)];
        t4[i] = t[std::min<std::size_t>(i, 14)];
      }
      s.first = _mm512_set1_ps(t[7]);
    } else {
      const auto& b = fp4_cuda_boundaries;  // ranks 0..7 of |s|: levels 4, 2, 1
      for (std::size_t i = 0; i < 16; ++i) {
        t2[i] = b[std::min<std::size_t>(i + 1, 6)];
        t3[i] = b[std::min<std::size_t>(i, 6)];
        t4[i] = 0.0f;
        bits[i] = fp4_rank_to_bits[i % 8];
      }
      s.first = _mm512_set1_ps(b[3]);
    }
    s.l2 = _mm512_load_ps(t2);
    s.l3 = _mm512_load_ps(t3);
    s.l4 = _mm512_load_ps(t4);
    s.bits = _mm512_load_si512(bits);
    return s;
  }
  STOWAGE_QUANT_AVX512_FN static __m512i step(__m512 v, __m512 table, __m512i idx,
                                              std::int32_t add) noexcept {
    const __mmask16 gt =
        _mm512_cmp_ps_mask(v, _mm512_maskz_permutexvar_ps(all16, idx, table), _CMP_GT_OQ);
    return _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(add));
  }
  STOWAGE_QUANT_AVX512_FN __m512i code(__m512 s) const noexcept {
    if (!fp4) {
      __m512i idx =
          _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, first, _CMP_GT_OQ), _mm512_set1_epi32(8));
      idx = step(s, l2, idx, 4);
      idx = step(s, l3, idx, 2);
      return step(s, l4, idx, 1);
    }
    const __m512 a = _mm512_abs_ps(s);
    __m512i r =
        _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, first, _CMP_GT_OQ), _mm512_set1_epi32(4));
    r = step(a, l2, r, 2);
    r = step(a, l3, r, 1);
    const __m512i mag = _mm512_maskz_permutexvar_epi32(all16, r, bits);
    const __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(mag, neg, mag, _mm512_set1_epi32(8));
  }
};

// The bucket lookup (make_bucket_tables): 16 codes for 16 scaled values in [-1, 1] or NaN.
// Bucket: FMA rounded toward -inf, then truncation (exact floor, as the value is >= 0);
// vpermt2ps / vpermt2d read its low 5 bits. Six instructions per 16 values for NF4, seven for FP4
// (the map from the monotone index to the nibble), where the search takes eleven.
template <bool Map>
struct lookup512 {
  __m512 scale, offset, mid0, mid1;
  __m512i base0, base1, map0, map1;
  STOWAGE_QUANT_AVX512_FN static lookup512 make(const bucket_tables& t) noexcept {
    return {_mm512_set1_ps(t.scale),           _mm512_set1_ps(t.offset),
            _mm512_loadu_ps(t.mid.data()),     _mm512_loadu_ps(t.mid.data() + 16),
            _mm512_loadu_si512(t.base.data()), _mm512_loadu_si512(t.base.data() + 16),
            _mm512_loadu_si512(t.map.data()),  _mm512_loadu_si512(t.map.data() + 16)};
  }
  STOWAGE_QUANT_AVX512_FN __m512i code(__m512 s) const noexcept {
    // floor(round_down(v)) is the truncation here: v >= 0 over the domain (NaN -> INT_MIN).
    const __m512i k = _mm512_maskz_cvttps_epi32(
        all16, _mm512_fmadd_round_ps(s, scale, offset, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    const __m512 mid = _mm512_permutex2var_ps(mid0, k, mid1);
    __m512i j = _mm512_permutex2var_epi32(base0, k, base1);
    j = _mm512_mask_add_epi32(j, _mm512_cmp_ps_mask(s, mid, _CMP_GT_OQ), j, _mm512_set1_epi32(1));
    if constexpr (Map) j = _mm512_permutex2var_epi32(map0, j, map1);
    return j;
  }
};

// 64 codes (four vectors of 16 int32 in element order, values 0..15) -> 32 packed bytes, even
// element high. Per 128-bit lane l the two saturating packs give the bytes of elements
// 4l..4l+3 of c0, c1, c2, c3 in turn; maddubs makes (even << 4) | odd of each adjacent pair,
// so word 8l + 2v + e is output byte 8v + 2l + e; one vpermw puts it there, vpmovwb narrows.
inline constexpr std::array<std::int16_t, 32> pack64_order = [] {
  std::array<std::int16_t, 32> order{};
  for (int q = 0; q < 32; ++q)
    order[static_cast<std::size_t>(q)] =
        static_cast<std::int16_t>(8 * ((q % 8) / 2) + 2 * (q / 8) + q % 2);
  return order;
}();

STOWAGE_QUANT_AVX512_FN inline void pack64_512(__m512i c0, __m512i c1, __m512i c2, __m512i c3,
                                               std::uint8_t* dst) noexcept {
  constexpr __mmask32 all32 = 0xffffffffu;
  const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
  const __m512i w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(0x0110));
  const __m512i ordered =
      _mm512_maskz_permutexvar_epi16(all32, _mm512_loadu_si512(pack64_order.data()), w);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_maskz_cvtepi16_epi8(all32, ordered));
}

// 32 codes (two vectors of 16 int32) -> 16 packed bytes, even element high.
STOWAGE_QUANT_AVX512_FN inline void pack32_512(__m512i c0, __m512i c1, std::uint8_t* dst) noexcept {
  const __m128i b0 = _mm512_maskz_cvtepi32_epi8(all16, c0),
                b1 = _mm512_maskz_cvtepi32_epi8(all16, c1);
  const __m128i pairs = _mm_set1_epi16(0x0110);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi16(_mm_maddubs_epi16(b0, pairs), _mm_maddubs_epi16(b1, pairs)));
}

// Block absmax accumulation: 16 running maxima of |x| over the block.
template <in_kind K>
STOWAGE_QUANT_AVX512_FN inline __m512 block_max16(const void* in, std::size_t begin,
                                                  std::size_t blocksize) noexcept {
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  if constexpr (K == in_kind::bf16) {
    // 32 bf16 per load, |x| by clearing both sign bits; the even elements become floats by a
    // shift, the odd ones by clearing their low neighbour (order does not matter for a max).
    const auto* p = static_cast<const std::uint16_t*>(in) + begin;
    for (std::size_t i = 0; i < blocksize; i += 32) {
      const __m512i v = _mm512_and_si512(_mm512_loadu_si512(p + i), _mm512_set1_epi32(0x7fff7fff));
      m0 = _mm512_maskz_max_ps(all16, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), m0);
      m1 = _mm512_maskz_max_ps(
          all16, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))), m1);
    }
  } else {
    for (std::size_t i = 0; i < blocksize; i += 32) {
      // max(a, m) returns m when a is NaN: NaN never wins, as in the scalar loop.
      m0 = _mm512_maskz_max_ps(all16, _mm512_abs_ps(load16<K>(in, begin + i)), m0);
      m1 = _mm512_maskz_max_ps(all16, _mm512_abs_ps(load16<K>(in, begin + i + 16)), m1);
    }
  }
  return _mm512_maskz_max_ps(all16, m0, m1);
}

// Codes of one block given 1 / absmax. The lookup needs |s| <= 1, which holds when 1 / absmax
// is a normal float; blocks with a zero, tiny or huge absmax (s = NaN / inf, or an inexact
// reciprocal that can push s above 1) take the search.
template <in_kind K, quant_type Q>
STOWAGE_QUANT_AVX512_FN inline void block_codes_512(const void* in, std::size_t begin,
                                                    std::size_t blocksize, float inv_s,
                                                    const lookup512<Q == quant_type::fp4>& lookup,
                                                    const search512& search,
                                                    std::uint8_t* dst) noexcept {
  const __m512 inv = _mm512_set1_ps(inv_s);
  if (K == in_kind::bf16 && std::isnormal(inv_s)) {
    // bf16: the even and odd elements of 32 as two float vectors (a shift, a mask), so one
    // lane of each holds a pair: (even << 4) | odd is the packed byte, in order.
    const auto* p = static_cast<const std::uint16_t*>(in) + begin;
    for (std::size_t i = 0; i < blocksize; i += 32) {
      const __m512i v = _mm512_loadu_si512(p + i);
      const __m512i even =
          lookup.code(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), inv));
      const __m512i odd = lookup.code(
          _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))), inv));
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(dst + i / 2),
          _mm512_maskz_cvtepi32_epi8(all16, _mm512_or_si512(_mm512_slli_epi32(even, 4), odd)));
    }
  } else if (std::isnormal(inv_s)) {
    for (std::size_t i = 0; i < blocksize; i += 64)
      pack64_512(lookup.code(_mm512_mul_ps(load16<K>(in, begin + i), inv)),
                 lookup.code(_mm512_mul_ps(load16<K>(in, begin + i + 16), inv)),
                 lookup.code(_mm512_mul_ps(load16<K>(in, begin + i + 32), inv)),
                 lookup.code(_mm512_mul_ps(load16<K>(in, begin + i + 48), inv)), dst + i / 2);
  } else {
    for (std::size_t i = 0; i < blocksize; i += 32)
      pack32_512(search.code(_mm512_mul_ps(load16<K>(in, begin + i), inv)),
                 search.code(_mm512_mul_ps(load16<K>(in, begin + i + 16), inv)), dst + i / 2);
  }
}

// Blocks b0..b1 (whole, blocksize a multiple of 64). Four blocks at a time share the horizontal
// reduction of their maxima (three rounds of shuffles for all four instead of four per block)
// and one vector division for their reciprocals (IEEE, equal to the scalar 1.0f / absmax).
template <in_kind K, quant_type Q>
STOWAGE_QUANT_AVX512_FN void quantize_blocks_512(const void* in, std::size_t blocksize,
                                                 std::size_t b0, std::size_t b1,
                                                 std::uint8_t* packed, float* absmax) noexcept {
  const search512 search = search512::make(Q);
  const auto lookup =
      lookup512<Q == quant_type::fp4>::make(Q == quant_type::nf4 ? nf4_buckets : fp4_buckets);
  const __m512i lane_firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  std::size_t b = b0;
  for (; b + 4 <= b1; b += 4) {
    const std::size_t begin = b * blocksize;
    const __m512 m0 = block_max16<K>(in, begin, blocksize);
    const __m512 m1 = block_max16<K>(in, begin + blocksize, blocksize);
    const __m512 m2 = block_max16<K>(in, begin + 2 * blocksize, blocksize);
    const __m512 m3 = block_max16<K>(in, begin + 3 * blocksize, blocksize);
    // 128-bit lanes 0-1 of a01 reduce m0, 2-3 reduce m1; then lane j reduces block j.
    const __m512 a01 = _mm512_maskz_max_ps(all16, _mm512_shuffle_f32x4(m0, m1, 0x44),
                                           _mm512_shuffle_f32x4(m0, m1, 0xee));
    const __m512 a23 = _mm512_maskz_max_ps(all16, _mm512_shuffle_f32x4(m2, m3, 0x44),
                                           _mm512_shuffle_f32x4(m2, m3, 0xee));
    __m512 r = _mm512_maskz_max_ps(all16, _mm512_shuffle_f32x4(a01, a23, 0x88),
                                   _mm512_shuffle_f32x4(a01, a23, 0xdd));
    r = _mm512_maskz_max_ps(all16, r, _mm512_permute_ps(r, 0x4e));
    r = _mm512_maskz_max_ps(all16, r, _mm512_permute_ps(r, 0xb1));
    const __m512 inv = _mm512_maskz_div_ps(all16, _mm512_set1_ps(1.0f), r);
    alignas(16) float invs[4];
    _mm_storeu_ps(absmax + b,
                  _mm512_castps512_ps128(_mm512_maskz_permutexvar_ps(all16, lane_firsts, r)));
    _mm_store_ps(invs,
                 _mm512_castps512_ps128(_mm512_maskz_permutexvar_ps(all16, lane_firsts, inv)));
    for (std::size_t j = 0; j < 4; ++j)
      block_codes_512<K, Q>(in, begin + j * blocksize, blocksize, invs[j], lookup, search,
                            packed + (begin + j * blocksize) / 2);
  }
  for (; b < b1; ++b) {
    const std::size_t begin = b * blocksize;
    const float am = hmax512(block_max16<K>(in, begin, blocksize));
    absmax[b] = am;
    block_codes_512<K, Q>(in, begin, blocksize, 1.0f / am, lookup, search, packed + begin / 2);
  }
}

STOWAGE_QUANT_AVX512_FN inline void quantize_blocks_512_any(const void* in, dtype t, quant_type q,
                                                            std::size_t blocksize, std::size_t b0,
                                                            std::size_t b1, std::uint8_t* packed,
                                                            float* absmax) noexcept {
  auto run = [&]<in_kind K>() {
    if (q == quant_type::nf4)
      quantize_blocks_512<K, quant_type::nf4>(in, blocksize, b0, b1, packed, absmax);
    else
      quantize_blocks_512<K, quant_type::fp4>(in, blocksize, b0, b1, packed, absmax);
  };
  if (t == dtype::float32)
    run.template operator()<in_kind::f32>();
  else if (t == dtype::bfloat16)
    run.template operator()<in_kind::bf16>();
  else
    run.template operator()<in_kind::f16>();
}

// 8 consecutive codes from the 4 bytes at src as int32 lanes (bits 0-3 valid; higher bits are
// other codes): one broadcast and one variable shift. permutevar8x32 reads bits 0-2 only, and
// bit 3 (which half of the table) is moved to the sign bit for the blend.
STOWAGE_QUANT_AVX2_FN inline __m256 decode8(const std::uint8_t* src, __m256 tlo, __m256 thi,
                                            __m256i shifts) noexcept {
  std::int32_t word;
  std::memcpy(&word, src, 4);
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

STOWAGE_QUANT_AVX2_FN inline __m256i nibble_shifts() noexcept {
  return _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
}

// A 32-byte store; Stream: as two 16-byte non-temporal stores (dst 16-byte aligned), which
// skip the read-for-ownership of lines the output fully overwrites (callers fence).
template <bool Stream>
STOWAGE_QUANT_AVX2_FN inline void store32(void* dst, __m256i v) noexcept {
  if constexpr (Stream) {
    _mm_stream_si128(static_cast<__m128i*>(dst), _mm256_castsi256_si128(v));
    _mm_stream_si128(static_cast<__m128i*>(dst) + 1, _mm256_extracti128_si256(v, 1));
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(dst), v);
  }
}

// Dequantize `len` elements (a multiple of 64, starting at an even flat index) of one block to
// float32: the block's 16 products f32(code * absmax) in two registers, 8 outputs per step.
template <bool Stream>
STOWAGE_QUANT_AVX2_FN inline void dequant_f32(const std::uint8_t* src, std::size_t len,
                                              const float* code, float am, float* dst) noexcept {
  const __m256 a = _mm256_set1_ps(am);
  const __m256 tlo = _mm256_mul_ps(_mm256_loadu_ps(code), a);
  const __m256 thi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), a);
  const __m256i sh = nibble_shifts();
  for (std::size_t i = 0; i < len; i += 16) {
    store32<Stream>(dst + i, _mm256_castps_si256(decode8(src + i / 2, tlo, thi, sh)));
    store32<Stream>(dst + i + 8, _mm256_castps_si256(decode8(src + i / 2 + 4, tlo, thi, sh)));
  }
}

// RNE to bfloat16 as fp32_to_bf16_bits: (u + 0x7fff + ((u >> 16) & 1)) >> 16; NaN -> 0xffff.
STOWAGE_QUANT_AVX2_FN inline __m256i bf16_bits8(__m256 v) noexcept {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0xffff), nan);
}

// The block's 16 output values as 16-bit patterns, split into a low-byte table (low 128 bits)
// and a high-byte table (high 128 bits), for byte shuffles.
STOWAGE_QUANT_AVX2_FN inline __m256i table16(const float* code, float am, bool bf16) noexcept {
  const __m256 a = _mm256_set1_ps(am);
  const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(code), a);
  const __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), a);
  __m256i t;
  if (bf16) {
    t = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi)), 0xd8);
  } else {
    // F16C rounds to nearest even with subnormals and overflow to inf; a NaN keeps its sign and
    // top payload bits and gets the quiet bit, as fp32_to_fp16_bits.
    t = _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                         _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2,
                                         4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, split), 0xd8);
}

// Dequantize `len` elements (a multiple of 64) of one block to 16-bit values through the byte
// tables: two shuffles give the low and high bytes of 32 outputs at once.
template <bool Stream>
STOWAGE_QUANT_AVX2_FN inline void dequant_16(const std::uint8_t* src, std::size_t len,
                                             const float* code, float am, bool bf16,
                                             std::uint16_t* dst) noexcept {
  const __m256i tables = table16(code, am, bf16);
  const __m256i lot = _mm256_permute2x128_si256(tables, tables, 0x00);
  const __m256i hit = _mm256_permute2x128_si256(tables, tables, 0x11);
  const __m256i mask = _mm256_set1_epi8(0x0f);
  for (std::size_t i = 0; i < len; i += 64) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i / 2));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i lo = _mm256_and_si256(v, mask);
    // In-lane interleave: e0 holds elements 0-15 (lane 0) and 32-47 (lane 1), e1 16-31 / 48-63.
    const __m256i e0 = _mm256_unpacklo_epi8(hi, lo), e1 = _mm256_unpackhi_epi8(hi, lo);
    const __m256i l0 = _mm256_shuffle_epi8(lot, e0), h0 = _mm256_shuffle_epi8(hit, e0);
    const __m256i l1 = _mm256_shuffle_epi8(lot, e1), h1 = _mm256_shuffle_epi8(hit, e1);
    const __m256i a0 = _mm256_unpacklo_epi8(l0, h0), a1 = _mm256_unpackhi_epi8(l0, h0);
    const __m256i b0 = _mm256_unpacklo_epi8(l1, h1), b1 = _mm256_unpackhi_epi8(l1, h1);
    std::uint16_t* d = dst + i;
    store32<Stream>(d, _mm256_permute2x128_si256(a0, a1, 0x20));       // 0-15
    store32<Stream>(d + 16, _mm256_permute2x128_si256(b0, b1, 0x20));  // 16-31
    store32<Stream>(d + 32, _mm256_permute2x128_si256(a0, a1, 0x31));  // 32-47
    store32<Stream>(d + 48, _mm256_permute2x128_si256(b0, b1, 0x31));  // 48-63
  }
}

}  // namespace avx2
#endif

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
  const std::size_t full = numel / blocksize;
  const bool simd = detail::use_avx2(), simd512 = detail::use_avx512();
  const std::size_t grain = std::max<std::size_t>(1, (std::size_t{1} << 16) / blocksize);
  detail::parallel_for(blocks, grain, [&](std::size_t b0, std::size_t b1) {
    std::size_t b = b0;
#if defined(STOWAGE_QUANT_X86)
    // Full blocks (a multiple of 64 elements) on AVX2; a partial last block below.
    if (simd512 && b0 < full) {
      const std::size_t e = std::min(b1, full);
      detail::avx2::quantize_blocks_512_any(in, in_type, type, blocksize, b0, e, packed, absmax);
      b = e;
    } else if (simd && b0 < full) {
      const std::size_t e = std::min(b1, full);
      if (type == quant_type::nf4)
        detail::avx2::quantize_blocks_any<quant_type::nf4>(in, in_type, blocksize, b0, e, packed,
                                                           absmax);
      else
        detail::avx2::quantize_blocks_any<quant_type::fp4>(in, in_type, blocksize, b0, e, packed,
                                                           absmax);
      b = e;
    }
#else
    (void)simd;
    (void)simd512;
    (void)full;
#endif
    for (; b < b1; ++b) {
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

// Scalar dequantization of flat elements [begin, end) of block b (begin even).
template <class Out, class Convert>
void dequantize_4bit_span(const std::uint8_t* packed, float am, const std::array<float, 16>& code,
                          std::size_t begin, std::size_t end, Out* out, Convert convert) {
  // f32(code * absmax) rounded to the output type: the same 16 values for the whole block.
  Out table[16];
  for (int i = 0; i < 16; ++i) table[i] = convert(code[static_cast<std::size_t>(i)] * am);
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

template <class Out, class Convert>
void dequantize_4bit_blocks(const std::uint8_t* packed, const float* absmax, std::size_t numel,
                            const std::array<float, 16>& code, std::size_t blocksize, Out* out,
                            Convert convert, [[maybe_unused]] int simd_kind) {
  const std::size_t blocks = (numel + blocksize - 1) / blocksize;
  const std::size_t grain = std::max<std::size_t>(1, (std::size_t{1} << 16) / blocksize);
  // Outputs larger than half of a typical last-level cache are written with non-temporal
  // stores: they would not stay cached for the reader anyway, and streaming saves the read of
  // every output line before it is overwritten (a third of the memory traffic for fp32 out).
  [[maybe_unused]] const bool stream = simd_kind != 0 &&
                                       numel * sizeof(Out) >= (std::size_t{16} << 20) &&
                                       reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  parallel_for(blocks, grain, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t b = b0; b < b1; ++b) {
      const std::size_t begin = b * blocksize, end = std::min(numel, begin + blocksize);
      std::size_t done = begin;
#if defined(STOWAGE_QUANT_X86)
      // AVX2 over the block's whole 64-element groups (every block but a short last one); the
      // tail, if any, takes the scalar loop with the same products.
      const std::size_t vec = (end - begin) / 64 * 64;
      if (simd_kind != 0 && vec != 0) {
        if constexpr (sizeof(Out) == 4) {
          if (stream)
            avx2::dequant_f32<true>(packed + begin / 2, vec, code.data(), absmax[b], out + begin);
          else
            avx2::dequant_f32<false>(packed + begin / 2, vec, code.data(), absmax[b], out + begin);
        } else {
          if (stream)
            avx2::dequant_16<true>(packed + begin / 2, vec, code.data(), absmax[b], simd_kind == 2,
                                   out + begin);
          else
            avx2::dequant_16<false>(packed + begin / 2, vec, code.data(), absmax[b], simd_kind == 2,
                                    out + begin);
        }
        done = begin + vec;
      }
#endif
      if (done < end) dequantize_4bit_span(packed, absmax[b], code, done, end, out, convert);
    }
#if defined(STOWAGE_QUANT_X86)
    if (stream) _mm_sfence();  // streamed stores visible before the join
#endif
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
  // SIMD kind: 0 scalar, 1 AVX2 fp32/fp16, 2 AVX2 bf16. Blocks must start byte aligned on a
  // 64-element grid for the vector loops: block sizes that are multiples of 64 (all of bnb's).
  const bool simd = detail::use_avx2() && blocksize % 64 == 0;
  if (out_type == dtype::float32)
    detail::dequantize_4bit_blocks(
        packed, absmax, numel, code, blocksize, static_cast<float*>(out), [](float v) { return v; },
        simd ? 1 : 0);
  else if (out_type == dtype::bfloat16)
    detail::dequantize_4bit_blocks(
        packed, absmax, numel, code, blocksize, static_cast<std::uint16_t*>(out),
        [](float v) { return fp32_to_bf16_bits(v); }, simd ? 2 : 0);
  else
    detail::dequantize_4bit_blocks(
        packed, absmax, numel, code, blocksize, static_cast<std::uint16_t*>(out),
        [](float v) { return fp32_to_fp16_bits(v); }, simd ? 1 : 0);
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

// acc[m] += sum_{k in [k0,k0+len)} X[m, k] * table[code(k)] for one block segment whose first
// flat element is even (byte aligned). Portable: decode 64 weights at a time, then 8-lane dot
// products the compiler vectorises.
template <std::size_t MB>
void fused_segment(const float* const* x, std::size_t k0, std::size_t len, const std::uint8_t* src,
                   const float* table, float* acc) {
  std::size_t k = 0;
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
    std::size_t k = 0;
    while (k < K) {
      const std::size_t flat = n * K + k;
      const std::size_t b = flat / blocksize;
      const std::size_t len = std::min(K - k, (b + 1) * blocksize - flat);
      float table[16];
      for (std::size_t i = 0; i < 16; ++i) table[i] = code[i] * absmax[b];
      if (flat % 2 == 0) {
        fused_segment<MB>(x, k, len, packed + flat / 2, table, acc);
      } else {
        // Odd start (only when K is odd): one element from a low nibble, then byte aligned.
        const float wv = table[packed[flat / 2] & 15];
        for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k];
        if (len > 1) fused_segment<MB>(x, k + 1, len - 1, packed + (flat + 1) / 2, table, acc);
      }
      k += len;
    }
    for (std::size_t m = 0; m < MB; ++m) y[m][n] = acc[m];
  }
}

#if defined(STOWAGE_QUANT_X86)
namespace avx2 {

// The fused rows on AVX2: per block segment, the 16 products code * absmax sit in two
// registers; 32 weights are decoded per step (broadcast + variable shift + two permutes + blend
// per 8) and multiplied into MB batch rows. A single batch row gets four independent
// accumulators so the FMA latency does not serialise the loop.
template <std::size_t MB>
STOWAGE_QUANT_AVX2_FN void fused_4bit_rows(const float* const* x, const std::uint8_t* packed,
                                           const float* absmax, const float* code, std::size_t K,
                                           std::size_t blocksize, std::size_t n0, std::size_t n1,
                                           std::size_t kb, std::size_t ke, bool accumulate,
                                           float* const* y) noexcept {
  // Independent accumulators: enough FMA chains to cover the FMA latency, within 16 registers.
  constexpr std::size_t NA = MB <= 2 ? 4 : MB == 4 ? 2 : 1;
  const __m256 clo = _mm256_loadu_ps(code), chi = _mm256_loadu_ps(code + 8);
  const __m256i sh = nibble_shifts();
  for (std::size_t n = n0; n < n1; ++n) {
    __m256 va[MB][NA];
    for (std::size_t m = 0; m < MB; ++m)
      for (std::size_t a = 0; a < NA; ++a) va[m][a] = _mm256_setzero_ps();
    float acc[MB] = {};
    // One division a row: then walk the blocks the row touches.
    std::size_t k = kb, b = (n * K + kb) / blocksize, block_end = (b + 1) * blocksize - n * K;
    while (k < ke) {
      std::size_t flat = n * K + k;
      const std::size_t end = std::min(ke, block_end);
      const float am = absmax[b];
      if (flat % 2) {  // odd start (odd K): one low nibble, then byte aligned
        const float wv = code[packed[flat / 2] & 15] * am;
        for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k];
        ++k;
        ++flat;
      }
      const __m256 av = _mm256_set1_ps(am);
      const __m256 tlo = _mm256_mul_ps(clo, av), thi = _mm256_mul_ps(chi, av);
      const std::uint8_t* src = packed + flat / 2;
      const std::size_t cnt = end - k;
      std::size_t j = 0;
      for (; j + 32 <= cnt; j += 32) {
        const __m256 w[4] = {
            decode8(src + j / 2, tlo, thi, sh), decode8(src + j / 2 + 4, tlo, thi, sh),
            decode8(src + j / 2 + 8, tlo, thi, sh), decode8(src + j / 2 + 12, tlo, thi, sh)};
        for (std::size_t m = 0; m < MB; ++m) {
          const float* xm = x[m] + k + j;
          for (std::size_t q = 0; q < 4; ++q)
            va[m][q % NA] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xm + 8 * q), va[m][q % NA]);
        }
      }
      for (; j + 8 <= cnt; j += 8) {
        const __m256 w = decode8(src + j / 2, tlo, thi, sh);
        for (std::size_t m = 0; m < MB; ++m)
          va[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[m] + k + j), va[m][0]);
      }
      for (; j < cnt; ++j) {
        const std::uint8_t byte = src[j / 2];
        const float wv = code[(j % 2) ? (byte & 15) : (byte >> 4)] * am;
        for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k + j];
      }
      k = end;
      ++b;
      block_end += blocksize;
    }
    for (std::size_t m = 0; m < MB; ++m) {
      __m256 s = va[m][0];
      for (std::size_t a = 1; a < NA; ++a) s = _mm256_add_ps(s, va[m][a]);
      y[m][n] = (accumulate ? y[m][n] : 0.0f) + (acc[m] + hsum(s));
    }
  }
}

// 16 codes from the 8 bytes at src looked up in a 16-entry table (see fused_4bit_rows_512).
STOWAGE_QUANT_AVX512_FN inline __m512 decode16(const std::uint8_t* src, __m512 table, __m512i sel,
                                               __m512i sh) noexcept {
  // The maskz forms with a full mask are the same instructions; the unmasked intrinsics of GCC
  // 12 pass an "undefined" register that trips -Wmaybe-uninitialized (GCC PR 105593).
  constexpr __mmask16 all = 0xffff;
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
  const __m512i idx = _mm512_maskz_srlv_epi32(
      all, _mm512_maskz_permutexvar_epi32(all, sel, _mm512_zextsi128_si512(raw)), sh);
  return _mm512_maskz_permutexvar_ps(all, idx, table);
}

// Sum of the 16 lanes (pairwise through the 256-bit halves).
STOWAGE_QUANT_AVX512_FN inline float hsum512(__m512 v) noexcept {
  const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 0));
  const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(lo, hi));
}

// The fused rows on AVX-512: 16 weights per step from 8 packed bytes (a dword permute puts
// the two 4-byte halves in the two halves of the register, a variable shift brings each code to
// its lane's low bits, and vpermps, which reads the low 4 bits, looks up the 16-entry table).
template <std::size_t MB>
STOWAGE_QUANT_AVX512_FN void fused_4bit_rows_512(const float* const* x, const std::uint8_t* packed,
                                                 const float* absmax, const float* code,
                                                 std::size_t K, std::size_t blocksize,
                                                 std::size_t n0, std::size_t n1, std::size_t kb,
                                                 std::size_t ke, bool accumulate,
                                                 float* const* y) noexcept {
  // Independent accumulators: at least 16 FMA chains in flight (32 registers).
  constexpr std::size_t NA = MB <= 4 ? 4 : 2;
  const __m512 code16 = _mm512_loadu_ps(code);
  const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i sh = _mm512_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24, 4, 0, 12, 8, 20, 16, 28, 24);
  for (std::size_t n = n0; n < n1; ++n) {
    __m512 va[MB][NA];
    for (std::size_t m = 0; m < MB; ++m)
      for (std::size_t a = 0; a < NA; ++a) va[m][a] = _mm512_setzero_ps();
    float acc[MB] = {};
    // One division a row: then walk the blocks the row touches.
    std::size_t k = kb, b = (n * K + kb) / blocksize, block_end = (b + 1) * blocksize - n * K;
    while (k < ke) {
      std::size_t flat = n * K + k;
      const std::size_t end = std::min(ke, block_end);
      const float am = absmax[b];
      if (flat % 2) {  // odd start (odd K): one low nibble, then byte aligned
        const float wv = code[packed[flat / 2] & 15] * am;
        for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k];
        ++k;
        ++flat;
      }
      const __m512 table = _mm512_mul_ps(code16, _mm512_set1_ps(am));
      const std::uint8_t* src = packed + flat / 2;
      const std::size_t cnt = end - k;
      std::size_t j = 0;
      for (; j + 64 <= cnt; j += 64) {
        __m512 w[4];
        for (std::size_t q = 0; q < 4; ++q) w[q] = decode16(src + j / 2 + 8 * q, table, sel, sh);
        for (std::size_t m = 0; m < MB; ++m) {
          const float* xm = x[m] + k + j;
          for (std::size_t q = 0; q < 4; ++q)
            va[m][q % NA] = _mm512_fmadd_ps(w[q], _mm512_loadu_ps(xm + 16 * q), va[m][q % NA]);
        }
      }
      for (; j + 16 <= cnt; j += 16) {
        const __m512 w = decode16(src + j / 2, table, sel, sh);
        for (std::size_t m = 0; m < MB; ++m)
          va[m][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[m] + k + j), va[m][0]);
      }
      for (; j < cnt; ++j) {
        const std::uint8_t byte = src[j / 2];
        const float wv = code[(j % 2) ? (byte & 15) : (byte >> 4)] * am;
        for (std::size_t m = 0; m < MB; ++m) acc[m] += wv * x[m][k + j];
      }
      k = end;
      ++b;
      block_end += blocksize;
    }
    for (std::size_t m = 0; m < MB; ++m) {
      __m512 s = va[m][0];
      for (std::size_t a = 1; a < NA; ++a) s = _mm512_add_ps(s, va[m][a]);
      y[m][n] = (accumulate ? y[m][n] : 0.0f) + (acc[m] + hsum512(s));
    }
  }
}

// Weight-only int8 rows: sum_k X[m, k] * CB[n, k], then one scale per output.

template <std::size_t MB>
STOWAGE_QUANT_AVX2_FN void int8_rows(const float* x, std::size_t m0, const std::int8_t* cb,
                                     const float* scb, std::size_t N, std::size_t K, std::size_t n0,
                                     std::size_t n1, float* y) noexcept {
  // Independent accumulators: enough FMA chains to cover the FMA latency, within 16 registers.
  constexpr std::size_t NA = MB <= 2 ? 4 : MB == 4 ? 2 : 1;
  for (std::size_t n = n0; n < n1; ++n) {
    const std::int8_t* w = cb + n * K;
    __m256 va[MB][NA];
    for (std::size_t m = 0; m < MB; ++m)
      for (std::size_t a = 0; a < NA; ++a) va[m][a] = _mm256_setzero_ps();
    std::size_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m128i lo = _mm256_castsi256_si128(raw), hi = _mm256_extracti128_si256(raw, 1);
      const __m256 wf[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))};
      for (std::size_t m = 0; m < MB; ++m) {
        const float* xm = x + (m0 + m) * K + k;
        for (std::size_t q = 0; q < 4; ++q)
          va[m][q % NA] = _mm256_fmadd_ps(wf[q], _mm256_loadu_ps(xm + 8 * q), va[m][q % NA]);
      }
    }
    float acc[MB];
    for (std::size_t m = 0; m < MB; ++m) {
      __m256 s = va[m][0];
      for (std::size_t a = 1; a < NA; ++a) s = _mm256_add_ps(s, va[m][a]);
      acc[m] = hsum(s);
    }
    for (; k < K; ++k)
      for (std::size_t m = 0; m < MB; ++m) acc[m] += static_cast<float>(w[k]) * x[(m0 + m) * K + k];
    const float scale = scb[n] * 7.874015718698502e-3f;
    for (std::size_t m = 0; m < MB; ++m) y[(m0 + m) * N + n] = acc[m] * scale;
  }
}

// LLM.int8 row quantization of one row already rounded to fp16 values in `b` (cols floats)
// whose absmax (NaN ignored) is `am` unless a threshold is set: returns SCB and writes CB. Same
// operations as the scalar loop: scale = 127 * (1 / absmax), round half to even, NaN -> 0. The
// scalar clamp to [-128, 127] never acts (|b| <= absmax, so |b * scale| < 127.5) and the
// saturating packs would keep any int32 in range anyway.
STOWAGE_QUANT_AVX2_FN inline float int8_row(float* b, std::size_t cols, float threshold, float am,
                                            std::int8_t* dst) noexcept {
  if (threshold > 0.0f) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 thr = _mm256_set1_ps(threshold);
    __m256 m0 = _mm256_setzero_ps();
    std::size_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      __m256 v = _mm256_loadu_ps(b + c);
      v = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_and_ps(v, absmask), thr, _CMP_GE_OQ), v);
      _mm256_storeu_ps(b + c, v);
      m0 = _mm256_max_ps(_mm256_and_ps(v, absmask), m0);
    }
    am = hmax(m0);
    for (; c < cols; ++c) {
      if (std::fabs(b[c]) >= threshold) b[c] = 0.0f;
      am = std::fmax(am, std::fabs(b[c]));
    }
  }
  const float scale = 127.0f * (1.0f / am);
  const __m256 sv = _mm256_set1_ps(scale);
  std::size_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    __m256i q[4];
    for (std::size_t j = 0; j < 4; ++j) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(b + c + 8 * j), sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q)));  // NaN -> 0
    }
    const __m256i p =
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  for (; c < cols; ++c) {
    const float q = std::nearbyint(b[c] * scale);
    dst[c] =
        std::isnan(q) ? std::int8_t{0} : static_cast<std::int8_t>(std::clamp(q, -128.0f, 127.0f));
  }
  return am;
}

// A row of `cols` inputs rounded to float16 values (RNE, overflow to inf) as float32 into b;
// returns their absmax (NaN ignored, as std::fmax).
template <in_kind K>
STOWAGE_QUANT_AVX2_FN float row_to_fp16_values(const void* in, std::size_t off, std::size_t cols,
                                               float* b) noexcept {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  std::size_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m256 v0 = load8<K>(in, off + c), v1 = load8<K>(in, off + c + 8);
    if constexpr (K != in_kind::f16) {
      v0 = _mm256_cvtph_ps(_mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      v1 = _mm256_cvtph_ps(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    _mm256_storeu_ps(b + c, v0);
    _mm256_storeu_ps(b + c + 8, v1);
    m0 = _mm256_max_ps(_mm256_and_ps(v0, absmask), m0);
    m1 = _mm256_max_ps(_mm256_and_ps(v1, absmask), m1);
  }
  float am = hmax(_mm256_max_ps(m0, m1));
  for (; c < cols; ++c) {
    if constexpr (K == in_kind::f32)
      b[c] = fp16_bits_to_fp32(fp32_to_fp16_bits(static_cast<const float*>(in)[off + c]));
    else if constexpr (K == in_kind::bf16)
      b[c] = fp16_bits_to_fp32(
          fp32_to_fp16_bits(bf16_bits_to_fp32(static_cast<const std::uint16_t*>(in)[off + c])));
    else
      b[c] = fp16_bits_to_fp32(static_cast<const std::uint16_t*>(in)[off + c]);
    am = std::fmax(am, std::fabs(b[c]));
  }
  return am;
}

STOWAGE_QUANT_AVX2_FN inline void int8_rows(const void* in, dtype t, std::size_t r0, std::size_t r1,
                                            std::size_t cols, float threshold, float* b,
                                            std::int8_t* cb, float* scb) noexcept {
  for (std::size_t r = r0; r < r1; ++r) {
    float am;
    if (t == dtype::float32)
      am = row_to_fp16_values<in_kind::f32>(in, r * cols, cols, b);
    else if (t == dtype::bfloat16)
      am = row_to_fp16_values<in_kind::bf16>(in, r * cols, cols, b);
    else
      am = row_to_fp16_values<in_kind::f16>(in, r * cols, cols, b);
    scb[r] = int8_row(b, cols, threshold, am, cb + r * cols);
  }
}

// LLM.int8 row quantization on AVX-512 (threshold 0: the weight path). Rounding to float16 is
// monotone and symmetric, so max |fp16(x)| = fp16(max |x|), NaN ignored on both sides: the
// absmax pass skips the conversion, and for 16-bit inputs compares bit patterns (|x| as a
// 15-bit integer orders like the value; a pattern above the infinity's means a NaN, and that
// row takes the float pass, which ignores it). The second pass rounds to float16 and back,
// multiplies, converts rounding to nearest even (NaN lanes masked to 0, as the scalar loop) and
// narrows with saturation (never reached: |b * scale| < 127.5).
template <in_kind K>
STOWAGE_QUANT_AVX512_FN float int8_absmax_512(const void* in, std::size_t off,
                                              std::size_t cols) noexcept {
  if constexpr (K != in_kind::f32) {
    const auto* p = static_cast<const std::uint16_t*>(in) + off;
    const __m512i mask = _mm512_set1_epi16(0x7fff);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    std::size_t c = 0;
    for (; c + 64 <= cols; c += 64) {
      m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_loadu_si512(p + c), mask));
      m1 = _mm512_max_epu16(m1, _mm512_and_si512(_mm512_loadu_si512(p + c + 32), mask));
    }
    const __m512i m = _mm512_max_epu16(m0, m1);
    const __m256i h = _mm256_max_epu16(_mm512_maskz_extracti64x4_epi64(0xff, m, 0),
                                       _mm512_maskz_extracti64x4_epi64(0xff, m, 1));
    // minpos finds the smallest of 8 words: the largest of their complements.
    const __m128i q =
        _mm_xor_si128(_mm_max_epu16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)),
                      _mm_set1_epi16(-1));
    unsigned top = 0xffffu & ~static_cast<unsigned>(_mm_cvtsi128_si32(_mm_minpos_epu16(q)));
    for (; c < cols; ++c) top = std::max(top, p[c] & 0x7fffu);
    if (top <= (K == in_kind::bf16 ? 0x7f80u : 0x7c00u)) {
      const auto bits = static_cast<std::uint16_t>(top);
      const float am = K == in_kind::bf16 ? bf16_bits_to_fp32(bits) : fp16_bits_to_fp32(bits);
      return fp16_bits_to_fp32(fp32_to_fp16_bits(am));
    }
  }
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  std::size_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    m0 = _mm512_maskz_max_ps(all16, _mm512_abs_ps(load16<K>(in, off + c)), m0);
    m1 = _mm512_maskz_max_ps(all16, _mm512_abs_ps(load16<K>(in, off + c + 16)), m1);
  }
  float am = hmax512(_mm512_maskz_max_ps(all16, m0, m1));
  const dtype t = K == in_kind::f32    ? dtype::float32
                  : K == in_kind::bf16 ? dtype::bfloat16
                                       : dtype::float16;
  for (; c < cols; ++c) am = std::fmax(am, std::fabs(load_as_f32(in, off + c, t)));
  return fp16_bits_to_fp32(fp32_to_fp16_bits(am));
}

// 16 int8 codes as int32: float16 round trip (unless the input is float16), x * scale,
// conversion rounding to nearest even, NaN lanes 0.
template <in_kind K>
STOWAGE_QUANT_AVX512_FN inline __m512i int8_q16(__m512 v, __m512 sv) noexcept {
  constexpr int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if constexpr (K != in_kind::f16)
    v = _mm512_maskz_cvtph_ps(all16, _mm512_maskz_cvtps_ph(all16, v, rne));
  const __m512 p = _mm512_mul_ps(v, sv);
  return _mm512_maskz_cvt_roundps_epi32(_mm512_cmp_ps_mask(p, p, _CMP_ORD_Q), p, rne);
}

template <in_kind K>
STOWAGE_QUANT_AVX512_FN void int8_codes_512(const void* in, std::size_t off, std::size_t cols,
                                            float scale, std::int8_t* dst) noexcept {
  const __m512 sv = _mm512_set1_ps(scale);
  std::size_t c = 0;
  if constexpr (K == in_kind::bf16) {
    // 32 bf16 per load: the even elements as floats by a shift, the odd ones by a mask; lane i
    // of their codes is elements 2i and 2i + 1, merged into one 16-bit pair (the codes are in
    // [-127, 127], so keeping the low byte of each is exact) and narrowed in order.
    const auto* p = static_cast<const std::uint16_t*>(in) + off;
    for (; c + 32 <= cols; c += 32) {
      const __m512i v = _mm512_loadu_si512(p + c);
      const __m512i even = int8_q16<K>(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), sv);
      const __m512i odd =
          int8_q16<K>(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))), sv);
      const __m512i pairs = _mm512_or_si512(_mm512_and_si512(even, _mm512_set1_epi32(0xff)),
                                            _mm512_slli_epi32(odd, 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                          _mm512_maskz_cvtepi32_epi16(all16, pairs));
    }
  }
  for (; c + 16 <= cols; c += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c),
                     _mm512_maskz_cvtsepi32_epi8(all16, int8_q16<K>(load16<K>(in, off + c), sv)));
  const dtype t = K == in_kind::f32    ? dtype::float32
                  : K == in_kind::bf16 ? dtype::bfloat16
                                       : dtype::float16;
  for (; c < cols; ++c) {
    const float b = fp16_bits_to_fp32(fp32_to_fp16_bits(load_as_f32(in, off + c, t)));
    const float q = std::nearbyint(b * scale);
    dst[c] =
        std::isnan(q) ? std::int8_t{0} : static_cast<std::int8_t>(std::clamp(q, -128.0f, 127.0f));
  }
}

template <in_kind K>
STOWAGE_QUANT_AVX512_FN void int8_rows_512(const void* in, std::size_t r0, std::size_t r1,
                                           std::size_t cols, std::int8_t* cb, float* scb) noexcept {
  for (std::size_t r = r0; r < r1; ++r) {
    const float am = int8_absmax_512<K>(in, r * cols, cols);
    scb[r] = am;
    int8_codes_512<K>(in, r * cols, cols, 127.0f * (1.0f / am), cb + r * cols);
  }
}

STOWAGE_QUANT_AVX512_FN inline void int8_rows_512_any(const void* in, dtype t, std::size_t r0,
                                                      std::size_t r1, std::size_t cols,
                                                      std::int8_t* cb, float* scb) noexcept {
  if (t == dtype::float32)
    int8_rows_512<in_kind::f32>(in, r0, r1, cols, cb, scb);
  else if (t == dtype::bfloat16)
    int8_rows_512<in_kind::bf16>(in, r0, r1, cols, cb, scb);
  else
    int8_rows_512<in_kind::f16>(in, r0, r1, cols, cb, scb);
}

// int8 -> float32: f32(f32(q * scb) * f32(1/127)), two separate multiplies. Stream: outputs
// written with non-temporal stores (dst 16-byte aligned and cols a multiple of 16, so every
// row starts aligned; the caller fences), which saves reading each output line before it is
// overwritten: a write stream four times the size of its input.
template <bool Stream>
STOWAGE_QUANT_AVX2_FN inline void int8_dequant_rows(const std::int8_t* cb, const float* scb,
                                                    std::size_t r0, std::size_t r1,
                                                    std::size_t cols, float* out) noexcept {
  const __m256 inv = _mm256_set1_ps(7.874015718698502e-3f);
  for (std::size_t r = r0; r < r1; ++r) {
    const __m256 s = _mm256_set1_ps(scb[r]);
    const std::int8_t* src = cb + r * cols;
    float* dst = out + r * cols;
    std::size_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
      const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
      const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
      store32<Stream>(dst + c, _mm256_castps_si256(_mm256_mul_ps(_mm256_mul_ps(a, s), inv)));
      store32<Stream>(dst + c + 8, _mm256_castps_si256(_mm256_mul_ps(_mm256_mul_ps(b, s), inv)));
    }
    for (; c < cols; ++c) dst[c] = static_cast<float>(src[c]) * scb[r] * 7.874015718698502e-3f;
  }
}

}  // namespace avx2
#endif

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
  const bool simd = detail::use_avx2();
  const bool simd512 = detail::use_avx512();
  detail::parallel_for(
      N, std::max<std::size_t>(1, (std::size_t{1} << 16) / std::max<std::size_t>(K, 1)),
      [&](std::size_t n0, std::size_t n1) {
        detail::dispatch_batch(M, [&]<std::size_t MB>(std::size_t m0) {
          const float* xs[MB];
          float* ys[MB];
          for (std::size_t m = 0; m < MB; ++m) {
            xs[m] = x + (m0 + m) * K;
            ys[m] = y + (m0 + m) * N;
          }
#if defined(STOWAGE_QUANT_X86)
          if (simd) {
            // A batch's activations (MB rows of K floats) would not stay in L1 over a weight
            // row, and reloading them from L2 bounds the loop: columns go in chunks of 16 KiB
            // of activations while a tile of 16 weight rows passes over them; partial sums add
            // up in y.
            const std::size_t kc = MB == 1 ? K : std::max<std::size_t>(64, 4096 / MB / 64 * 64);
            for (std::size_t t0 = n0; t0 < n1; t0 += 16) {
              const std::size_t t1 = std::min(n1, t0 + 16);
              for (std::size_t kb = 0; kb < K; kb += kc) {
                const std::size_t ke = std::min(K, kb + kc);
                if (simd512)
                  detail::avx2::fused_4bit_rows_512<MB>(xs, packed, absmax, code.data(), K,
                                                        blocksize, t0, t1, kb, ke, kb != 0, ys);
                else
                  detail::avx2::fused_4bit_rows<MB>(xs, packed, absmax, code.data(), K, blocksize,
                                                    t0, t1, kb, ke, kb != 0, ys);
              }
            }
            return;
          }
#else
          (void)simd;
          (void)simd512;
#endif
          detail::fused_4bit_rows<MB>(xs, packed, absmax, code, K, blocksize, n0, n1, ys);
        });
      });
}

// ---------------------------------------------------------------------------------------------
// LLM.int8 (formats-spec §2)

namespace detail {

// Per-thread scratch row (float16-rounded values), reused across calls: no allocation per row
// or per call once a thread has seen the widest row.
inline float* int8_scratch(std::size_t cols) {
  thread_local std::vector<float> buf;
  if (buf.size() < cols) buf.resize(cols);
  return buf.data();
}

}  // namespace detail

/// Row-wise int8 quantization as bitsandbytes' Int8Params does it: the row is first rounded to
/// float16 (RNE, >65504 -> inf), SCB[r] = max|row| (float32 of the fp16 value),
/// CB = round_half_even(b * f32(127 * f32(1 / SCB[r]))) (torch's scalar/tensor division). An
/// all-zero row gives zeros (CUDA's NaN -> 0 conversion). `threshold` > 0 zeroes elements with |b|
/// >= threshold before the absmax and quantization (the activation path); 0 disables it.
inline void quantize_int8_rowwise_raw(const void* in, dtype in_type, std::size_t rows,
                                      std::size_t cols, std::int8_t* cb, float* scb,
                                      float threshold = 0.0f) {
  detail::check_float_dtype(in_type, "quantize_int8");
  const bool simd = detail::use_avx2();
  const bool simd512 = detail::use_avx512() && threshold == 0.0f;
  detail::parallel_for(
      rows, std::max<std::size_t>(1, 65536 / std::max<std::size_t>(cols, 1)),
      [&](std::size_t r0, std::size_t r1) {
#if defined(STOWAGE_QUANT_X86)
        if (simd512) {
          detail::avx2::int8_rows_512_any(in, in_type, r0, r1, cols, cb, scb);
          return;
        }
#else
        (void)simd512;
#endif
        float* b = detail::int8_scratch(cols);
#if defined(STOWAGE_QUANT_X86)
        if (simd) {
          detail::avx2::int8_rows(in, in_type, r0, r1, cols, threshold, b, cb, scb);
          return;
        }
#else
        (void)simd;
#endif
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

/// Dequantizes CB [rows, cols] with its SCB to float32 `out` (bitsandbytes'
/// int8_vectorwise_dequant, bit for bit).
inline void dequantize_int8_raw(const std::int8_t* cb, const float* scb, std::size_t rows,
                                std::size_t cols, float* out) {
  const bool simd = detail::use_avx2();
  // As dequantize_4bit: outputs of 16 MiB or more would not stay cached for the reader, so
  // they are streamed (when every row starts 16-byte aligned).
  const bool stream = simd && rows * cols * sizeof(float) >= (std::size_t{16} << 20) &&
                      cols % 16 == 0 && reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  detail::parallel_for(rows, std::max<std::size_t>(1, 65536 / std::max<std::size_t>(cols, 1)),
                       [&](std::size_t r0, std::size_t r1) {
#if defined(STOWAGE_QUANT_X86)
                         if (stream) {
                           detail::avx2::int8_dequant_rows<true>(cb, scb, r0, r1, cols, out);
                           _mm_sfence();  // streamed stores visible before the join
                           return;
                         }
                         if (simd) {
                           detail::avx2::int8_dequant_rows<false>(cb, scb, r0, r1, cols, out);
                           return;
                         }
#else
        (void)simd;
        (void)stream;
#endif
                         for (std::size_t r = r0; r < r1; ++r)
                           for (std::size_t c = 0; c < cols; ++c)
                             out[r * cols + c] = int8_dequant_value(cb[r * cols + c], scb[r]);
                       });
}

/// Weight-only fused int8 product: Y [M, N] = X [M, K] * (CB * SCB / 127)^T, float32 in and out,
/// accumulated as sum(X * CB) then scaled once per output (not bit-identical to dequantize then
/// multiply; within float32 rounding of it).
inline void gemm_int8_weight_only_raw(const float* x, std::size_t M, const std::int8_t* cb,
                                      const float* scb, std::size_t N, std::size_t K, float* y) {
  const bool simd = detail::use_avx2();
  detail::parallel_for(
      N, std::max<std::size_t>(1, (std::size_t{1} << 16) / std::max<std::size_t>(K, 1)),
      [&](std::size_t n0, std::size_t n1) {
        detail::dispatch_batch(M, [&]<std::size_t MB>(std::size_t m0) {
#if defined(STOWAGE_QUANT_X86)
          if (simd) {
            detail::avx2::int8_rows<MB>(x, m0, cb, scb, N, K, n0, n1, y);
            return;
          }
#else
          (void)simd;
#endif
          for (std::size_t n = n0; n < n1; ++n) {
            const std::int8_t* w = cb + n * K;
            float acc[MB] = {};
            std::size_t k = 0;
            for (; k + 8 <= K; k += 8)
              for (std::size_t m = 0; m < MB; ++m) {
                float lane[8];
                const float* xm = x + (m0 + m) * K + k;
                for (std::size_t l = 0; l < 8; ++l) lane[l] = static_cast<float>(w[k + l]) * xm[l];
                float s = 0.0f;
                for (float v : lane) s += v;
                acc[m] += s;
              }
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
