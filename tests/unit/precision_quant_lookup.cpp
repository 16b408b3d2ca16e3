// Unit tests: the bucket lookup that the AVX-512 4-bit quantizer uses instead of a compare
// search (make_bucket_tables in precision/kernels_cpu.hpp) gives the reference code
// (nf4_code_of / fp4_code_of: strict > against every threshold, FP4 sign from s < 0, NaN -> 0)
// for every float in its domain ([-1, 1] and NaN), and the domain bound itself: |x * (1/absmax)|
// <= 1 whenever 1/absmax is a normal float. Checked here over a stride through all 2^32 bit
// patterns plus +-2048 ulps around every threshold, every bucket edge, 0, +-1 and NaN payloads.
// With STOWAGE_LOOKUP_STRIDE=1 the same file checks every float (about 4 minutes on 2 vCPUs):
//   echo '#define CATCH_CONFIG_MAIN' > m.cpp && echo '#include <catch2/catch.hpp>' >> m.cpp
//   g++ -std=c++20 -O2 -Iinclude -DSTOWAGE_LOOKUP_STRIDE=1 -pthread -o lookup_all
//       tests/unit/precision_quant_lookup.cpp m.cpp && ./lookup_all
// The table checks run on any machine; the SIMD ones where the CPU has AVX-512.
#include <catch2/catch.hpp>

#include <stowage/precision/nf4.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#ifndef STOWAGE_LOOKUP_STRIDE
#if defined(__SANITIZE_ADDRESS__)  // CI's ASan+UBSan pass runs ~10x slower: a sparser sweep
#define STOWAGE_LOOKUP_STRIDE 2039
#else
#define STOWAGE_LOOKUP_STRIDE 251
#endif
#endif

namespace sp = stowage::precision;
namespace sd = stowage::precision::detail;

