// stowage/exec/cpu/linear.hpp: y = x W^T (+ b) for a weight stored row-major [out, in] as
// torch's nn.Linear keeps it, in float32 arithmetic whatever the weight's storage type.
// Decode (few rows of x) is a matrix-vector product and memory-bandwidth bound: the work is
// split into contiguous blocks of output rows, one per thread, so each thread streams its
// own slice of the weight exactly once. Non-fp32 weights are widened a small tile of rows at
// a time into a thread-local buffer that stays in cache, then multiplied with Eigen; that is
// for prefill, where each widened tile serves many rows. Decode batches (at most
// matvec_max_rows rows) of a float32/bfloat16/float16 weight take the matrix-vector kernels of
// matvec.hpp instead: one pass over the weight, 16-bit values widened in registers. A weight
// that brings a fused product (quantized layouts: nf4/fp4/int8 through the precision engine's
// gemm kernels) uses it for up to fused_matmul_max_rows rows of x: decode reads the packed bytes
// once instead of widening them to float32 first.
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/exec/cpu/matvec.hpp>
#include <stowage/exec/cpu/weight_ref.hpp>
#include <stowage/exec/thread_pool.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace stowage::exec::cpu {

namespace detail {
using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_map = Eigen::Map<const row_major>;
using map = Eigen::Map<row_major>;

/// Rows per widened tile: about 32 KiB of float32, at least 4 rows.
inline std::int64_t tile_rows(std::int64_t cols) noexcept {
  return std::max<std::int64_t>(4, 8192 / std::max<std::int64_t>(cols, 1));
}

/// Batches up to this many rows take a weight's fused product when it has one; longer ones
/// (prefill) widen tiles once and run Eigen's GEMM, which reuses each widened tile m times.
inline constexpr std::int64_t fused_matmul_max_rows = 8;

/// Rows per thread chunk: at least 64 KiB of weight so a chunk amortises its scheduling.
inline std::size_t chunk_rows(std::int64_t cols) noexcept {
  return static_cast<std::size_t>(
      std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(cols, 1)));
}
}  // namespace detail

/// y[m, out] = x[m, in] * W[out, in]^T + bias[out]. `bias` may be empty.
/// Throws invalid_size on mismatched sizes, invalid_dtype for an unreadable weight.
inline void linear(std::span<const float> x, std::int64_t m, const weight_ref& w,
                   std::span<const float> bias, std::span<float> y, thread_pool& pool) {
  check_readable(w);
  const std::int64_t in = w.cols, out = w.rows;
  if (m < 0 || static_cast<std::int64_t>(x.size()) != m * in ||
      static_cast<std::int64_t>(y.size()) != m * out ||
      (!bias.empty() && static_cast<std::int64_t>(bias.size()) != out))
    throw invalid_size("linear '" + w.name + "': x has " + std::to_string(x.size()) +
                       " values, y " + std::to_string(y.size()) + ", bias " +
                       std::to_string(bias.size()) + " for " + std::to_string(m) + " rows and a [" +
                       std::to_string(out) + ", " + std::to_string(in) + "] weight");
  if (m == 0 || out == 0) return;
  if (w.matmul != nullptr && w.decode != nullptr && m <= detail::fused_matmul_max_rows) {
    w.matmul(w.decode_ctx, x.data(), m, y.data());
    if (!bias.empty())
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t r = 0; r < out; ++r)
          y[static_cast<std::size_t>(i * out + r)] += bias[static_cast<std::size_t>(r)];
    return;
  }
  if (w.decode == nullptr && m <= detail::matvec_max_rows) {
    // Batch rows a multiple of 4 KiB apart share L1 sets: copy them to a padded stride.
    const float* xs = x.data();
    std::int64_t ld_x = in;
    thread_local std::vector<float> padded;
    if (m > 1 && detail::padded_ld(in) != in) {
      ld_x = detail::padded_ld(in);
      padded.resize(static_cast<std::size_t>(m * ld_x));
      for (std::int64_t i = 0; i < m; ++i)
        std::copy_n(x.data() + i * in, in, padded.data() + i * ld_x);
      xs = padded.data();
    }
    pool.parallel_for(
        static_cast<std::size_t>(out), detail::chunk_rows(in), [&](std::size_t b, std::size_t e) {
          const auto r0 = static_cast<std::int64_t>(b);
          const auto r1 = static_cast<std::int64_t>(e);
          detail::matvec_rows(w, xs, ld_x, m, y.data(), r0, r1);
          if (!bias.empty())
            for (std::int64_t i = 0; i < m; ++i)
              for (std::int64_t r = r0; r < r1; ++r)
                y[static_cast<std::size_t>(i * out + r)] += bias[static_cast<std::size_t>(r)];
        });
    return;
  }
  const detail::const_map X(x.data(), m, in);
  detail::map Y(y.data(), m, out);
  const bool direct_f32 = w.decode == nullptr && w.type == dtype::float32;
  pool.parallel_for(
      static_cast<std::size_t>(out), detail::chunk_rows(in), [&](std::size_t b, std::size_t e) {
        const auto r0 = static_cast<std::int64_t>(b), r1 = static_cast<std::int64_t>(e);
        if (direct_f32) {
          const detail::const_map W(reinterpret_cast<const float*>(w.data) + r0 * in, r1 - r0, in);
          Y.middleCols(r0, r1 - r0).noalias() = X * W.transpose();
        } else {
          thread_local std::vector<float> tile;
          const std::int64_t t = detail::tile_rows(in);
          tile.resize(static_cast<std::size_t>(t * in));
          for (std::int64_t r = r0; r < r1; r += t) {
            const std::int64_t n = std::min(t, r1 - r);
            decode_rows(w, r, r + n, tile.data());
            const detail::const_map W(tile.data(), n, in);
            Y.middleCols(r, n).noalias() = X * W.transpose();
          }
        }
        if (!bias.empty())
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t r = r0; r < r1; ++r) Y(i, r) += bias[static_cast<std::size_t>(r)];
      });
}

/// Convenience overload returning a new vector.
inline std::vector<float> linear(std::span<const float> x, std::int64_t m, const weight_ref& w,
                                 std::span<const float> bias, thread_pool& pool) {
  std::vector<float> y(static_cast<std::size_t>(m * w.rows));
  linear(x, m, w, bias, y, pool);
  return y;
}

}  // namespace stowage::exec::cpu
