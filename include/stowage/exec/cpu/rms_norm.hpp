// stowage/exec/cpu/rms_norm.hpp: LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm in float32:
// y = w * (x * rsqrt(mean(x^2) + eps)), the operations in Transformers' order (the normalised
// value is formed first, then scaled by the weight).
#pragma once

#include <stowage/core/error.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <string>

namespace stowage::exec::cpu {

/// Normalises each of the `rows` rows of x (length weight.size()) into y (may alias x).
inline void rms_norm(std::span<const float> x, std::span<const float> weight, float eps,
                     std::span<float> y) {
  const std::size_t d = weight.size();
  if (d == 0 || x.size() % d != 0 || y.size() != x.size())
    throw invalid_size("rms_norm: input of " + std::to_string(x.size()) + " values, output " +
                       std::to_string(y.size()) + ", weight " + std::to_string(d));
  const std::size_t rows = x.size() / d;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * d;
    float* yr = y.data() + r * d;
    // Four partial sums: vectorisable and closer to torch's pairwise reduction than one chain.
    float s[4] = {0, 0, 0, 0};
    std::size_t i = 0;
    for (; i + 4 <= d; i += 4)
      for (std::size_t k = 0; k < 4; ++k) s[k] += xr[i + k] * xr[i + k];
    for (; i < d; ++i) s[0] += xr[i] * xr[i];
    const float var = ((s[0] + s[1]) + (s[2] + s[3])) / static_cast<float>(d);
    const float inv = 1.0f / std::sqrt(var + eps);
    for (std::size_t j = 0; j < d; ++j) yr[j] = weight[j] * (xr[j] * inv);
  }
}

}  // namespace stowage::exec::cpu