namespace {

constexpr std::uint64_t kStride = STOWAGE_LOOKUP_STRIDE;

float from_bits(std::uint32_t u) { return std::bit_cast<float>(u); }
std::uint32_t to_bits(float f) { return std::bit_cast<std::uint32_t>(f); }

bool in_domain(float s) { return std::isnan(s) || std::fabs(s) <= 1.0f; }

std::uint8_t reference_code(sp::quant_type q, float s) {
  return q == sp::quant_type::nf4 ? sd::nf4_code_of(s) : sd::fp4_code_of(s);
}

// The lookup evaluated from the tables in scalar code (what the SIMD version computes), with
// the bucket found by comparing against the bucket edges instead of an FMA: the check that the
// tables are right independently of the instruction sequence.
std::uint8_t table_code(const sd::bucket_tables& t, float s) {
  auto code = [&](std::size_t k, bool gt) {
    return static_cast<std::uint8_t>(t.map[static_cast<std::size_t>(t.base[k] + (gt ? 1 : 0))]);
  };
  if (std::isnan(s)) return code(0, false);
  // k = floor(15.5 * s + offset): the largest k with (k - offset) / 15.5 <= s, decided exactly
  // in double: 15.5 * s is exact (29 bits) and compared with k - offset (exact).
  const double p = 15.5 * static_cast<double>(s);
  int k = 0;
  for (int j = 1; j < 32; ++j)
    if (p >= static_cast<double>(j) - static_cast<double>(t.offset)) k = j;
  const auto uk = static_cast<std::size_t>(k);
  return code(uk, s > t.mid[uk]);
}

#if defined(STOWAGE_QUANT_X86)
// 16 codes from the AVX-512 lookup (the values must be in the domain).
STOWAGE_QUANT_AVX512_FN void simd_codes(const sd::bucket_tables& t, const float* s,
                                        std::uint8_t* out) {
  const __m512i c = &t == &sd::nf4_buckets
                        ? sd::avx2::lookup512<false>::make(t).code(_mm512_loadu_ps(s))
                        : sd::avx2::lookup512<true>::make(t).code(_mm512_loadu_ps(s));
  alignas(64) std::int32_t lanes[16];
  _mm512_store_si512(lanes, c);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<std::uint8_t>(lanes[i]);
}
#endif

// Checks the lookup (table form always, SIMD form where available) on `values` (in domain);
// returns the number of mismatches and records the first.
std::size_t check_values(sp::quant_type q, const std::vector<float>& values, float& first_bad) {
  const auto& t = q == sp::quant_type::nf4 ? sd::nf4_buckets : sd::fp4_buckets;
  std::size_t bad = 0;
  for (float s : values)
    if (table_code(t, s) != reference_code(q, s)) {
      if (bad++ == 0) first_bad = s;
    }
#if defined(STOWAGE_QUANT_X86)
  if (sd::cpu_has_avx512()) {
    for (std::size_t i = 0; i < values.size(); i += 16) {
      float v[16];
      std::uint8_t c[16];
      for (std::size_t j = 0; j < 16; ++j) v[j] = values[std::min(i + j, values.size() - 1)];
      simd_codes(t, v, c);
      for (std::size_t j = 0; j < 16 && i + j < values.size(); ++j)
        if (c[j] != reference_code(q, v[j])) {
          if (bad++ == 0) first_bad = v[j];
        }
    }
  }
#endif
  return bad;
}

// Every `stride`-th bit pattern (offset so that both signs and NaNs are hit), on the machine's
// threads; the values outside the domain are skipped.
std::size_t check_stride(sp::quant_type q, std::uint64_t stride, float& first_bad) {
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::atomic<std::size_t> bad{0};
  std::atomic<std::uint32_t> bad_bits{0};
  std::vector<std::thread> pool;
  const std::uint64_t total = std::uint64_t{1} << 32;
  for (unsigned th = 0; th < threads; ++th)
    pool.emplace_back([&, th] {
      std::vector<float> chunk;
      chunk.reserve(1 << 16);
      const std::uint64_t lo = total * th / threads, hi = total * (th + 1) / threads;
      auto flush = [&] {
        float fb = 0.0f;
        const std::size_t n = check_values(q, chunk, fb);
        if (n != 0 && bad.fetch_add(n) == 0) bad_bits = to_bits(fb);
        chunk.clear();
      };
      for (std::uint64_t u = lo + (stride - lo % stride) % stride; u < hi; u += stride) {
        const float s = from_bits(static_cast<std::uint32_t>(u));
        if (!in_domain(s)) continue;
        chunk.push_back(s);
        if (chunk.size() == (1u << 16)) flush();
      }
      flush();
    });
  for (auto& t : pool) t.join();
  first_bad = from_bits(bad_bits);
  return bad;
}

void add_neighbourhood(std::vector<float>& v, float centre, int ulps) {
  if (!in_domain(centre)) return;
  float down = centre, up = centre;
  v.push_back(centre);
  for (int i = 0; i < ulps; ++i) {
    down = std::nextafter(down, -2.0f);
    up = std::nextafter(up, 2.0f);
    if (in_domain(down)) v.push_back(down);
    if (in_domain(up)) v.push_back(up);
  }
}

std::vector<float> edge_values(sp::quant_type q) {
  const auto& t = q == sp::quant_type::nf4 ? sd::nf4_buckets : sd::fp4_buckets;
  std::vector<float> v;
  constexpr int ulps = 2048;
  if (q == sp::quant_type::nf4)
    for (float th : sp::nf4_thresholds) add_neighbourhood(v, th, ulps);
  else
    for (float b : sp::fp4_cuda_boundaries) {
      add_neighbourhood(v, b, ulps);
      add_neighbourhood(v, -b, ulps);
    }
  // Bucket edges: s with 15.5 * s + offset == k, the floats on either side of it.
  for (int k = 0; k <= 32; ++k) {
    const double e = (static_cast<double>(k) - static_cast<double>(t.offset)) / 15.5;
    add_neighbourhood(v, static_cast<float>(e), ulps);
  }
  for (float c : {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::denorm_min(),
                  -std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                  -std::numeric_limits<float>::min()})
    add_neighbourhood(v, c, ulps);
  for (std::uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu,
                            0xffffffffu, 0x7fc0001fu, 0x7fa5a5a5u, 0xffbfffe1u})
    v.push_back(from_bits(nan));
  return v;
}

}  // namespace

