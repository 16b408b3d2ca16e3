// Tests for the decode matrix-vector kernels behind exec::cpu::linear (exec/cpu/matvec.hpp):
// fp32, bf16 and fp16 weights, every batch size 1..16, row lengths with and without a vector
// tail, odd row counts, bias, on the portable loop, AVX2 and AVX-512 (where the CPU has them),
// each against a double-precision product of the same (widened) weights.
#include <stowage/exec/cpu/linear.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/precision/kernels_cpu.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace cpu = stowage::exec::cpu;
namespace pr = stowage::precision;

namespace {
// Puts the process-wide kernel level back when a test ends.
struct simd_guard {
  pr::simd_level saved = pr::kernel_simd().load();
  ~simd_guard() { pr::kernel_simd().store(saved); }
};
}  // namespace

TEST_CASE("matvec kernels: fp32/bf16/fp16, batch 1..8, tails, every instruction set",
          "[exec][linear][matvec]") {
  simd_guard guard;
  stowage::exec::thread_pool pool(2);
  for (const auto level : {pr::simd_level::scalar, pr::simd_level::avx2, pr::simd_level::avx512}) {
    pr::kernel_simd().store(level);
    for (const std::int64_t in : {1, 7, 16, 19, 64, 333, 1024}) {
      for (std::int64_t m = 1; m <= 16; ++m) {
        const std::int64_t out = 41;
        std::vector<float> w(static_cast<std::size_t>(out * in)),
            x(static_cast<std::size_t>(m * in)), bias(static_cast<std::size_t>(out));
        for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::sin(static_cast<float>(i) * 0.37f);
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(static_cast<float>(i) * 0.11f);
        for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = static_cast<float>(i) * 0.01f;
        std::vector<std::uint16_t> wb(w.size()), wh(w.size());
        pr::fp32_to_bf16(w, wb);
        pr::fp32_to_fp16(w, wh);
        std::vector<float> wbf(w.size()), whf(w.size());
        pr::bf16_to_fp32(wb, wbf);
        pr::fp16_to_fp32(wh, whf);
        auto check = [&](const cpu::weight_ref& ref, const std::vector<float>& widened) {
          INFO("level " << static_cast<int>(level) << ", in " << in << ", m " << m << ", "
                        << stowage::name(ref.type));
          const auto y = cpu::linear(x, m, ref, bias, pool);
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t o = 0; o < out; ++o) {
              double s = bias[static_cast<std::size_t>(o)];
              for (std::int64_t k = 0; k < in; ++k)
                s += static_cast<double>(x[static_cast<std::size_t>(i * in + k)]) *
                     widened[static_cast<std::size_t>(o * in + k)];
              CHECK(y[static_cast<std::size_t>(i * out + o)] == Approx(s).margin(1e-4));
            }
        };
        check(cpu::weight_ref::from_f32(w.data(), out, in), w);
        check(cpu::weight_ref::from_bits16(wb.data(), stowage::dtype::bfloat16, out, in), wbf);
        check(cpu::weight_ref::from_bits16(wh.data(), stowage::dtype::float16, out, in), whf);
      }
    }
  }
}

TEST_CASE("matvec kernels: a bf16 weight gives the same floats as its fp32 widening",
          "[exec][linear][matvec]") {
  // The widening is exact and the kernel the same, so the two products agree bit for bit.
  stowage::exec::thread_pool pool(2);
  const std::int64_t out = 67, in = 1024, m = 13;
  std::vector<float> w(static_cast<std::size_t>(out * in)), x(static_cast<std::size_t>(m * in));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::sin(static_cast<float>(i) * 0.21f);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(static_cast<float>(i) * 0.05f);
  std::vector<std::uint16_t> wb(w.size());
  pr::fp32_to_bf16(w, wb);
  std::vector<float> wbf(w.size());
  pr::bf16_to_fp32(wb, wbf);
  CHECK(cpu::linear(
            x, m, cpu::weight_ref::from_bits16(wb.data(), stowage::dtype::bfloat16, out, in), {},
            pool) == cpu::linear(x, m, cpu::weight_ref::from_f32(wbf.data(), out, in), {}, pool));
}
