// precision::fp32_to_bf16_bytes_streaming, the non-temporal float32 -> bfloat16 loop a checkpoint
// load writes its host tensors with: the same bits as the scalar torch rule fp32_to_bf16_bits
// (itself checked against torch's own .to() output in checkpoint_convert.cpp) on the edge values
// (signed zeros, denormals, rounding ties, overflow to infinity, infinities, NaN payloads), at
// every destination alignment and length around the 16-element step, and on a large sample of
// all 2^32 patterns; torch's fixture vectors too.
#include <stowage/precision/convert.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_test_util.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sp = stowage::precision;

namespace {

/// Converts `in` with the streaming loop into a buffer at byte offset `shift` and returns how
/// many elements differ from the scalar rule; the guard bytes around the output must survive.
std::size_t streaming_mismatches(const std::vector<std::uint32_t>& in, std::size_t shift) {
  std::vector<std::byte> src(in.size() * 4);
  if (!in.empty()) std::memcpy(src.data(), in.data(), src.size());
  std::vector<std::byte> dst(in.size() * 2 + shift + 64 + 32, std::byte{0xa5});
  // 32-byte aligned base, then `shift`: every alignment of the destination's head.
  auto base = reinterpret_cast<std::uintptr_t>(dst.data());
  const std::size_t lead = (32 - base % 32) % 32;
  std::byte* out = dst.data() + lead + shift;
  sp::fp32_to_bf16_bytes_streaming(src.data(), out, in.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    std::uint16_t h;
    std::memcpy(&h, out + 2 * i, 2);
    bad += h != sp::fp32_to_bf16_bits(std::bit_cast<float>(in[i]));
  }
  for (std::byte* p = dst.data(); p < out; ++p) bad += *p != std::byte{0xa5};
  for (std::byte* p = out + 2 * in.size(); p < dst.data() + dst.size(); ++p)
    bad += *p != std::byte{0xa5};
  return bad;
}

/// The patterns where rounding, denormals, infinities and NaNs change behaviour.
std::vector<std::uint32_t> edge_patterns() {
  std::vector<std::uint32_t> v;
  for (std::uint32_t sign : {0u, 0x80000000u}) {
    for (std::uint32_t u :
         {0x00000000u, 0x00000001u, 0x00007fffu, 0x00008000u, 0x00008001u,  // denormal ties
          0x00018000u, 0x0000ffffu, 0x00010000u, 0x007fffffu, 0x007f8000u,  // denormal top
          0x00800000u, 0x3f800000u, 0x3f808000u, 0x3f818000u, 0x3f807fffu,  // normal ties
          0x3f808001u, 0x3f80ffffu, 0x7f7f0000u, 0x7f7f7fffu, 0x7f7f8000u,  // to +-inf
          0x7f7fffffu, 0x7f800000u,                                         // infinity
          0x7f800001u, 0x7f807fffu, 0x7f808000u, 0x7fbfffffu, 0x7fc00000u,  // NaN payloads
          0x7fc00001u, 0x7fff8000u, 0x7fffffffu})
      v.push_back(sign | u);
  }
  return v;
}

}  // namespace

TEST_CASE("bf16 streaming conversion: edge values at every alignment and length",
          "[precision][convert]") {
  const auto edges = edge_patterns();
  // Lengths around the 16-element step and the alignment head (up to 15 elements).
  for (std::size_t len : {0u, 1u, 15u, 16u, 17u, 31u, 32u, 33u, 47u, 48u, 63u, 64u, 65u, 100u}) {
    std::vector<std::uint32_t> in(len);
    for (std::size_t i = 0; i < len; ++i) in[i] = edges[(i * 7 + len) % edges.size()];
    for (std::size_t shift = 0; shift < 34; ++shift) {
      INFO("length " << len << ", destination offset " << shift);
      CHECK(streaming_mismatches(in, shift) == 0);
    }
  }
  // Every edge value in every lane of a full step.
  std::vector<std::uint32_t> all;
  for (std::size_t lane = 0; lane < 16; ++lane)
    for (auto e : edges) {
      std::vector<std::uint32_t> step(16, 0x3f800000u);
      step[lane] = e;
      all.insert(all.end(), step.begin(), step.end());
    }
  CHECK(streaming_mismatches(all, 0) == 0);
  CHECK(streaming_mismatches(all, 2) == 0);
}

TEST_CASE("bf16 streaming conversion: a large sample of all float32 patterns",
          "[precision][convert]") {
  // Every high half with the low halves where rounding turns (ties and their neighbours), and
  // a stride through all 2^32 patterns: ~17M + 0.4M elements in 4 MiB pieces.
  std::vector<std::uint32_t> in;
  in.reserve(std::size_t{1} << 20);
  std::size_t bad = 0, checked = 0;
  auto flush = [&](std::size_t shift) {
    bad += streaming_mismatches(in, shift);
    checked += in.size();
    in.clear();
  };
  for (std::uint32_t hi = 0; hi < 0x10000u; ++hi)
    for (std::uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      in.push_back(hi << 16 | lo);
      if (in.size() == (std::size_t{1} << 20)) flush(0);
    }
  flush(6);
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 251) {
    in.push_back(static_cast<std::uint32_t>(u));
    if (in.size() == (std::size_t{1} << 20)) flush(checked % 32);
  }
  flush(0);
  CHECK(checked > 17'000'000);
  CHECK(bad == 0);
}

TEST_CASE("bf16 streaming conversion: torch's fixture vectors", "[precision][convert]") {
  const auto j = ckpt_test::read_json(ckpt_test::fixtures() / "convert" / "fp32_narrowing.json");
  const auto f32 = j["f32"].get<std::vector<std::string>>();
  const auto bf16 = j["bf16"].get<std::vector<std::string>>();
  REQUIRE(f32.size() == bf16.size());
  REQUIRE(f32.size() > 4000);
  std::vector<std::byte> src(f32.size() * 4);
  for (std::size_t i = 0; i < f32.size(); ++i) {
    const auto u = static_cast<std::uint32_t>(std::stoul(f32[i], nullptr, 16));
    std::memcpy(src.data() + 4 * i, &u, 4);
  }
  std::vector<std::byte> dst(f32.size() * 2 + 64);
  for (std::size_t shift : {0u, 2u, 30u}) {
    sp::fp32_to_bf16_bytes_streaming(src.data(), dst.data() + shift, f32.size());
    std::size_t bad = 0;
    for (std::size_t i = 0; i < f32.size(); ++i) {
      std::uint16_t h;
      std::memcpy(&h, dst.data() + shift + 2 * i, 2);
      bad += h != static_cast<std::uint16_t>(std::stoul(bf16[i], nullptr, 16));
    }
    INFO("destination offset " << shift);
    CHECK(bad == 0);
  }
}
