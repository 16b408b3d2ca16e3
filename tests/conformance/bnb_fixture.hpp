// tests/conformance/bnb_fixture.hpp: reads the bitsandbytes fixtures written by
// tools/gen_bnb_fixtures.py (JSON with base64 little-endian tensor bytes).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnb_fixture {

inline nlohmann::json load(const std::string& name) {
  const std::string path = std::string(STOWAGE_FIXTURES_DIR) + "/bnb/" + name;
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open fixture " + path);
  return nlohmann::json::parse(f);
}

inline std::vector<std::uint8_t> base64(const std::string& s) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::vector<std::uint8_t> out;
  unsigned buf = 0;
  int bits = 0;
  for (char c : s) {
    const int v = val(c);
    if (v < 0) continue;  // '=' padding
    buf = (buf << 6) | static_cast<unsigned>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<std::uint8_t>((buf >> bits) & 0xffu));
    }
  }
  return out;
}

template <class T>
std::vector<T> tensor(const nlohmann::json& j) {
  const auto bytes = base64(j.get<std::string>());
  std::vector<T> v(bytes.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
  return v;
}

}  // namespace bnb_fixture
