// stowage/precision/int8.hpp: precision::int8, bitsandbytes' LLM.int8(): row-wise absmax (SCB)
// int8 weights as Linear8bitLt stores them, and the mixed-precision matmul that keeps outlier
// activation columns in floating point (formats-spec §2).
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/floating.hpp>
#include <stowage/precision/kernels_cpu.hpp>
#include <stowage/precision/quant_state.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace stowage::precision {

/// LLM.int8 weights (int8 + float32 SCB per output row), computed in Compute's dtype.
template <precision_policy Compute = fp16>
struct int8 {
  static_assert(!is_quantized_v<Compute>,
                "precision::int8<Compute>: Compute must be fp32, fp16 or bf16");
  static constexpr dtype storage_dtype = dtype::int8;
  static constexpr dtype compute_dtype = Compute::compute_dtype;
  static constexpr std::string_view name = "int8";
  static constexpr bool quantized = true;
  /// transformers' llm_int8_threshold default.
  static constexpr float default_threshold = 6.0f;
  static constexpr quantized_int8_size size(std::uint64_t rows, std::uint64_t cols) noexcept {
    return quantized_size_int8(rows, cols);
  }
};

/// bitsandbytes' `weight_format` values (only "row" is current).
enum class int8_weight_format : std::uint8_t { row = 0, col32 = 1, col_turing = 2, col_ampere = 3 };

/// An int8 weight [rows, cols] as Linear8bitLt's state dict holds it: `weight` (CB, int8,
/// row-major), `SCB` (float32 [rows]) and `weight_format` (uint8 scalar, 0 = row).
struct quantized_int8 {
  std::size_t rows = 0, cols = 0;
  std::vector<std::int8_t> cb;
  std::vector<float> scb;
  int8_weight_format format = int8_weight_format::row;
};

/// Quantizes a weight [rows, cols] of dtype in_type (fp32/fp16/bf16) as Int8Params does.
inline quantized_int8 quantize_int8(const void* data, dtype in_type, std::size_t rows,
                                    std::size_t cols) {
  quantized_int8 q{rows, cols, std::vector<std::int8_t>(rows * cols), std::vector<float>(rows)};
  quantize_int8_rowwise_raw(data, in_type, rows, cols, q.cb.data(), q.scb.data());
  return q;
}

/// bitsandbytes int8_vectorwise_dequant: w = f32(f32(CB * SCB) * f32(1/127)), float32 out.
inline std::vector<float> dequantize_int8(const quantized_int8& q) {
  if (q.cb.size() != q.rows * q.cols || q.scb.size() != q.rows)
    throw invalid_config("dequantize_int8: CB must be [" + std::to_string(q.rows) + ", " +
                         std::to_string(q.cols) + "] and SCB [" + std::to_string(q.rows) + "]");
  std::vector<float> out(q.cb.size());
  dequantize_int8_raw(q.cb.data(), q.scb.data(), q.rows, q.cols, out.data());
  return out;
}

/// Options of the LLM.int8 matmul.
struct int8_matmul_options {
  /// Activation columns holding any |a| >= threshold stay in floating point; 0 disables.
  float threshold = 6.0f;
};

/// What int8_matmul computed, for inspection and tests.
struct int8_matmul_result {
  std::vector<float> out;                 ///< [M, N], values representable in the activation dtype
  std::vector<std::int8_t> ca;            ///< [M, K] quantized activations (outliers zeroed)
  std::vector<float> sca;                 ///< [M] activation row absmax (outliers excluded)
  std::vector<std::size_t> outlier_cols;  ///< ascending
};

