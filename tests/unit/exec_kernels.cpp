// Unit tests of the CPU execution building blocks' contracts: the thread pool covers every
// index exactly once (also nested and with exceptions), linear accepts bf16 / a row decoder
// and rejects bad sizes, greedy picks the first maximum, top-k keeps ties, top-p keeps at least
// one token, and a seeded sampler is reproducible.
#include <stowage/exec/cpu/linear.hpp>
#include <stowage/exec/cpu/rope.hpp>
#include <stowage/exec/cpu/sampling.hpp>
#include <stowage/exec/thread_pool.hpp>
#include <stowage/precision/convert.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace ex = stowage::exec;
namespace cpu = stowage::exec::cpu;

TEST_CASE("thread_pool: every index once, nesting runs inline, exceptions reach the caller",
          "[exec][pool]") {
  ex::thread_pool pool(3);
  CHECK(pool.size() == 3);
  for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{1000}}) {
    std::vector<std::atomic<int>> hits(n);
    pool.parallel_for(n, 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        hits[i].fetch_add(1);
        pool.parallel_for(4, 1, [](std::size_t, std::size_t) {});  // nested: inline
      }
    });
    for (auto& h : hits) CHECK(h.load() == 1);
  }
  CHECK_THROWS_AS(pool.parallel_for(100, 1,
                                    [](std::size_t b, std::size_t) {
                                      if (b == 0) throw std::runtime_error("boom");
                                    }),
                  std::runtime_error);
  int calls = 0;
  pool.parallel_for(0, 1, [&](std::size_t, std::size_t) { ++calls; });
  CHECK(calls == 0);
}

TEST_CASE("linear: fp32, bf16 and a row decoder agree; sizes are checked", "[exec][linear]") {
  ex::thread_pool pool(2);
  const std::int64_t out = 37, in = 19, m = 3;
  std::vector<float> w(out * in), x(m * in);
  for (std::size_t i = 0; i < w.size(); ++i)
    w[i] = static_cast<float>((i * 7) % 11) * 0.25f - 1.0f;  // exact in bf16
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 5) % 13) * 0.5f - 3.0f;
  std::vector<float> bias(out, 0.5f);
  const auto y32 = cpu::linear(x, m, cpu::weight_ref::from_f32(w.data(), out, in), bias, pool);
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double s = 0.5;
      for (std::int64_t i = 0; i < in; ++i) s += static_cast<double>(x[r * in + i]) * w[o * in + i];
      CHECK(y32[r * out + o] == Approx(s).margin(1e-5));
    }
  std::vector<std::uint16_t> wb(w.size());
  stowage::precision::fp32_to_bf16(w, wb);
  CHECK(cpu::linear(x, m,
                    cpu::weight_ref::from_bits16(wb.data(), stowage::dtype::bfloat16, out, in),
                    bias, pool) == y32);
  cpu::weight_ref dec;
  dec.type = stowage::dtype::int8;
  dec.rows = out;
  dec.cols = in;
  dec.decode_ctx = &w;
  dec.decode = [](const void* ctx, std::int64_t r0, std::int64_t r1, float* o) {
    const auto& src = *static_cast<const std::vector<float>*>(ctx);
    std::copy(src.begin() + r0 * 19, src.begin() + r1 * 19, o);
  };
  CHECK(cpu::linear(x, m, dec, bias, pool) == y32);
  cpu::weight_ref bad = dec;
  bad.decode = nullptr;
  CHECK_THROWS_AS(cpu::linear(x, m, bad, bias, pool), stowage::invalid_dtype);
  CHECK_THROWS_AS(cpu::linear(x, m + 1, cpu::weight_ref::from_f32(w.data(), out, in), bias, pool),
                  stowage::invalid_size);
}

TEST_CASE("sampling: greedy, top-k ties, top-p floor, seeded reproducibility", "[exec][sampling]") {
  const std::vector<float> l{1.0f, 3.0f, 3.0f, -2.0f, 0.5f};
  CHECK(cpu::argmax(l) == 1);
  cpu::sampling_options o;
  o.top_k = 1;
  auto s = l;
  cpu::warp_logits(s, o);
  CHECK(std::isfinite(s[1]));
  CHECK(std::isfinite(s[2]));  // tied with the k-th value: kept
  CHECK(std::isinf(s[0]));
  o.top_k = 0;
  o.top_p = 1e-6f;
  s = l;
  cpu::warp_logits(s, o);
  int kept = 0;
  for (float v : s) kept += std::isfinite(v) ? 1 : 0;
  CHECK(kept == 1);
  o.top_p = 0.9f;
  o.do_sample = true;
  o.temperature = 0.7f;
  o.seed = 123;
  cpu::sampler a(o), b(o);
  for (int i = 0; i < 50; ++i) CHECK(a.next(l) == b.next(l));
  o.temperature = 0;
  CHECK_THROWS_AS(cpu::warp_logits(s, o), stowage::invalid_config);
}

TEST_CASE("rope: default inverse frequencies and rejected types", "[exec][rope]") {
  cpu::rope_params p;
  p.dim = 8;
  p.theta = 10000.0;
  const cpu::rotary_embedding r(p);
  const auto f = r.inv_freq();
  REQUIRE(f.size() == 4);
  CHECK(f[0] == 1.0f);
  CHECK(f[2] == Approx(0.01).epsilon(1e-6));  // 10000^(-4/8)
  p.type = "yarn";
  CHECK_THROWS_AS(cpu::rotary_embedding(p), stowage::invalid_config);
  p.type = "default";
  p.dim = 7;
  CHECK_THROWS_AS(cpu::rotary_embedding(p), stowage::invalid_config);
}
