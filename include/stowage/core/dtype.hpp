// stowage/core/dtype.hpp: every element type a safetensors or torch checkpoint can hold, with
// its names (torch's and safetensors'), its real width in bits, and the size accelerate assigns
// it when planning (bool counts 1/8 byte there). Planning sizes are kept in eighths of a byte
// so they are exact integers: no floating-point drift on a 405B model.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace stowage {

/// An element type. Enumerators use torch's names; the order of the first 22 is safetensors'
/// declared order (it drives the writer's tensor ordering).
enum class dtype : std::uint8_t {
  bool_,
  float4_e2m1fn_x2,  ///< safetensors F4 (logical shape counts 4-bit elements)
  float6_e2m3fn,     ///< safetensors F6_E2M3
  float6_e3m2fn,     ///< safetensors F6_E3M2
  uint8,
  int8,
  float8_e5m2,
  float8_e4m3fn,
  float8_e8m0fnu,
  float8_e4m3fnuz,
  float8_e5m2fnuz,
  int16,
  uint16,
  float16,
  bfloat16,
  int32,
  uint32,
  float32,
  complex64,
  float64,
  int64,
  uint64,
  // torch-only types (no safetensors code).
  complex128,
  complex32,
  // accelerate's CustomDtype values, used to size quantized tensors when planning.
  custom_int4,
  custom_int2,
  custom_fp8,
};

inline constexpr std::size_t dtype_count = 27;

namespace detail {

enum class dtype_kind : std::uint8_t { boolean, signed_int, unsigned_int, floating, complex };

struct dtype_info {
  dtype value;
  std::string_view torch_name;        // "float32" (torch.float32 without the prefix)
  std::string_view safetensors_name;  // "F32"; empty where safetensors has no code
  std::uint16_t bits;                 // storage width of one logical element
  dtype_kind kind;
  // accelerate's dtype_byte_size in eighths of a byte: bool 1 (=1/8), int4 4, everything
  // else (first digits of the name) / 8 * 8, so float4_e2m1fn_x2 counts 0 as it does there.
  std::uint16_t accelerate_eighths;
};

inline constexpr std::array<dtype_info, dtype_count> dtype_table{{
    {dtype::bool_, "bool", "BOOL", 8, dtype_kind::boolean, 1},
    {dtype::float4_e2m1fn_x2, "float4_e2m1fn_x2", "F4", 4, dtype_kind::floating, 0},
    {dtype::float6_e2m3fn, "float6_e2m3fn", "F6_E2M3", 6, dtype_kind::floating, 0},
    {dtype::float6_e3m2fn, "float6_e3m2fn", "F6_E3M2", 6, dtype_kind::floating, 0},
    {dtype::uint8, "uint8", "U8", 8, dtype_kind::unsigned_int, 8},
    {dtype::int8, "int8", "I8", 8, dtype_kind::signed_int, 8},
    {dtype::float8_e5m2, "float8_e5m2", "F8_E5M2", 8, dtype_kind::floating, 8},
    {dtype::float8_e4m3fn, "float8_e4m3fn", "F8_E4M3", 8, dtype_kind::floating, 8},
    {dtype::float8_e8m0fnu, "float8_e8m0fnu", "F8_E8M0", 8, dtype_kind::floating, 8},
    {dtype::float8_e4m3fnuz, "float8_e4m3fnuz", "F8_E4M3FNUZ", 8, dtype_kind::floating, 8},
    {dtype::float8_e5m2fnuz, "float8_e5m2fnuz", "F8_E5M2FNUZ", 8, dtype_kind::floating, 8},
    {dtype::int16, "int16", "I16", 16, dtype_kind::signed_int, 16},
    {dtype::uint16, "uint16", "U16", 16, dtype_kind::unsigned_int, 16},
    {dtype::float16, "float16", "F16", 16, dtype_kind::floating, 16},
    {dtype::bfloat16, "bfloat16", "BF16", 16, dtype_kind::floating, 16},
    {dtype::int32, "int32", "I32", 32, dtype_kind::signed_int, 32},
    {dtype::uint32, "uint32", "U32", 32, dtype_kind::unsigned_int, 32},
    {dtype::float32, "float32", "F32", 32, dtype_kind::floating, 32},
    {dtype::complex64, "complex64", "C64", 64, dtype_kind::complex, 64},
    {dtype::float64, "float64", "F64", 64, dtype_kind::floating, 64},
    {dtype::int64, "int64", "I64", 64, dtype_kind::signed_int, 64},
    {dtype::uint64, "uint64", "U64", 64, dtype_kind::unsigned_int, 64},
    {dtype::complex128, "complex128", "", 128, dtype_kind::complex, 128},
    {dtype::complex32, "complex32", "", 32, dtype_kind::complex, 32},
    {dtype::custom_int4, "int4", "", 4, dtype_kind::signed_int, 4},
    {dtype::custom_int2, "int2", "", 2, dtype_kind::signed_int, 2},
    {dtype::custom_fp8, "fp8", "", 8, dtype_kind::floating, 8},
}};

constexpr const dtype_info& info(dtype d) noexcept {
  return dtype_table[static_cast<std::size_t>(d)];
}

static_assert(
    [] {
      for (std::size_t i = 0; i < dtype_count; ++i)
        if (static_cast<std::size_t>(dtype_table[i].value) != i) return false;
      return true;
    }(),
    "dtype_table must list the dtypes in enumerator order");

constexpr char ascii_lower(char c) noexcept {
  return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c;
}

}  // namespace detail

