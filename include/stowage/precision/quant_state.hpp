// stowage/precision/quant_state.hpp: what a bitsandbytes-quantized parameter consists of. The
// NF4/FP4 code tables, bitsandbytes' QuantState (absmax, quant_map, nested statistics) and the
// exact tensors/bytes it serialises to (formats-spec §1.8, §2.3), and the exact byte counts
// the planner needs before any weight is read.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/precision/dynamic_map.hpp>

#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace stowage::precision {

/// bitsandbytes' two 4-bit data types.
enum class quant_type : std::uint8_t { nf4, fp4 };

constexpr std::string_view name(quant_type t) noexcept {
  return t == quant_type::nf4 ? "nf4" : "fp4";
}

/// NF4 code table, index = 4-bit code (formats-spec §1.1), ascending.
inline constexpr std::array<float, 16> nf4_code{-1.0f,
                                                -0.6961928009986877f,
                                                -0.5250730514526367f,
                                                -0.39491748809814453f,
                                                -0.28444138169288635f,
                                                -0.18477343022823334f,
                                                -0.09105003625154495f,
                                                0.0f,
                                                0.07958029955625534f,
                                                0.16093020141124725f,
                                                0.24611230194568634f,
                                                0.33791524171829224f,
                                                0.44070982933044434f,
                                                0.5626170039176941f,
                                                0.7229568362236023f,
                                                1.0f};

/// NF4 decision thresholds: the binary32 midpoints of neighbouring codes. The CUDA decision tree
/// uses bit-identical literals; s equal to a threshold takes the lower code.
inline constexpr std::array<float, 15> nf4_thresholds{
    -0.8480963706970215f,  -0.6106328964233398f,  -0.4599952697753906f,   -0.33967941999435425f,
    -0.23460739850997925f, -0.13791173696517944f, -0.045525018125772476f, 0.03979014977812767f,
    0.120255246758461f,    0.2035212516784668f,   0.2920137643814087f,    0.3893125355243683f,
    0.5016634464263916f,   0.6427869200706482f,   0.8614784479141235f};

/// bitsandbytes' FP4 (E2M1 with bias 2, divided by 12): bit 3 is the sign, nibble 8 is -0.0.
/// Values are float32(raw / 12), as Python computes them.
inline constexpr std::array<float, 16> fp4_code{
    0.0f,          0.0625f / 12.0f, 8.0f / 12.0f,  12.0f / 12.0f,    4.0f / 12.0f,  6.0f / 12.0f,
    2.0f / 12.0f,  3.0f / 12.0f,    -0.0f,         -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,   -2.0f / 12.0f, -3.0f / 12.0f};

