// stowage/core/memory_size.hpp: memory-size strings ("20GB", "18GiB", "1.5GB") parsed exactly
// as accelerate's convert_file_size_to_int does, including its rule that a decimal unit whose
// last letter is a lowercase `b` means bits ("1Gb" = 125000000 bytes), plus what users expect
// beyond it (TB/TiB, a plain byte count). And the reverse: sizes for people to read.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>

namespace stowage {

/// Which spellings a size string may use.
enum class size_syntax {
  accelerate,  ///< exactly convert_file_size_to_int: GiB/MiB/KiB/GB/MB/KB only
  extended,    ///< also TiB/TB and a plain integer number of bytes ("1000")
};

namespace detail {

[[noreturn]] inline void bad_size(std::string_view s, std::string_view why = {}) {
  std::string msg = "`size` " + std::string(s) +
                    " is not in a valid format. Use an integer for bytes, or a string with an "
                    "unit (like '5.0GB').";
  if (!why.empty()) msg += std::string(" (") + std::string(why) + ")";
  throw invalid_size(msg);
}

inline bool py_space(char c) noexcept {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/// Python's float(str) for ASCII input: surrounding whitespace, sign, digits with single
/// underscores between digits, optional fraction and exponent, inf/infinity/nan. Returns false
/// when Python would raise ValueError.
inline bool py_float(std::string_view s, double& out) {
  while (!s.empty() && py_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && py_space(s.back())) s.remove_suffix(1);
  if (s.empty()) return false;
  std::string clean;
  std::size_t i = 0;
  if (s[i] == '+' || s[i] == '-') clean += s[i++];
  std::string_view rest = s.substr(i);
  auto lower_eq = [](std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t k = 0; k < a.size(); ++k)
      if ((a[k] >= 'A' && a[k] <= 'Z' ? char(a[k] - 'A' + 'a') : a[k]) != b[k]) return false;
    return true;
  };
  if (lower_eq(rest, "inf") || lower_eq(rest, "infinity")) {
    out = clean == "-" ? -std::numeric_limits<double>::infinity()
                       : std::numeric_limits<double>::infinity();
    return true;
  }
  if (lower_eq(rest, "nan")) {
    out = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  // digitpart: digit (["_"] digit)*
  auto digits = [&](bool required) {
    std::size_t start = i;
    bool prev_digit = false;
    while (i < s.size()) {
      char c = s[i];
      if (c >= '0' && c <= '9') {
        clean += c;
        prev_digit = true;
        ++i;
      } else if (c == '_' && prev_digit && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '9') {
        prev_digit = false;
        ++i;
      } else {
        break;
      }
    }
    return i > start || !required;
  };
  std::size_t before = i;
  digits(false);
  bool int_part = i > before;
  bool frac_part = false;
  if (i < s.size() && s[i] == '.') {
    clean += '.';
    ++i;
    std::size_t f = i;
    digits(false);
    frac_part = i > f;
  }
  if (!int_part && !frac_part) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    clean += 'e';
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
    std::size_t e = i;
    digits(true);
    if (i == e) return false;
  }
  if (i != s.size()) return false;
  errno = 0;
  char* end = nullptr;
  out = std::strtod(clean.c_str(), &end);  // overflow gives inf, as Python's float() does
  return end == clean.c_str() + clean.size();
}

constexpr char ascii_upper(char c) noexcept {
  return c >= 'a' && c <= 'z' ? char(c - 'a' + 'A') : c;
}

inline bool ends_with_ci(std::string_view s, std::string_view upper_suffix) {
  if (s.size() < upper_suffix.size()) return false;
  auto tail = s.substr(s.size() - upper_suffix.size());
  for (std::size_t k = 0; k < tail.size(); ++k)
    if (ascii_upper(tail[k]) != upper_suffix[k]) return false;
  return true;
}

}  // namespace detail

/// Parses a memory size into bytes. Throws invalid_size naming the string when it is not one.
/// With size_syntax::accelerate the result equals convert_file_size_to_int's on every input
/// it accepts, and every input it rejects is rejected (its OverflowError for "inf GB" is an
/// invalid_size here).
inline std::uint64_t parse_memory_size(std::string_view s,
                                       size_syntax syntax = size_syntax::extended) {
  struct unit {
    std::string_view suffix;
    double multiplier;
    bool decimal;  // the lowercase-b-means-bits rule applies to decimal units only
    bool extended;
  };
  // Checked in this order, as accelerate does (GIB before GB, ...).
  static constexpr unit units[] = {
      {"TIB", 1099511627776.0, false, true},
      {"GIB", 1073741824.0, false, false},
      {"MIB", 1048576.0, false, false},
      {"KIB", 1024.0, false, false},
      {"TB", 1e12, true, true},
      {"GB", 1e9, true, false},
      {"MB", 1e6, true, false},
      {"KB", 1e3, true, false},
  };
  for (const auto& u : units) {
    if (u.extended && syntax != size_syntax::extended) continue;
    if (!detail::ends_with_ci(s, u.suffix)) continue;
    double v = 0;
    if (!detail::py_float(s.substr(0, s.size() - u.suffix.size()), v)) detail::bad_size(s);
    const double scaled = v * u.multiplier;
    if (std::isnan(scaled)) detail::bad_size(s, "not a number");
    if (std::isinf(scaled) || scaled >= 18446744073709551616.0) detail::bad_size(s, "too large");
    if (scaled <= -1.0) detail::bad_size(s, "negative");
    // int(): truncation toward zero; (-1, 0) truncates to 0 as in Python.
    std::uint64_t bytes = scaled < 0 ? 0 : static_cast<std::uint64_t>(scaled);
    if (u.decimal && s.back() == 'b') bytes /= 8;  // "1Gb", "1gb": bits
    return bytes;
  }
  if (syntax == size_syntax::extended) {
    // A plain integer: a number of bytes ("1000", " 42 ").
    std::string_view t = s;
    while (!t.empty() && detail::py_space(t.front())) t.remove_prefix(1);
    while (!t.empty() && detail::py_space(t.back())) t.remove_suffix(1);
    if (!t.empty() && t.front() == '+') t.remove_prefix(1);
    bool all_digits = !t.empty();
    for (char c : t) all_digits = all_digits && c >= '0' && c <= '9';
    if (all_digits) {
      if (t.size() > 19) detail::bad_size(s, "too large");
      return std::stoull(std::string(t));
    }
  }
  detail::bad_size(s);
}

/// Integer budgets pass through; negative ones are refused as accelerate refuses them.
inline std::uint64_t parse_memory_size(std::int64_t bytes) {
  if (bytes < 0) detail::bad_size(std::to_string(bytes), "negative");
  return static_cast<std::uint64_t>(bytes);
}

/// A size for people: "20.00 GB (18.63 GiB)"-style pieces. `binary` picks GiB/MiB/KiB.
inline std::string format_memory_size(double bytes, bool binary = false) {
  const char* dec[] = {"B", "KB", "MB", "GB", "TB", "PB"};
  const char* bin[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  const double step = binary ? 1024.0 : 1000.0;
  int k = 0;
  double v = bytes;
  while ((v >= step || v <= -step) && k < 5) {
    v /= step;
    ++k;
  }
  char buf[64];
  if (k == 0)
    std::snprintf(buf, sizeof buf, "%.0f %s", v, "B");
  else
    std::snprintf(buf, sizeof buf, "%.2f %s", v, binary ? bin[k] : dec[k]);
  return buf;
}

}  // namespace stowage
