// fp32 <-> fp16 / bf16 conversion against torch's own results (convert/fp32_narrowing.json,
// made with tensor .to() on CPU by tools/gen_checkpoint_fixtures.py): the formats-spec §4 edge
// vectors, NaNs, subnormals and 4000 random patterns narrowed, and every float16 pattern widened.
#include <stowage/precision/convert.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_test_util.hpp"

#include <bit>
#include <cstdio>

using namespace stowage;
using namespace stowage::precision;

namespace {
std::uint32_t hex32(const std::string& s) {
  return static_cast<std::uint32_t>(std::stoul(s, nullptr, 16));
}
std::string h(std::uint32_t v, int w) {
  char b[16];
  std::snprintf(b, sizeof b, "%0*x", w, v);
  return b;
}
}  // namespace

TEST_CASE("convert: fp32 -> fp16/bf16 bit-identical to torch .to()", "[precision][convert]") {
  const auto j = ckpt_test::read_json(ckpt_test::fixtures() / "convert" / "fp32_narrowing.json");
  const auto f32 = j["f32"].get<std::vector<std::string>>();
  const auto f16 = j["f16"].get<std::vector<std::string>>();
  const auto bf16 = j["bf16"].get<std::vector<std::string>>();
  REQUIRE(f32.size() == f16.size());
  REQUIRE(f32.size() > 4000);
  std::vector<float> in;
  std::size_t bad16 = 0, badbf = 0;
  for (std::size_t i = 0; i < f32.size(); ++i) {
    const float x = std::bit_cast<float>(hex32(f32[i]));
    in.push_back(x);
    if (h(fp32_to_fp16_bits(x), 4) != f16[i]) {
      if (bad16++ < 5)
        FAIL_CHECK("fp16 of " << f32[i] << ": got " << h(fp32_to_fp16_bits(x), 4) << ", torch "
                              << f16[i]);
    }
    if (h(fp32_to_bf16_bits(x), 4) != bf16[i]) {
      if (badbf++ < 5)
        FAIL_CHECK("bf16 of " << f32[i] << ": got " << h(fp32_to_bf16_bits(x), 4) << ", torch "
                              << bf16[i]);
    }
  }
  CHECK(bad16 == 0);
  CHECK(badbf == 0);
  // The bulk loops (vectorised / F16C where available) give the same bits.
  std::vector<std::uint16_t> o16(in.size()), obf(in.size());
  fp32_to_fp16(in, o16);
  fp32_to_bf16(in, obf);
  std::size_t bulk_bad = 0;
  for (std::size_t i = 0; i < in.size(); ++i)
    bulk_bad += (h(o16[i], 4) != f16[i]) + (h(obf[i], 4) != bf16[i]);
  CHECK(bulk_bad == 0);
}

TEST_CASE("convert: every fp16 pattern widens exactly as torch", "[precision][convert]") {
  const auto j = ckpt_test::read_json(ckpt_test::fixtures() / "convert" / "fp32_narrowing.json");
  const auto all = j["f16_to_f32_every_pattern"].get<std::string>();
  REQUIRE(all.size() == 65536 * 8);
  std::vector<std::uint16_t> pats(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) pats[i] = static_cast<std::uint16_t>(i);
  std::vector<float> out(65536);
  fp16_to_fp32(pats, out);
  std::size_t bad = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto want = hex32(all.substr(i * 8, 8));
    bad += std::bit_cast<std::uint32_t>(fp16_bits_to_fp32(static_cast<std::uint16_t>(i))) != want;
    bad += std::bit_cast<std::uint32_t>(out[i]) != want;
  }
  CHECK(bad == 0);
  // bf16 widening is the bit shift.
  CHECK(std::bit_cast<std::uint32_t>(bf16_bits_to_fp32(0x3f80)) == 0x3f800000U);
}

TEST_CASE("convert: formats-spec §4 vectors", "[precision][convert]") {
  auto bf = [](std::uint32_t u) { return fp32_to_bf16_bits(std::bit_cast<float>(u)); };
  auto hf = [](std::uint32_t u) { return fp32_to_fp16_bits(std::bit_cast<float>(u)); };
  CHECK(bf(0x3f808000) == 0x3f80);
  CHECK(bf(0x3f818000) == 0x3f82);
  CHECK(bf(0x7f7f8000) == 0x7f80);
  CHECK(bf(0x00018000) == 0x0002);
  CHECK(hf(0x387fe000) == 0x0400);
  CHECK(hf(0x477ff000) == 0x7c00);
  CHECK(hf(0x33400000) == 0x0001);
  CHECK(hf(0x80000001) == 0x8000);
}

TEST_CASE("convert: convert_elements between the float types", "[precision][convert]") {
  const std::vector<float> src{1.0f, -2.5f, 65520.0f, 1e-8f};
  std::vector<std::uint16_t> half(4), bf(4);
  convert_elements(reinterpret_cast<const std::byte*>(src.data()), dtype::float32,
                   reinterpret_cast<std::byte*>(half.data()), dtype::float16, 4);
  CHECK(half == std::vector<std::uint16_t>{0x3c00, 0xc100, 0x7c00, 0x0000});
  convert_elements(reinterpret_cast<const std::byte*>(half.data()), dtype::float16,
                   reinterpret_cast<std::byte*>(bf.data()), dtype::bfloat16, 4);
  CHECK(bf == std::vector<std::uint16_t>{0x3f80, 0xc020, 0x7f80, 0x0000});
  CHECK_THROWS_AS(convert_elements(nullptr, dtype::int8, nullptr, dtype::float16, 0),
                  invalid_dtype);
}