/// The magnitude boundaries of bitsandbytes' CUDA FP4 quantizer (dQuantizeFP4), ascending. They
/// are the kernel's float literals, which are NOT all binary32 midpoints (formats-spec §1.3): we
/// follow the CUDA kernel, which produced almost every published FP4 checkpoint.
inline constexpr std::array<float, 7> fp4_cuda_boundaries{
    0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
/// Magnitude nibble for each interval between fp4_cuda_boundaries (interval r = number of
/// boundaries strictly below |s|).
inline constexpr std::array<std::uint8_t, 8> fp4_rank_to_bits{0b000, 0b001, 0b110, 0b111,
                                                              0b100, 0b101, 0b010, 0b011};

/// The FP4 `quant_map` bitsandbytes stores in a QuantState (get_4bit_type("fp4")): Python builds
/// it from the integer literal -0, so entry 8 is +0.0 there, while the dequantization LUTs of the
/// CUDA and native CPU kernels (fp4_code) hold -0.0. Values are otherwise identical.
inline constexpr std::array<float, 16> fp4_quant_map = [] {
  auto m = fp4_code;
  m[8] = 0.0f;
  return m;
}();

/// The 16-entry table written as `quant_map` for a 4-bit state.
constexpr const std::array<float, 16>& serialized_quant_map(quant_type t) noexcept {
  return t == quant_type::nf4 ? nf4_code : fp4_quant_map;
}

/// The dequantization table (CUDA LUT values; FP4 nibble 8 is -0.0).
constexpr const std::array<float, 16>& code_table(quant_type t) noexcept {
  return t == quant_type::nf4 ? nf4_code : fp4_code;
}

/// The nibble a zero quantizes to: fills the low nibble of the last byte for odd lengths.
constexpr std::uint8_t zero_code(quant_type t) noexcept { return t == quant_type::nf4 ? 7 : 0; }

/// Block sizes bitsandbytes accepts for 4-bit quantization on every backend.
constexpr bool is_valid_4bit_blocksize(std::size_t bs) noexcept {
  return bs == 64 || bs == 128 || bs == 256 || bs == 512 || bs == 1024 || bs == 2048 || bs == 4096;
}

/// Block size of the nested (double) quantization of the absmax.
inline constexpr std::size_t nested_blocksize = 256;

// ---------------------------------------------------------------------------------------------
// Exact sizes (for the planner). All byte counts are exact integers.

/// The pieces of a 4-bit quantized parameter of `numel` elements, as bitsandbytes keeps them in
/// memory and writes them to a checkpoint (formats-spec §1.8):
///   packed        ceil(numel / 2) bytes (two codes a byte)
///   absmax        n_blocks float32 (plain) or n_blocks uint8 codes (double quant)
///   quant_map     16 float32 (the code table; bnb keeps it per parameter)
///   nested_absmax ceil(n_blocks / 256) float32 (double quant only)
///   nested_quant_map 256 float32 (double quant only)
///   offset        one float32 (double quant only; in a checkpoint it lives in the JSON)
/// The QuantState JSON blob is not counted (its length depends on the shape's digits and the
/// offset's decimal form): use quant_state_json(state).size() for it.
struct quantized_4bit_size {
  std::uint64_t packed = 0;
  std::uint64_t absmax = 0;
  std::uint64_t quant_map = 0;
  std::uint64_t nested_absmax = 0;
  std::uint64_t nested_quant_map = 0;
  std::uint64_t offset = 0;
  /// Everything but the quant maps: what grows with the parameter.
  constexpr std::uint64_t data() const noexcept { return packed + absmax + nested_absmax + offset; }
  /// All bytes resident for the parameter, maps included.
  constexpr std::uint64_t total() const noexcept { return data() + quant_map + nested_quant_map; }
  constexpr bool operator==(const quantized_4bit_size&) const = default;
};

constexpr std::uint64_t blocks_4bit(std::uint64_t numel, std::uint64_t blocksize) noexcept {
  return blocksize == 0 ? 0 : (numel + blocksize - 1) / blocksize;
}

/// Exact sizes of a 4-bit (nf4 or fp4: same layout) parameter of `numel` elements.
constexpr quantized_4bit_size quantized_size_4bit(std::uint64_t numel, std::uint64_t blocksize,
                                                  bool double_quant) noexcept {
  const std::uint64_t nb = blocks_4bit(numel, blocksize);
  quantized_4bit_size s;
  s.packed = (numel + 1) / 2;
  s.quant_map = 16 * 4;
  if (double_quant) {
    s.absmax = nb;
    s.nested_absmax = (nb + nested_blocksize - 1) / nested_blocksize * 4;
    s.nested_quant_map = 256 * 4;
    s.offset = 4;
  } else {
    s.absmax = nb * 4;
  }
  return s;
}

/// The pieces of an LLM.int8 Linear weight [rows, cols] (formats-spec §2.3): int8 weights,
/// float32 SCB per row, and the one-byte `weight_format` tensor of a checkpoint.
struct quantized_int8_size {
  std::uint64_t weight = 0;
  std::uint64_t scb = 0;
  std::uint64_t weight_format = 0;
  constexpr std::uint64_t total() const noexcept { return weight + scb + weight_format; }
  constexpr bool operator==(const quantized_int8_size&) const = default;
};

/// Exact sizes of an int8 weight; `with_format_byte` counts the checkpoint's weight_format.
constexpr quantized_int8_size quantized_size_int8(std::uint64_t rows, std::uint64_t cols,
                                                  bool with_format_byte = false) noexcept {
  return {rows * cols, rows * 4, with_format_byte ? 1u : 0u};
}

static_assert(quantized_size_4bit(4096ull * 4096, 64, false).total() == 8388608 + 1048576 + 64,
              "quantized_size_4bit: 4096x4096 nf4, blocksize 64, no double quant");
static_assert(quantized_size_4bit(4096ull * 4096, 64, true).total() ==
                  8388608 + 262144 + 64 + 1024 * 4 + 1024 + 4,
              "quantized_size_4bit: 4096x4096 nf4, blocksize 64, double quant");

// ---------------------------------------------------------------------------------------------
// QuantState

/// bitsandbytes' QuantState for a 4-bit parameter. `absmax` is always the float32 scale per
/// block as used by dequantization; with double quantization the stored form is `qabsmax`
/// (uint8 codes of absmax - offset), `nested_absmax` and `nested_quant_map`, and `absmax` is
/// what dequantizing those gives (two roundings, formats-spec §1.6).
struct quant_state_4bit {
  quant_type type = quant_type::nf4;
  std::size_t blocksize = 64;
  dtype original_dtype = dtype::float32;  ///< `dtype` in the JSON: the weight's own dtype
  std::vector<std::int64_t> shape;        ///< original shape, e.g. {out_features, in_features}
  std::vector<float> absmax;              ///< float32 per block (dequantized when nested)
  bool nested = false;
  std::vector<std::uint8_t> qabsmax;          ///< nested only: codes of absmax - offset
  std::vector<float> nested_absmax;           ///< nested only: one float32 per 256 blocks
  std::array<float, 256> nested_quant_map{};  ///< nested only: the dynamic map
  float offset = 0.0f;                        ///< nested only: mean of the plain absmax

  std::uint64_t numel() const noexcept {
    std::uint64_t n = 1;
    for (auto d : shape) n *= static_cast<std::uint64_t>(d);
    return n;
  }
  std::size_t blocks() const noexcept {
    return static_cast<std::size_t>(blocks_4bit(numel(), blocksize));
  }
};

namespace detail {

// Python's repr() of a double: shortest round-trip digits, fixed notation when the decimal
// exponent is in [-4, 16), otherwise d.ddde±XX; integral values keep a ".0".
inline std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";  // json.dumps spelling
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  const auto epos = sci.find('e');
  std::string mant = sci.substr(0, epos);
  const int exp = std::stoi(sci.substr(epos + 1));
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(static_cast<std::size_t>(-exp - 1), '0') + digits;
    } else {
      const auto ip = static_cast<std::size_t>(exp) + 1;
      if (digits.size() <= ip)
        out = digits + std::string(ip - digits.size(), '0') + ".0";
      else
        out = digits.substr(0, ip) + "." + digits.substr(ip);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += e;
  }
  return neg ? "-" + out : out;
}