/// torch's name without the `torch.` prefix: "float32", "bfloat16", "bool".
constexpr std::string_view name(dtype d) noexcept { return detail::info(d).torch_name; }
/// safetensors' code ("F32", "BF16"), or an empty view where safetensors has none.
constexpr std::string_view safetensors_name(dtype d) noexcept {
  return detail::info(d).safetensors_name;
}
/// Storage width of one element in bits (4 for F4, 6 for F6, 8 for bool).
constexpr std::uint16_t bits(dtype d) noexcept { return detail::info(d).bits; }
/// torch's element_size(): bytes per element, at least 1 (bool is 1 byte in memory).
constexpr std::uint16_t element_size(dtype d) noexcept {
  return d == dtype::float4_e2m1fn_x2 ? std::uint16_t{1}
                                      : static_cast<std::uint16_t>((bits(d) + 7) / 8);
}
constexpr bool is_floating_point(dtype d) noexcept {
  return detail::info(d).kind == detail::dtype_kind::floating;
}
constexpr bool is_complex(dtype d) noexcept {
  return detail::info(d).kind == detail::dtype_kind::complex;
}
/// True for bool and integer types: those accelerate never converts to the target dtype.
constexpr bool is_integral(dtype d) noexcept {
  auto k = detail::info(d).kind;
  return k == detail::dtype_kind::boolean || k == detail::dtype_kind::signed_int ||
         k == detail::dtype_kind::unsigned_int;
}
/// accelerate's `dtype_byte_size`, in eighths of a byte (bool = 1, i.e. 0.125 bytes).
constexpr std::uint16_t accelerate_size_eighths(dtype d) noexcept {
  return detail::info(d).accelerate_eighths;
}

/// Parses a dtype name: torch's ("float16", "torch.float16", also the aliases "half",
/// "float", "double", "long", "int", "short", "bfloat16"), or safetensors' code ("F16", "BF16").
/// Returns nullopt for anything else.
constexpr std::optional<dtype> parse_dtype(std::string_view s) noexcept {
  if (s.starts_with("torch.")) s.remove_prefix(6);
  for (const auto& e : detail::dtype_table) {
    if (e.torch_name == s) return e.value;
    if (!e.safetensors_name.empty() && e.safetensors_name == s) return e.value;
  }
  struct alias {
    std::string_view name;
    dtype value;
  };
  constexpr std::array<alias, 9> aliases{{{"half", dtype::float16},
                                          {"float", dtype::float32},
                                          {"double", dtype::float64},
                                          {"long", dtype::int64},
                                          {"int", dtype::int32},
                                          {"short", dtype::int16},
                                          {"cfloat", dtype::complex64},
                                          {"cdouble", dtype::complex128},
                                          {"chalf", dtype::complex32}}};
  for (const auto& a : aliases)
    if (a.name == s) return a.value;
  return std::nullopt;
}

/// Like parse_dtype, but throws invalid_dtype naming the string.
inline dtype dtype_from_name(std::string_view s) {
  if (auto d = parse_dtype(s)) return *d;
  throw invalid_dtype("`dtype` is not a valid dtype: \"" + std::string(s) +
                      "\" (expected a torch name such as float16 or bfloat16, or a safetensors "
                      "code such as F16)");
}

}  // namespace stowage
