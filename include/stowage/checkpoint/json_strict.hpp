// stowage/checkpoint/json_strict.hpp: JSON parsing for foreign checkpoint metadata (safetensors
// headers, *.index.json, offload index.json) that REJECTS duplicate object keys. nlohmann's
// parser silently keeps the last duplicate, which would let a file show one tensor to one
// reader and another to us; a SAX handler that builds the DOM itself can refuse them. Also a
// strict UTF-8 validator (the safetensors reference checks UTF-8 before JSON).
#pragma once

#include <stowage/config.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace stowage::detail {

/// Byte offset of the first invalid UTF-8 sequence, or nullopt when `s` is valid UTF-8
/// (no overlong forms, no surrogates, nothing above U+10FFFF), as Rust's str::from_utf8.
inline std::optional<std::size_t> find_invalid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return i;
    i += len;
  }
  return std::nullopt;
}

/// Builds a DOM like nlohmann's own parser, but fails on a key repeated inside one object.
/// Nesting is capped so hostile input cannot exhaust the stack of later recursive walks.
template <class Json>
class strict_json_builder {
 public:
  using number_integer_t = typename Json::number_integer_t;
  using number_unsigned_t = typename Json::number_unsigned_t;
  using number_float_t = typename Json::number_float_t;
  using string_t = typename Json::string_t;
  using binary_t = typename Json::binary_t;

  static constexpr std::size_t max_depth = 64;

  explicit strict_json_builder(Json& root) : root_(root) {}

  bool null() { return put(Json(nullptr)); }
  bool boolean(bool v) { return put(Json(v)); }
  bool number_integer(number_integer_t v) { return put(Json(v)); }
  bool number_unsigned(number_unsigned_t v) { return put(Json(v)); }
  bool number_float(number_float_t v, const string_t&) { return put(Json(v)); }
  bool string(string_t& v) { return put(Json(std::move(v))); }
  bool binary(binary_t& v) { return put(Json::binary(std::move(v))); }
  bool start_object(std::size_t) {
    if (stack_.size() >= max_depth) return fail("JSON nested deeper than 64 levels");
    Json* j = place(Json(nlohmann::json::value_t::object));
    if (!j) return false;
    stack_.push_back(j);
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) {
    if (!keys_.back().insert(k).second) {
      duplicate_key = k;
      return fail("duplicate key \"" + k + "\"");
    }
    pending_key_ = std::move(k);
    return true;
  }
  bool end_object() {
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) {
    if (stack_.size() >= max_depth) return fail("JSON nested deeper than 64 levels");
    Json* j = place(Json(nlohmann::json::value_t::array));
    if (!j) return false;
    stack_.push_back(j);
    keys_.emplace_back();
    return true;
  }
  bool end_array() {
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }
  bool parse_error(std::size_t pos, const std::string&, const nlohmann::detail::exception& ex) {
    error_offset = pos;
    return fail(ex.what());
  }

  std::string error;
  std::size_t error_offset = 0;
  std::optional<std::string> duplicate_key;

 private:
  bool fail(std::string what) {
    if (error.empty()) error = std::move(what);
    return false;
  }
  bool put(Json&& v) { return place(std::move(v)) != nullptr; }
  Json* place(Json&& v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    Json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    auto& slot = top[pending_key_];
    slot = std::move(v);
    return &slot;
  }

  Json& root_;
  std::vector<Json*> stack_;
  std::vector<std::unordered_set<std::string>> keys_;
  std::string pending_key_;
};

struct strict_json_result {
  bool ok = false;
  std::string error;  ///< nlohmann's message or "duplicate key \"k\""
  std::optional<std::string> duplicate_key;
};

/// Parses `text` into `out` (nlohmann::json or nlohmann::ordered_json), refusing duplicate
/// keys. Never throws for bad input; the result says what was wrong.
template <class Json>
strict_json_result parse_json_strict(std::string_view text, Json& out) {
  strict_json_builder<Json> b(out);
  strict_json_result r;
  try {
    r.ok =
        Json::sax_parse(text.begin(), text.end(), &b, nlohmann::json::input_format_t::json, true);
  } catch (const std::exception& e) {  // defensive: the SAX path reports through parse_error
    r.ok = false;
    if (b.error.empty()) b.error = e.what();
  }
  if (!r.ok) {
    r.error = b.error.empty() ? "invalid JSON" : b.error;
    r.duplicate_key = b.duplicate_key;
  }
  return r;
}

}  // namespace stowage::detail