/// LLM.int8 mixed-precision product out = A [M, K] * W^T + bias for a weight W [N, K]:
/// A (float32 values of dtype a_type) is rounded to fp16 and row-quantized with outlier columns
/// (any |a| >= threshold) excluded; int32 products are scaled by SCA * SCB / 127^2 and bias is
/// added in float32, rounded to a_type; the outlier columns are multiplied in floating point
/// against dequantized weight columns (rounded to a_type) and added. Same steps as
/// bitsandbytes' int8_vectorwise_quant + int8_mixed_scaled_mm, except the scale constant:
/// bnb's CPU code uses 6.200124e-05 (a typo), CUDA and stowage use 1/16129 = 6.2000124e-05.
inline int8_matmul_result int8_matmul(std::span<const float> a, dtype a_type, std::size_t M,
                                      const quantized_int8& w, std::span<const float> bias = {},
                                      const int8_matmul_options& opt = {}) {
  detail::check_float_dtype(a_type, "int8_matmul");
  const std::size_t K = w.cols, N = w.rows;
  if (a.size() != M * K)
    throw invalid_config("int8_matmul: A must be [M, " + std::to_string(K) + "]");
  if (!bias.empty() && bias.size() != N)
    throw invalid_config("int8_matmul: bias must have " + std::to_string(N) + " elements");
  int8_matmul_result r;
  // Outlier columns, judged on the fp16-rounded activations as bitsandbytes does.
  std::vector<char> is_outlier(K, 0);
  if (opt.threshold > 0.0f)
    for (std::size_t m = 0; m < M; ++m)
      for (std::size_t k = 0; k < K; ++k)
        if (std::fabs(detail::round_to(a[m * K + k], dtype::float16)) >= opt.threshold)
          is_outlier[k] = 1;
  for (std::size_t k = 0; k < K; ++k)
    if (is_outlier[k]) r.outlier_cols.push_back(k);
  r.ca.assign(M * K, 0);
  r.sca.assign(M, 0.0f);
  quantize_int8_rowwise_raw(a.data(), dtype::float32, M, K, r.ca.data(), r.sca.data(),
                            opt.threshold);
  if (M > 1)
    for (std::size_t m = 0; m < M; ++m)
      for (auto k : r.outlier_cols) r.ca[m * K + k] = 0;
  std::vector<std::int32_t> acc(M * N);
  int8_linear_matmul_raw(r.ca.data(), M, w.cb.data(), N, K, acc.data());
  constexpr float inv_127_sq = 6.2000124e-05f;  // float32(1 / 16129)
  r.out.assign(M * N, 0.0f);
  for (std::size_t m = 0; m < M; ++m)
    for (std::size_t n = 0; n < N; ++n) {
      float v = static_cast<float>(acc[m * N + n]) * (r.sca[m] * w.scb[n]) * inv_127_sq;
      if (!bias.empty()) v += bias[n];
      r.out[m * N + n] = detail::round_to(v, a_type);
    }
  if (!r.outlier_cols.empty())
    for (std::size_t m = 0; m < M; ++m)
      for (std::size_t n = 0; n < N; ++n) {
        float s = 0.0f;
        for (auto k : r.outlier_cols)
          s += a[m * K + k] *
               detail::round_to(int8_dequant_value(w.cb[n * K + k], w.scb[n]), a_type);
        r.out[m * N + n] = detail::round_to(r.out[m * N + n] + s, a_type);
      }
  return r;
}

/// Weight-only fused product Y [M, N] = X [M, K] * dequant(W)^T in float32 (no activation
/// quantization): the fast path for matrix-vector and small batches.
inline void gemm_int8(std::span<const float> x, std::size_t M, const quantized_int8& w,
                      std::span<float> y) {
  if (x.size() != M * w.cols || y.size() != M * w.rows)
    throw invalid_config("gemm_int8: x must be [M, " + std::to_string(w.cols) + "] and y [M, " +
                         std::to_string(w.rows) + "]");
  gemm_int8_weight_only_raw(x.data(), M, w.cb.data(), w.scb.data(), w.rows, w.cols, y.data());
}

}  // namespace stowage::precision

static_assert(stowage::precision_policy<stowage::precision::int8<>>);
