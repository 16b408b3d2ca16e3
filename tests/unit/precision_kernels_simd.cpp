// Unit tests: the AVX2 quantization kernels (chosen at run time) give the same bytes as the
// portable reference loops, on random data and on the edge cases that decide codes: values
// exactly on an NF4 threshold or FP4 boundary and their float neighbours, NaN, infinities,
// all-zero blocks, -0.0, subnormals, fp16 overflow, odd lengths and partial last blocks. On a
// machine without AVX2 both runs take the reference path and the test still passes.
#include <catch2/catch.hpp>

#include <stowage/precision/int8.hpp>
#include <stowage/precision/nf4.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace sp = stowage::precision;
using stowage::dtype;

namespace {

// Runs fn with the reference loops and with each SIMD level (where the CPU has it), calls
// check(reference, other) for each, and restores the default level.
template <class Fn, class Check>
void compare_levels(Fn&& fn, Check&& check) {
  sp::kernel_simd() = sp::simd_level::scalar;
  const auto ref = fn();
  for (auto level : {sp::simd_level::avx2, sp::simd_level::avx512}) {
    INFO("simd level " << static_cast<int>(level));
    sp::kernel_simd() = level;
    const auto other = fn();
    check(ref, other);
  }
  sp::kernel_simd() = sp::simd_level::avx512;
}

std::vector<float> tricky_values(std::size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<float> v(n);
  const float inf = std::numeric_limits<float>::infinity();
  for (std::size_t i = 0; i < n; ++i) {
    const int p = pick(g);
    v[i] = p < 2   ? std::numeric_limits<float>::quiet_NaN()
           : p < 3 ? (i % 2 ? inf : -inf)
           : p < 5 ? -0.0f
           : p < 7 ? 1e-41f * static_cast<float>(p)  // subnormal
           : p < 8 ? 70000.0f                        // overflows float16
                   : d(g);
  }
  return v;
}

// Blocks of 64 whose absmax is exactly 1.0, so s == x: every threshold / boundary and its two
// float neighbours, of both signs.
std::vector<float> boundary_values(sp::quant_type t) {
  std::vector<float> edges;
  if (t == sp::quant_type::nf4)
    for (float th : sp::nf4_thresholds) edges.push_back(th);
  else
    for (float b : sp::fp4_cuda_boundaries) {
      edges.push_back(b);
      edges.push_back(-b);
    }
  std::vector<float> v;
  for (float e : edges)
    for (float x : {e, std::nextafter(e, -2.0f), std::nextafter(e, 2.0f)}) {
      if (v.size() % 64 == 0) v.push_back(1.0f);
      v.push_back(x);
    }
  while (v.size() % 64) v.push_back(0.0f);
  return v;
}

std::vector<std::uint8_t> as_input(const std::vector<float>& v, dtype t) {
  std::vector<std::uint8_t> out(v.size() * stowage::element_size(t));
  if (t == dtype::float32) {
    std::memcpy(out.data(), v.data(), out.size());
  } else {
    for (std::size_t i = 0; i < v.size(); ++i) {
      const std::uint16_t h =
          t == dtype::bfloat16 ? sp::fp32_to_bf16_bits(v[i]) : sp::fp32_to_fp16_bits(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<std::uint32_t> bits(const std::vector<float>& v) {
  std::vector<std::uint32_t> b(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) b[i] = std::bit_cast<std::uint32_t>(v[i]);
  return b;
}

}  // namespace

TEST_CASE("SIMD 4-bit quantize equals the reference loops", "[precision][simd]") {
  for (auto type : {sp::quant_type::nf4, sp::quant_type::fp4})
    for (dtype in : {dtype::float32, dtype::bfloat16, dtype::float16})
      for (std::size_t bs : {64u, 128u, 4096u})
        for (std::size_t n :
             {std::size_t{64}, std::size_t{4096} * 3 + 129, std::size_t{20000}, std::size_t{5}}) {
          INFO(sp::name(type) << " " << stowage::name(in) << " bs=" << bs << " n=" << n);
          auto vals = tricky_values(n, static_cast<unsigned>(n + bs));
          // Whole blocks of zeros and of one NaN among zeros.
          for (std::size_t i = 0; i < std::min<std::size_t>(n, 128); ++i) vals[i] = 0.0f;
          if (n > 70) vals[70] = std::numeric_limits<float>::quiet_NaN();
          const auto input = as_input(vals, in);
          for (unsigned threads : {1u, 2u}) {
            sp::kernel_threads() = threads;
            compare_levels(
                [&] {
                  std::vector<std::uint8_t> packed((n + 1) / 2, 0xab);
                  std::vector<float> absmax((n + bs - 1) / bs, -1.0f);
                  sp::quantize_4bit_raw(input.data(), in, n, type, bs, packed.data(),
                                        absmax.data());
                  return std::pair{packed, bits(absmax)};
                },
                [](const auto& ref, const auto& simd) {
                  CHECK(ref.first == simd.first);
                  CHECK(ref.second == simd.second);
                });
          }
          sp::kernel_threads() = 0;
        }
}

TEST_CASE("SIMD 4-bit quantize of blocks at the ends of the float range", "[precision][simd]") {
  // The AVX-512 bucket lookup needs 1/absmax to be a normal float (then |s| <= 1); blocks whose
  // absmax is tiny (reciprocal inf), near FLT_MAX (reciprocal subnormal, s may round above 1) or
  // at the edge of that range must give the reference bytes too, as must NaN among them.
  std::mt19937 g(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v;
  for (float am :
       {1e-45f, 1e-40f, 0x1p-126f, 0x1p-127f, 0x1.fffffep-127f, 0x1.000002p+126f, 0x1p+126f,
        0x1.001bb8p+126f, 0x1p+127f, 3.0e38f, std::numeric_limits<float>::max(), 1.0f}) {
    for (int rep = 0; rep < 4; ++rep) {
      const std::size_t start = v.size();
      for (int i = 0; i < 64; ++i) v.push_back(am * u(g));
      v[start + static_cast<std::size_t>(rep * 7)] = rep % 2 ? -am : am;
      if (rep == 3) v[start + 5] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  for (auto type : {sp::quant_type::nf4, sp::quant_type::fp4})
    compare_levels(
        [&] {
          std::vector<std::uint8_t> packed(v.size() / 2);
          std::vector<float> absmax(v.size() / 64);
          sp::quantize_4bit_raw(v.data(), dtype::float32, v.size(), type, 64, packed.data(),
                                absmax.data());
          return std::pair{packed, bits(absmax)};
        },
        [](const auto& ref, const auto& simd) {
          CHECK(ref.first == simd.first);
          CHECK(ref.second == simd.second);
        });
}

TEST_CASE("SIMD 4-bit quantize keeps the tie rules on thresholds", "[precision][simd]") {
  for (auto type : {sp::quant_type::nf4, sp::quant_type::fp4}) {
    const auto v = boundary_values(type);
    compare_levels(
        [&] {
          std::vector<std::uint8_t> packed(v.size() / 2);
          std::vector<float> absmax(v.size() / 64);
          sp::quantize_4bit_raw(v.data(), dtype::float32, v.size(), type, 64, packed.data(),
                                absmax.data());
          return packed;
        },
        [&](const auto& ref, const auto& simd) {
          CHECK(ref == simd);
          // And per element: equal to a threshold takes the lower code (s > t is strict).
          for (std::size_t i = 0; i < v.size(); ++i) {
            const std::uint8_t code = (i % 2) ? (simd[i / 2] & 15) : (simd[i / 2] >> 4);
            CHECK(code == (type == sp::quant_type::nf4 ? sp::detail::nf4_code_of(v[i])
                                                       : sp::detail::fp4_code_of(v[i])));
          }
        });
  }
}

TEST_CASE("SIMD 4-bit dequantize equals the reference loops", "[precision][simd]") {
  std::mt19937 g(7);
  for (auto type : {sp::quant_type::nf4, sp::quant_type::fp4})
    for (dtype out : {dtype::float32, dtype::bfloat16, dtype::float16})
      for (std::size_t bs : {64u, 256u, 4096u, 2u})
        for (std::size_t n : {std::size_t{64}, std::size_t{4096} * 2 + 100, std::size_t{3}}) {
          INFO(sp::name(type) << " " << stowage::name(out) << " bs=" << bs << " n=" << n);
          std::vector<std::uint8_t> packed((n + 1) / 2);
          for (auto& b : packed) b = static_cast<std::uint8_t>(g());
          std::vector<float> absmax((n + bs - 1) / bs);
          std::normal_distribution<float> d(0.0f, 0.05f);
          for (std::size_t b = 0; b < absmax.size(); ++b)
            absmax[b] = b % 7 == 1   ? std::numeric_limits<float>::quiet_NaN()
                        : b % 7 == 2 ? std::numeric_limits<float>::infinity()
                        : b % 7 == 3 ? 0.0f
                        : b % 7 == 4 ? 3e-39f  // products are subnormal
                        : b % 7 == 5 ? 1e5f    // overflows float16
                                     : std::fabs(d(g));
          const std::size_t es = stowage::element_size(out);
          compare_levels(
              [&] {
                std::vector<std::uint8_t> o(n * es);
                sp::dequantize_4bit_raw(packed.data(), absmax.data(), n, type, bs, out, o.data());
                return o;
              },
              [](const auto& ref, const auto& simd) { CHECK(ref == simd); });
        }
}

TEST_CASE("SIMD 4-bit dequantize of a large tensor (streaming stores) equals the reference",
          "[precision][simd]") {
  // 16 MiB of output or more takes the non-temporal store path.
  const std::size_t n = (std::size_t{8} << 20) + 100;
  std::mt19937 g(9);
  std::vector<std::uint8_t> packed((n + 1) / 2);
  for (auto& b : packed) b = static_cast<std::uint8_t>(g());
  std::vector<float> absmax((n + 63) / 64);
  for (std::size_t b = 0; b < absmax.size(); ++b) absmax[b] = static_cast<float>(b % 1000) * 1e-3f;
  for (dtype out : {dtype::float32, dtype::bfloat16}) {
    INFO(stowage::name(out));
    compare_levels(
        [&] {
          std::vector<std::uint8_t> o(n * stowage::element_size(out));
          sp::dequantize_4bit_raw(packed.data(), absmax.data(), n, sp::quant_type::nf4, 64, out,
                                  o.data());
          return o;
        },
        [](const auto& ref, const auto& simd) { CHECK(ref == simd); });
  }
}

TEST_CASE("SIMD int8 quantize and dequantize equal the reference loops", "[precision][simd]") {
  for (dtype in : {dtype::float32, dtype::bfloat16, dtype::float16})
    for (std::size_t cols : {std::size_t{4096}, std::size_t{203}, std::size_t{31}})
      for (float threshold : {0.0f, 6.0f}) {
        INFO(stowage::name(in) << " cols=" << cols << " threshold=" << threshold);
        const std::size_t rows = 9;
        auto vals = tricky_values(rows * cols, static_cast<unsigned>(cols));
        for (std::size_t c = 0; c < cols; ++c) vals[c] = 0.0f;  // an all-zero row
        for (std::size_t c = 0; c < cols; ++c) vals[cols + c] = static_cast<float>(c) * 0.5f;
        // Exact .5 products: row of 127 * k / 254 with absmax 1 gives k/2 for the rounding.
        for (std::size_t c = 0; c < cols; ++c)
          vals[2 * cols + c] = c == 0 ? 1.0f : static_cast<float>(c % 255) / 254.0f;
        // Rows without NaN (the AVX-512 path finds their absmax on bit patterns): plain values,
        // values in float16's subnormal range (the rounding to fp16 decides the absmax), and a
        // row whose absmax overflows float16.
        std::mt19937 g(static_cast<unsigned>(cols));
        std::normal_distribution<float> d(0.0f, 1.0f);
        for (std::size_t c = 0; c < cols; ++c) {
          vals[3 * cols + c] = d(g) * 0.02f;
          vals[4 * cols + c] = d(g) * 3e-6f;
          vals[5 * cols + c] = c == cols / 2 ? -70000.0f : d(g);
        }
        const auto input = as_input(vals, in);
        compare_levels(
            [&] {
              std::vector<std::int8_t> cb(rows * cols, 99);
              std::vector<float> scb(rows, -1.0f);
              sp::quantize_int8_rowwise_raw(input.data(), in, rows, cols, cb.data(), scb.data(),
                                            threshold);
              std::vector<float> deq(rows * cols);
              sp::dequantize_int8_raw(cb.data(), scb.data(), rows, cols, deq.data());
              return std::tuple{cb, bits(scb), bits(deq)};
            },
            [](const auto& ref, const auto& simd) {
              CHECK(std::get<0>(ref) == std::get<0>(simd));
              CHECK(std::get<1>(ref) == std::get<1>(simd));
              CHECK(std::get<2>(ref) == std::get<2>(simd));
            });
      }
}

TEST_CASE("SIMD int8 dequantize of a large tensor (streaming stores) equals the reference",
          "[precision][simd]") {
  // 16 MiB of float32 output or more, rows 16-byte aligned: the non-temporal store path.
  const std::size_t rows = 1031, cols = 4096;
  std::mt19937 g(11);
  std::vector<std::int8_t> cb(rows * cols);
  for (auto& q : cb) q = static_cast<std::int8_t>(g());
  std::vector<float> scb(rows);
  for (std::size_t r = 0; r < rows; ++r) scb[r] = static_cast<float>(r % 97) * 0.37f;
  scb[5] = std::numeric_limits<float>::infinity();
  scb[6] = std::numeric_limits<float>::quiet_NaN();
  compare_levels(
      [&] {
        std::vector<float> out(rows * cols);
        sp::dequantize_int8_raw(cb.data(), scb.data(), rows, cols, out.data());
        return bits(out);
      },
      [](const auto& ref, const auto& simd) { CHECK(ref == simd); });
}

TEST_CASE("SIMD fused products agree with the reference loops", "[precision][simd]") {
  std::mt19937 g(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (std::size_t M : {1u, 2u, 3u, 8u, 13u})
    for (std::size_t K : {4096u, 129u, 100u}) {
      INFO("M=" << M << " K=" << K);
      const std::size_t N = 21;
      std::vector<float> w(N * K), x(M * K);
      for (auto& v : w) v = d(g);
      for (auto& v : x) v = d(g);
      const auto q = sp::quantize_4bit(w.data(), dtype::float32,
                                       std::vector<std::int64_t>{std::int64_t(N), std::int64_t(K)});
      const auto q8 = sp::quantize_int8(w.data(), dtype::float32, N, K);
      // Same weights, different float32 summation order: within 1e-6 of the sum of |terms|.
      const auto wd = sp::dequantize_4bit(q), wd8 = sp::dequantize_int8(q8);
      std::vector<double> mag(M * N), mag8(M * N);
      for (std::size_t m = 0; m < M; ++m)
        for (std::size_t n = 0; n < N; ++n)
          for (std::size_t k = 0; k < K; ++k) {
            mag[m * N + n] += std::fabs(double(x[m * K + k]) * wd[n * K + k]);
            mag8[m * N + n] += std::fabs(double(x[m * K + k]) * wd8[n * K + k]);
          }
      compare_levels(
          [&] {
            std::vector<float> y(M * N), y8(M * N);
            sp::gemm_4bit(x, M, q, y);
            sp::gemm_int8(x, M, q8, y8);
            return std::pair{y, y8};
          },
          [&](const auto& ref, const auto& simd) {
            for (std::size_t i = 0; i < M * N; ++i) {
              CHECK(std::fabs(double(ref.first[i]) - simd.first[i]) <= 1e-6 * mag[i]);
              CHECK(std::fabs(double(ref.second[i]) - simd.second[i]) <= 1e-6 * mag8[i]);
            }
          });
    }
}
