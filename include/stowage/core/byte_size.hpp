// stowage/core/byte_size.hpp: exact byte counts for planning. accelerate counts bool tensors as
// 1/8 byte, so its sizes are real numbers; we count eighths of a byte in a 64-bit integer
// (exact up to 10^18 bytes) and remember whether Python would hold the value as a float, so
// sizes print exactly as accelerate prints them ("236" vs "16256.0").
#pragma once

#include <stowage/config.hpp>

#include <charconv>
#include <compare>
#include <cstdint>
#include <string>

namespace stowage {

/// A size in bytes that may be a multiple of 1/8 byte.
class byte_size {
 public:
  constexpr byte_size() noexcept = default;
  /// Whole bytes, held as a Python int.
  constexpr byte_size(std::int64_t bytes) noexcept : eighths_(bytes * 8) {}  // NOLINT implicit

  static constexpr byte_size from_eighths(std::int64_t eighths, bool is_float) noexcept {
    byte_size s;
    s.eighths_ = eighths;
    s.float_ = is_float;
    return s;
  }

  constexpr std::int64_t eighths() const noexcept { return eighths_; }
  /// The value in bytes as a double (exact below 2^50 bytes).
  constexpr double bytes() const noexcept { return static_cast<double>(eighths_) / 8.0; }
  /// Whole bytes, rounded toward negative infinity.
  constexpr std::int64_t floor_bytes() const noexcept {
    return eighths_ >= 0 ? eighths_ / 8 : -((-eighths_ + 7) / 8);
  }
  /// Whole bytes, rounded up (what memory actually needs).
  constexpr std::int64_t ceil_bytes() const noexcept {
    return -byte_size::from_eighths(-eighths_, false).floor_bytes();
  }
  /// Whether Python would hold this value as a float (a fractional size took part in it).
  constexpr bool is_float() const noexcept { return float_; }
  constexpr bool is_whole() const noexcept { return eighths_ % 8 == 0; }

  constexpr byte_size& operator+=(byte_size o) noexcept {
    eighths_ += o.eighths_;
    float_ = float_ || o.float_;
    return *this;
  }
  constexpr byte_size& operator-=(byte_size o) noexcept {
    eighths_ -= o.eighths_;
    float_ = float_ || o.float_;
    return *this;
  }
  friend constexpr byte_size operator+(byte_size a, byte_size b) noexcept { return a += b; }
  friend constexpr byte_size operator-(byte_size a, byte_size b) noexcept { return a -= b; }
  friend constexpr byte_size operator-(byte_size a) noexcept {
    return from_eighths(-a.eighths_, a.float_);
  }
  friend constexpr byte_size operator*(byte_size a, std::int64_t k) noexcept {
    return from_eighths(a.eighths_ * k, a.float_);
  }
  friend constexpr bool operator==(byte_size a, byte_size b) noexcept {
    return a.eighths_ == b.eighths_;
  }
  friend constexpr std::strong_ordering operator<=>(byte_size a, byte_size b) noexcept {
    return a.eighths_ <=> b.eighths_;
  }

  /// The value as Python's repr() prints it: "236", "16256.0", "0.375", "1e+16".
  std::string to_python_string() const {
    if (!float_) return std::to_string(floor_bytes());
    const double v = bytes();
    if (v >= 1e16 || v <= -1e16) {
      char buf[64];
      auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
      std::string s(buf, r.ptr);
      // Python writes e+16, not e+16 padded; to_chars already does; make sure the sign is there.
      return s;
    }
    std::int64_t whole = eighths_ / 8;
    std::int64_t frac = eighths_ % 8;
    std::string s;
    if (eighths_ < 0) {
      s = "-";
      whole = -whole;
      frac = -frac;
    }
    s += std::to_string(whole);
    // frac/8 has at most three decimals: 0.125 steps.
    static constexpr const char* decimals[8] = {".0", ".125", ".25", ".375",
                                                ".5", ".625", ".75", ".875"};
    s += decimals[frac];
    return s;
  }

 private:
  std::int64_t eighths_ = 0;
  bool float_ = false;
};

}  // namespace stowage