template <class T>
std::vector<std::uint8_t> raw_bytes(const T* p, std::size_t n) {
  std::vector<std::uint8_t> v(n * sizeof(T));
  if (n) std::memcpy(v.data(), p, v.size());
  return v;
}

}  // namespace detail

/// The UTF-8 JSON bitsandbytes stores under `<prefix>weight.quant_state.bitsandbytes__nf4`
/// (or `__fp4`), byte for byte as Python's json.dumps writes it (formats-spec §1.8).
inline std::string quant_state_json(const quant_state_4bit& s) {
  std::string j = "{\"quant_type\": \"";
  j += name(s.type);
  j += "\", \"blocksize\": " + std::to_string(s.blocksize) + ", \"dtype\": \"";
  j += stowage::name(s.original_dtype);
  j += "\", \"shape\": [";
  for (std::size_t i = 0; i < s.shape.size(); ++i) {
    if (i) j += ", ";
    j += std::to_string(s.shape[i]);
  }
  j += "]";
  if (s.nested) {
    j += ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ";
    j += detail::python_float_repr(static_cast<double>(s.offset));
  }
  j += "}";
  return j;
}

/// One tensor of a serialised QuantState: key suffix (appended to `<prefix>weight.`), dtype,
/// shape and little-endian bytes, ready for a safetensors writer.
struct state_tensor {
  std::string suffix;
  dtype type;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};

/// QuantState.as_dict(packed=True): the tensors `absmax`, `quant_map`, and (nested)
/// `nested_absmax`, `nested_quant_map`, then `quant_state.bitsandbytes__<type>` (the JSON as
/// uint8). Same order as bitsandbytes builds the dict.
inline std::vector<state_tensor> quant_state_tensors(const quant_state_4bit& s) {
  std::vector<state_tensor> out;
  const auto nb = static_cast<std::int64_t>(s.blocks());
  if (s.nested) {
    if (s.qabsmax.size() != s.blocks())
      throw invalid_config("quant_state_tensors: nested state needs one qabsmax code per block");
    out.push_back({"absmax", dtype::uint8, {nb}, s.qabsmax});
  } else {
    if (s.absmax.size() != s.blocks())
      throw invalid_config("quant_state_tensors: state needs one absmax per block");
    out.push_back(
        {"absmax", dtype::float32, {nb}, detail::raw_bytes(s.absmax.data(), s.absmax.size())});
  }
  const auto& code = serialized_quant_map(s.type);
  out.push_back({"quant_map", dtype::float32, {16}, detail::raw_bytes(code.data(), code.size())});
  if (s.nested) {
    out.push_back({"nested_absmax",
                   dtype::float32,
                   {static_cast<std::int64_t>(s.nested_absmax.size())},
                   detail::raw_bytes(s.nested_absmax.data(), s.nested_absmax.size())});
    out.push_back({"nested_quant_map",
                   dtype::float32,
                   {256},
                   detail::raw_bytes(s.nested_quant_map.data(), s.nested_quant_map.size())});
  }
  const std::string j = quant_state_json(s);
  out.push_back({"quant_state.bitsandbytes__" + std::string(name(s.type)),
                 dtype::uint8,
                 {static_cast<std::int64_t>(j.size())},
                 std::vector<std::uint8_t>(j.begin(), j.end())});
  return out;
}

/// Shape bitsandbytes gives the packed weight tensor: [ceil(numel / 2), 1] uint8.
inline std::vector<std::int64_t> packed_shape(std::uint64_t numel) {
  return {static_cast<std::int64_t>((numel + 1) / 2), 1};
}

}  // namespace stowage::precision
