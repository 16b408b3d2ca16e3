// Unit tests: quantized precision policies, exact sizes, QuantState JSON formatting and the fused
// CPU kernels (gemm_4bit, gemm_int8) against dequantize-then-multiply in double precision.
#include <catch2/catch.hpp>

#include <stowage/precision/int8.hpp>
#include <stowage/precision/nf4.hpp>

#include <cmath>
#include <random>

namespace sp = stowage::precision;
using stowage::dtype;

static_assert(stowage::precision_policy<sp::nf4<sp::bf16, true, 64>>);
static_assert(stowage::is_quantized_v<sp::nf4<>> && stowage::is_quantized_v<sp::int8<>>);
static_assert(sp::nf4<sp::fp16>::compute_dtype == dtype::float16);
static_assert(sp::fp4<>::storage_dtype == dtype::uint8 && sp::int8<>::storage_dtype == dtype::int8);

TEST_CASE("exact quantized sizes", "[precision][size]") {
  // 4096 x 11008 (a Llama MLP weight), nf4, block 64, with and without double quantization.
  const std::uint64_t n = 4096ull * 11008;
  const auto plain = sp::quantized_size_4bit(n, 64, false);
  CHECK(plain.packed == n / 2);
  CHECK(plain.absmax == n / 64 * 4);
  CHECK(plain.total() == n / 2 + n / 64 * 4 + 64);
  const auto dq = sp::nf4<sp::bf16, true, 64>::size(n);
  CHECK(dq.absmax == n / 64);
  CHECK(dq.nested_absmax == (n / 64 + 255) / 256 * 4);
  CHECK(dq.total() == n / 2 + n / 64 + (n / 64 + 255) / 256 * 4 + 4 + 64 + 1024);
  // Odd numel and a partial last block.
  const auto odd = sp::quantized_size_4bit(129, 64, false);
  CHECK(odd.packed == 65);
  CHECK(odd.absmax == 3 * 4);
  for (std::uint64_t bs : {64u, 128u, 256u, 512u, 1024u, 2048u, 4096u})
    CHECK(sp::quantized_size_4bit(10000, bs, true).absmax == (10000 + bs - 1) / bs);
  CHECK(sp::int8<>::size(4096, 4096).total() == 4096ull * 4096 + 4096 * 4);
}

TEST_CASE("nested_offset is written as Python's repr", "[precision][json]") {
  using sp::detail::python_float_repr;
  CHECK(python_float_repr(static_cast<double>(0.14479751884937286f)) == "0.14479751884937286");
  CHECK(python_float_repr(1.0) == "1.0");
  CHECK(python_float_repr(1e-05) == "1e-05");
  CHECK(python_float_repr(0.0001) == "0.0001");
  CHECK(python_float_repr(1e16) == "1e+16");
  CHECK(python_float_repr(123456.5) == "123456.5");
  CHECK(python_float_repr(-2.5e-07) == "-2.5e-07");
}

namespace {
std::vector<float> random_weights(std::size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}
}  // namespace

TEST_CASE("fused gemm_4bit equals dequantize-then-multiply", "[precision][gemm]") {
  struct shape_case {
    std::size_t N, K, bs, M;
    sp::quant_type t;
  };
  for (auto sc : {shape_case{16, 256, 64, 1, sp::quant_type::nf4},
                  shape_case{7, 129, 64, 3, sp::quant_type::nf4},   // odd K: blocks cross rows
                  shape_case{9, 100, 128, 9, sp::quant_type::fp4},  // batch > 8
                  shape_case{33, 4096, 4096, 5, sp::quant_type::nf4}}) {
    INFO("N=" << sc.N << " K=" << sc.K << " bs=" << sc.bs << " M=" << sc.M);
    const auto w = random_weights(sc.N * sc.K, 1);
    const std::vector<std::int64_t> shape{static_cast<std::int64_t>(sc.N),
                                          static_cast<std::int64_t>(sc.K)};
    const auto q =
        sp::quantize_4bit(w.data(), dtype::float32, shape,
                          {.type = sc.t, .blocksize = sc.bs, .double_quant = true, .offset = {}});
    const auto wd = sp::dequantize_4bit(q);
    const auto x = random_weights(sc.M * sc.K, 2);
    for (unsigned threads : {1u, 2u}) {
      sp::kernel_threads() = threads;
      std::vector<float> y(sc.M * sc.N);
      sp::gemm_4bit(x, sc.M, q, y);
      for (std::size_t m = 0; m < sc.M; ++m)
        for (std::size_t n = 0; n < sc.N; ++n) {
          double ref = 0, mag = 0;
          for (std::size_t k = 0; k < sc.K; ++k) {
            ref += double(x[m * sc.K + k]) * double(wd[n * sc.K + k]);
            mag += std::fabs(double(x[m * sc.K + k]) * double(wd[n * sc.K + k]));
          }
          CHECK(std::fabs(y[m * sc.N + n] - ref) <= 1e-6 * mag + 1e-12);
        }
    }
    sp::kernel_threads() = 0;
  }
}

TEST_CASE("fused gemm_int8 equals dequantize-then-multiply", "[precision][gemm]") {
  for (std::size_t M : {1u, 4u, 11u}) {
    const std::size_t N = 13, K = 203;
    const auto w = random_weights(N * K, 3);
    const auto q = sp::quantize_int8(w.data(), dtype::float32, N, K);
    const auto wd = sp::dequantize_int8(q);
    const auto x = random_weights(M * K, 4);
    std::vector<float> y(M * N);
    sp::gemm_int8(x, M, q, y);
    for (std::size_t m = 0; m < M; ++m)
      for (std::size_t n = 0; n < N; ++n) {
        double ref = 0, mag = 0;
        for (std::size_t k = 0; k < K; ++k) {
          ref += double(x[m * K + k]) * double(wd[n * K + k]);
          mag += std::fabs(double(x[m * K + k]) * double(wd[n * K + k]));
        }
        CHECK(std::fabs(y[m * N + n] - ref) <= 1e-6 * mag + 1e-12);
      }
  }
}

TEST_CASE("bad arguments throw typed errors", "[precision][errors]") {
  std::vector<float> x(100);
  const std::vector<std::int64_t> shape{100};
  CHECK_THROWS_AS(
      sp::quantize_4bit(
          x.data(), dtype::float32, shape,
          {.type = sp::quant_type::nf4, .blocksize = 32, .double_quant = false, .offset = {}}),
      stowage::invalid_config);
  CHECK_THROWS_AS(sp::quantize_4bit(x.data(), dtype::int32, shape), stowage::invalid_dtype);
  const auto q = sp::quantize_4bit(x.data(), dtype::float32, shape);
  std::vector<float> y(3);
  CHECK_THROWS_AS(sp::gemm_4bit(x, 1, q, y), stowage::invalid_config);
}
