// stowage/exec/cpu/mlp.hpp: the SiLU-gated MLP of Llama/Mistral/Qwen2,
// down_proj(silu(gate_proj(x)) * up_proj(x)), float32 activations.
#pragma once

#include <stowage/exec/cpu/linear.hpp>
#include <stowage/exec/thread_pool.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace stowage::exec::cpu {

/// silu(x) = x / (1 + exp(-x)), torch's formulation.
inline float silu(float x) noexcept { return x / (1.0f + std::exp(-x)); }

struct mlp_weights {
  weight_ref gate, up, down;
  std::vector<float> gate_bias, up_bias, down_bias;  ///< empty when the model has none
};

/// y[m, hidden] = down(silu(gate(x)) * up(x)) for x[m, hidden].
inline void gated_mlp(std::span<const float> x, std::int64_t m, const mlp_weights& w,
                      std::span<float> y, thread_pool& pool) {
  auto g = linear(x, m, w.gate, w.gate_bias, pool);
  const auto u = linear(x, m, w.up, w.up_bias, pool);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = silu(g[i]) * u[i];
  linear(g, m, w.down, w.down_bias, y, pool);
}

}  // namespace stowage::exec::cpu
