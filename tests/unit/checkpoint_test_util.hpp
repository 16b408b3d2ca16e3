// tests/unit/checkpoint_test_util.hpp: helpers shared by the checkpoint tests: fixture paths,
// the *.expected.json files written by tools/gen_checkpoint_fixtures.py (tensor bytes as hex),
// and whole-file reads. Not a test itself (the test glob takes *.cpp only).
#pragma once

#include <stowage/core/dtype.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace ckpt_test {

inline std::filesystem::path fixtures() {
  return std::filesystem::path(STOWAGE_FIXTURES_DIR) / "checkpoints";
}

inline std::vector<std::byte> read_all(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + p.string());
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  for (std::size_t i = 0; i < c.size(); ++i) out[i] = static_cast<std::byte>(c[i]);
  return out;
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline nlohmann::json read_json(const std::filesystem::path& p) {
  return nlohmann::json::parse(read_text(p));
}

inline std::vector<std::byte> unhex(const std::string& h) {
  std::vector<std::byte> out(h.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<std::byte>(std::stoi(h.substr(2 * i, 2), nullptr, 16));
  return out;
}

struct expected_tensor {
  std::string name;
  stowage::dtype dtype;
  stowage::shape shape;
  std::vector<std::byte> bytes;
};

/// The tensors of a *.expected.json, in the order Python listed them.
inline std::vector<expected_tensor> expected_tensors(const std::filesystem::path& p) {
  std::vector<expected_tensor> out;
  const nlohmann::json doc = read_json(p);
  for (const auto& t : doc["tensors"]) {
    std::vector<std::int64_t> dims = t["shape"].get<std::vector<std::int64_t>>();
    out.push_back(
        {t["name"].get<std::string>(), stowage::dtype_from_name(t["dtype"].get<std::string>()),
         stowage::shape(std::span<const std::int64_t>(dims)), unhex(t["hex"].get<std::string>())});
  }
  return out;
}

inline bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace ckpt_test
