// Conformance: LLM.int8 weight quantization (Int8Params), dequantization and the mixed-precision
// matmul with outlier decomposition against the real bitsandbytes (tests/fixtures/bnb/int8.json).
#include <catch2/catch.hpp>

#include <stowage/precision/int8.hpp>

#include "bnb_fixture.hpp"

#include <bit>
#include <cmath>

namespace sp = stowage::precision;
using stowage::dtype;

TEST_CASE("int8 weights, SCB and dequantization match bitsandbytes", "[bnb][int8]") {
  const auto fx = bnb_fixture::load("int8.json");
  for (const auto& c : fx["cases"]) {
    INFO("case " << c["name"].get<std::string>());
    const auto dt = stowage::dtype_from_name(c["dtype"].get<std::string>());
    const auto in = bnb_fixture::base64(c["input"]);
    const auto rows = c["shape"][0].get<std::size_t>(), cols = c["shape"][1].get<std::size_t>();
    const auto q = sp::quantize_int8(in.data(), dt, rows, cols);
    const auto cb_expected = bnb_fixture::tensor<std::int8_t>(c["CB"]);
    REQUIRE(cb_expected.size() == q.cb.size());
    for (std::size_t i = 0; i < q.cb.size(); ++i) {
      INFO("element " << i << " x=" << sp::detail::load_as_f32(in.data(), i, dt));
      CHECK(int(q.cb[i]) == int(cb_expected[i]));
    }
    const auto scb = bnb_fixture::tensor<float>(c["SCB"]);
    REQUIRE(scb.size() == rows);
    for (std::size_t r = 0; r < rows; ++r)
      CHECK(std::bit_cast<std::uint32_t>(q.scb[r]) == std::bit_cast<std::uint32_t>(scb[r]));
    const auto deq = sp::dequantize_int8(q);
    const auto expected = bnb_fixture::tensor<float>(c["dequantized"]);
    REQUIRE(deq.size() == expected.size());
    for (std::size_t i = 0; i < deq.size(); ++i) {
      if (scb[i / cols] == 0.0f) continue;  // all-zero row: bnb's torch path divides 0 by 0 (NaN)
      CHECK(std::bit_cast<std::uint32_t>(deq[i]) == std::bit_cast<std::uint32_t>(expected[i]));
    }
  }
  CHECK(sp::quantized_size_int8(48, 200, true).total() == 48 * 200 + 48 * 4 + 1);
}

TEST_CASE("LLM.int8 mixed-precision matmul matches bitsandbytes", "[bnb][int8]") {
  const auto fx = bnb_fixture::load("int8.json");
  const auto& mm = fx["matmul"];
  sp::quantized_int8 w;
  w.rows = mm["shape_W"][0];
  w.cols = mm["shape_W"][1];
  w.cb = bnb_fixture::tensor<std::int8_t>(mm["CB"]);
  w.scb = bnb_fixture::tensor<float>(mm["SCB"]);
  const auto bias32 = bnb_fixture::tensor<float>(mm["bias"]);
  for (const auto& c : mm["cases"]) {
    INFO("case " << c["name"].get<std::string>());
    const auto dt = stowage::dtype_from_name(c["dtype"].get<std::string>());
    const auto raw = bnb_fixture::base64(c["A"]);
    const std::size_t M = c["shape_A"][0], K = c["shape_A"][1];
    std::vector<float> a(M * K), bias(bias32.size());
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = sp::detail::load_as_f32(raw.data(), i, dt);
    for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = sp::detail::round_to(bias32[i], dt);
    const auto r = sp::int8_matmul(a, dt, M, w, bias, {.threshold = c["threshold"].get<float>()});
    CHECK(r.outlier_cols == c["outlier_cols"].get<std::vector<std::size_t>>());
    CHECK(r.ca == bnb_fixture::tensor<std::int8_t>(c["CA"]));
    const auto sca = bnb_fixture::tensor<float>(c["SCA"]);
    for (std::size_t m = 0; m < M; ++m) CHECK(r.sca[m] == sca[m]);
    std::vector<std::int32_t> acc(M * w.rows);
    sp::int8_linear_matmul_raw(r.ca.data(), M, w.cb.data(), w.rows, K, acc.data());
    CHECK(acc == bnb_fixture::tensor<std::int32_t>(c["acc"]));
    // Output: bnb's CPU scale constant has a typo (6.200124e-05 vs 1/16129, ~1.8e-5 relative)
    // and rounding to fp16/bf16 happens at slightly different points: compare to a tolerance of
    // two units in the last place of the activation dtype.
    const auto out_raw = bnb_fixture::base64(c["out"]);
    double scale = 0;
    for (std::size_t i = 0; i < M * w.rows; ++i)
      scale = std::max(scale,
                       std::fabs(double(acc[i]) * r.sca[i / w.rows] * w.scb[i % w.rows] / 16129.0));
    const float ulp = dt == dtype::bfloat16 ? 0x1p-7f : dt == dtype::float16 ? 0x1p-10f : 0x1p-20f;
    for (std::size_t i = 0; i < M * w.rows; ++i) {
      const float e = sp::detail::load_as_f32(out_raw.data(), i, dt);
      INFO("output " << i << " bnb " << e << " ours " << r.out[i]);
      CHECK(std::fabs(r.out[i] - e) <= 2.0f * ulp * std::max(std::fabs(e), 1.0f) + 2.5e-5 * scale);
    }
  }
}