TEST_CASE("4-bit bucket tables: one decision point per bucket, NaN bucket empty",
          "[precision][quant][lookup]") {
  for (auto q : {sp::quant_type::nf4, sp::quant_type::fp4}) {
    CAPTURE(static_cast<int>(q));
    const auto& t = q == sp::quant_type::nf4 ? sd::nf4_buckets : sd::fp4_buckets;
    CHECK(sd::buckets_separate(q));
    // NaN (bucket 0, compare false) gives code 0.
    CHECK(t.map[static_cast<std::size_t>(t.base[0])] == 0);
    for (std::size_t k = 0; k < 32; ++k) {
      CHECK(t.base[k] >= 0);
      CHECK(t.base[k] + 1 < 32);
      // The index grows by one at each decision point, and for FP4 also at the sign edge
      // between buckets 15 (s < 0) and 16 (s >= 0).
      const int sign_step = q == sp::quant_type::fp4 && k == 15 ? 1 : 0;
      if (k + 1 < 32 && k != 0)
        CHECK(t.base[k + 1] == t.base[k] + (std::isfinite(t.mid[k]) ? 1 : 0) + sign_step);
    }
    for (std::size_t j = 0; j < 32; ++j) {
      CHECK(t.map[j] >= 0);
      CHECK(t.map[j] < 16);
    }
  }
  // 15 NF4 thresholds and 14 signed FP4 decision points, one per bucket.
  auto points = [](const sd::bucket_tables& t) {
    return std::count_if(t.mid.begin() + 1, t.mid.end(), [](float m) { return std::isfinite(m); });
  };
  CHECK(points(sd::nf4_buckets) == 15);
  CHECK(points(sd::fp4_buckets) == 14);
}

TEST_CASE("4-bit bucket lookup equals the compare search around every threshold and bucket edge",
          "[precision][quant][lookup]") {
  for (auto q : {sp::quant_type::nf4, sp::quant_type::fp4}) {
    CAPTURE(static_cast<int>(q));
    float first_bad = 0.0f;
    const auto values = edge_values(q);
    CHECK(values.size() > 100000);
    const std::size_t bad = check_values(q, values, first_bad);
    CAPTURE(first_bad);
    CHECK(bad == 0);
  }
}

TEST_CASE("4-bit bucket lookup equals the compare search over all floats (stride)",
          "[precision][quant][lookup]") {
  CAPTURE(kStride);
  for (auto q : {sp::quant_type::nf4, sp::quant_type::fp4}) {
    CAPTURE(static_cast<int>(q));
    float first_bad = 0.0f;
    const std::size_t bad = check_stride(q, kStride, first_bad);
    CAPTURE(first_bad);
    CHECK(bad == 0);
  }
}

TEST_CASE("the lookup's domain: |x * (1/absmax)| <= 1 when 1/absmax is normal",
          "[precision][quant][lookup]") {
  // It suffices to check x = absmax (rounding is monotonic, |x| <= absmax). Every positive
  // finite absmax on the stride, plus the largest ones, where the reciprocal nears FLT_MIN.
  std::size_t bad = 0, checked = 0;
  auto check = [&](std::uint32_t u) {
    const float a = from_bits(u);
    const float inv = 1.0f / a;
    if (!std::isnormal(inv)) return;
    ++checked;
    if (a * inv > 1.0f) ++bad;
  };
  for (std::uint64_t u = 1; u < 0x7f800000u; u += kStride) check(static_cast<std::uint32_t>(u));
  for (std::uint32_t u = 0x7e000000u; u < 0x7f800000u; u += 7) check(u);
  CHECK(checked > 1000);
  CHECK(bad == 0);
  // Outside that range it fails, which is why those blocks take the search: 1/a is subnormal
  // for a near 2^126 and a * (1/a) can round above 1.
  const float big = 0x1.001bb8p+126f;
  CHECK(!std::isnormal(1.0f / big));
  CHECK(big * (1.0f / big) > 1.0f);
}
