// tests/support/tiny_fixture.hpp: reading the tiny-model fixtures of tools/gen_tiny_models.py
// (tests/fixtures/tiny/*.json and the model folders beside them), shared by the conformance
// tests, the CUDA tests and the stowage-generate example's logits check so that all of them
// decode the fixtures the same way. Failures are exceptions, not Catch2 assertions, so the
// header also serves programs without Catch2; inside a test case an exception fails the case
// with its message.
#pragma once

#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/exec/llama_forward.hpp>
#include <stowage/precision/convert.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace stowage_test {

#if defined(STOWAGE_FIXTURES_DIR)
/// The folder of the tiny-model fixtures, with a trailing slash.
inline std::string tiny_fixtures_dir() { return std::string(STOWAGE_FIXTURES_DIR) + "/tiny/"; }
#endif

/// A fixture JSON file; std::runtime_error naming it when it cannot be opened.
inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in.good()) throw std::runtime_error("cannot open fixture " + path);
  return nlohmann::json::parse(in);
}

/// The float32 values of a fixture's "f32le_b64" field: standard base64 (padding and other
/// characters skipped) of little-endian float32 bytes.
inline std::vector<float> b64_floats(const std::string& s) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
  };
  std::vector<unsigned char> bytes;
  unsigned acc = 0;
  int bits = 0;
  for (char c : s) {
    const int v = val(c);
    if (v < 0) continue;
    acc = (acc << 6) | static_cast<unsigned>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes.push_back(static_cast<unsigned char>((acc >> bits) & 0xffU));
    }
  }
  std::vector<float> f(bytes.size() / 4);
  std::memcpy(f.data(), bytes.data(), f.size() * 4);
  return f;
}

/// Largest |a[i] - b[i]|; std::invalid_argument when the lengths differ (a wrong logits shape
/// must fail, not compare a prefix).
inline float max_abs_diff(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size())
    throw std::invalid_argument("max_abs_diff: " + std::to_string(a.size()) + " values vs " +
                                std::to_string(b.size()));
  float m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

/// Largest |a[i]|.
inline float max_abs(std::span<const float> a) {
  float m = 0;
  for (float v : a) m = std::max(m, std::abs(v));
  return m;
}

/// Token ids of a fixture array.
inline std::vector<std::int64_t> ids_of(const nlohmann::json& j) {
  return j.get<std::vector<std::int64_t>>();
}

/// Greedy generation of `n` tokens, stopping at `eos`.
inline stowage::exec::generate_options greedy_options(std::int64_t n,
                                                      std::vector<std::int64_t> eos = {}) {
  stowage::exec::generate_options o;
  o.max_new_tokens = n;
  o.eos_token_ids = std::move(eos);
  return o;
}

/// The weights of one tiny model's model.safetensors (float32), served as they are or
/// re-stored as bfloat16 / float16 (the rounding Transformers' fixture runs applied).
struct loaded_model {
  stowage::exec::llama_dims dims;
  stowage::checkpoint::safetensors_file file;
  std::vector<std::unique_ptr<std::vector<std::uint16_t>>> converted;
  std::unique_ptr<stowage::exec::named_llama_weights> weights;

  loaded_model(const std::string& dir, stowage::dtype store)
      : dims(stowage::exec::llama_dims::from_file(dir + "/config.json")),
        file(stowage::checkpoint::safetensors_file::open(dir + "/model.safetensors")) {
    namespace ex = stowage::exec;
    weights = std::make_unique<ex::named_llama_weights>(
        dims, [this, dir, store](std::string_view name) -> std::optional<ex::weight_ref> {
          const auto* e = file.find(name);
          if (!e) return std::nullopt;
          const auto v = file.view(*e);
          if (v.desc.dtype != stowage::dtype::float32)
            throw std::runtime_error("tiny fixture " + dir + ": `" + std::string(name) +
                                     "` is not float32");
          const auto& sh = v.desc.shape;
          const std::int64_t rows = sh.rank() == 2 ? sh[0] : 1;
          const std::int64_t cols = sh.rank() == 2 ? sh[1] : sh[0];
          const auto* f = reinterpret_cast<const float*>(v.data());
          if (store == stowage::dtype::float32)
            return ex::weight_ref::from_f32(f, rows, cols, std::string(name));
          auto buf =
              std::make_unique<std::vector<std::uint16_t>>(static_cast<std::size_t>(rows * cols));
          const std::span<const float> src(f, buf->size());
          if (store == stowage::dtype::bfloat16)
            stowage::precision::fp32_to_bf16(src, *buf);
          else
            stowage::precision::fp32_to_fp16(src, *buf);
          auto ref = ex::weight_ref::from_bits16(buf->data(), store, rows, cols, std::string(name));
          converted.push_back(std::move(buf));
          return ref;
        });
  }
};

}  // namespace stowage_test
