// stowage/exec/cpu/weight_ref.hpp: the non-owning view through which the CPU kernels read a
// weight. The forward pass never sees a checkpoint, a storage backend or a module struct; it
// sees these refs, so the same numerics run on mmap'd safetensors, a dispatched model's host
// storage or a freshly fetched offload buffer. fp32/bf16/fp16 are read directly; any other
// layout (int8, nf4, ...) plugs in a row dequantiser (the precision engine's fused kernels),
// and may add a fused product that multiplies straight from the packed bytes (decode: a few
// rows of activations, where widening whole tiles of weights first would double the traffic).
#pragma once

#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/precision/convert.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace stowage::exec::cpu {

/// Dequantises rows [row_begin, row_end) of a weight into `out` (row-major, cols floats a row).
using row_decoder = void (*)(const void* ctx, std::int64_t row_begin, std::int64_t row_end,
                             float* out);

/// y[m, rows] = x[m, cols] * W^T straight from the stored layout (dequantize and multiply in one
/// pass). Called with the ref's decode_ctx; parallelises on its own.
using fused_matmul = void (*)(const void* ctx, const float* x, std::int64_t m, float* y);

/// A 2-D (rows x cols, row-major) or 1-D (rows = 1) weight. `data` must stay valid while used.
struct weight_ref {
  const std::byte* data = nullptr;
  stowage::dtype type = dtype::float32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  row_decoder decode = nullptr;  ///< set for layouts other than fp32/bf16/fp16
  const void* decode_ctx = nullptr;
  std::string name;  ///< for messages
  /// Optional, with `decode`: the fused product linear() uses for small batches (decode).
  fused_matmul matmul = nullptr;

  bool empty() const noexcept { return data == nullptr && decode == nullptr; }
  std::int64_t numel() const noexcept { return rows * cols; }

  static weight_ref from_f32(const float* p, std::int64_t r, std::int64_t c, std::string n = {}) {
    return weight_ref{reinterpret_cast<const std::byte*>(p),
                      dtype::float32,
                      r,
                      c,
                      nullptr,
                      nullptr,
                      std::move(n),
                      nullptr};
  }
  /// A stored tensor as the kernels read it: [rows, cols], the first dimension as rows and
  /// everything after it as columns; a 1-D tensor is one row.
  static weight_ref of_tensor(const std::byte* p, stowage::dtype t, const stowage::shape& s,
                              std::string n) {
    const std::int64_t rows = s.rank() >= 2 ? s[0] : 1;
    const std::int64_t cols =
        s.rank() >= 2 ? s.numel() / std::max<std::int64_t>(s[0], 1) : s.numel();
    return weight_ref{p, t, rows, cols, nullptr, nullptr, std::move(n), nullptr};
  }
  static weight_ref from_bits16(const std::uint16_t* p, stowage::dtype t, std::int64_t r,
                                std::int64_t c, std::string n = {}) {
    return weight_ref{
        reinterpret_cast<const std::byte*>(p), t, r, c, nullptr, nullptr, std::move(n), nullptr};
  }
};

/// Whether the kernels can read `t` without a decoder.
constexpr bool directly_readable(stowage::dtype t) noexcept {
  return t == dtype::float32 || t == dtype::bfloat16 || t == dtype::float16;
}

/// Throws invalid_dtype when the ref can be read neither directly nor through a decoder.
inline void check_readable(const weight_ref& w) {
  if (w.decode == nullptr && !directly_readable(w.type))
    throw invalid_dtype(
        "weight '" + w.name + "': dtype " + std::string(name(w.type)) +
        " needs a row decoder (only float32, bfloat16 and float16 are read directly)");
  if (w.decode == nullptr && w.data == nullptr && w.numel() != 0)
    throw invalid_size("weight '" + w.name + "': no data");
}

/// Rows [r0, r1) as float32 into `out`.
inline void decode_rows(const weight_ref& w, std::int64_t r0, std::int64_t r1, float* out) {
  const auto n = static_cast<std::size_t>((r1 - r0) * w.cols);
  const auto off = static_cast<std::size_t>(r0 * w.cols);
  if (w.decode != nullptr) {
    w.decode(w.decode_ctx, r0, r1, out);
    return;
  }
  switch (w.type) {
    case dtype::float32:
      std::memcpy(out, w.data + off * 4, n * 4);
      return;
    case dtype::bfloat16: {
      // bf16 -> fp32 is a 16-bit shift: this loop vectorises.
      const auto* src = reinterpret_cast<const std::uint16_t*>(w.data) + off;
      for (std::size_t i = 0; i < n; ++i)
        out[i] = std::bit_cast<float>(static_cast<std::uint32_t>(src[i]) << 16);
      return;
    }
    case dtype::float16: {
      const auto* src = reinterpret_cast<const std::uint16_t*>(w.data) + off;
      precision::fp16_to_fp32(std::span<const std::uint16_t>(src, n), std::span<float>(out, n));
      return;
    }
    default:
      check_readable(w);
  }
}

/// A whole (small) weight as float32: norms and biases.
inline std::vector<float> to_f32(const weight_ref& w) {
  check_readable(w);
  std::vector<float> v(static_cast<std::size_t>(w.numel()));
  if (!v.empty()) decode_rows(w, 0, w.rows, v.data());
  return v;
}

}  // namespace stowage::exec::cpu
