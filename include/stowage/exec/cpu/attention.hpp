// stowage/exec/cpu/attention.hpp: causal grouped-query attention over a KV cache, float32,
// as Transformers' eager attention computes it: softmax(q k^T * head_dim^-0.5 + causal mask) v,
// query head h reading kv head h / (heads / kv_heads). A batch holds equal-length sequences
// (no padding), so every row shares the same positions. An optional sliding window (Mistral)
// hides keys at distance >= window.
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/exec/thread_pool.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace stowage::exec::cpu {

/// Keys and values of every layer: [layer][batch][kv_head][capacity][head_dim], float32.
class kv_cache {
 public:
  kv_cache() = default;
  kv_cache(std::int64_t layers, std::int64_t batch, std::int64_t kv_heads, std::int64_t head_dim,
           std::int64_t capacity)
      : layers_(layers),
        batch_(batch),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        capacity_(capacity) {
    if (layers <= 0 || batch <= 0 || kv_heads <= 0 || head_dim <= 0 || capacity <= 0)
      throw invalid_size("kv_cache: every dimension must be positive (layers " +
                         std::to_string(layers) + ", batch " + std::to_string(batch) +
                         ", kv heads " + std::to_string(kv_heads) + ", head_dim " +
                         std::to_string(head_dim) + ", capacity " + std::to_string(capacity) + ")");
    const auto n = static_cast<std::size_t>(layers * batch * kv_heads * capacity * head_dim);
    k_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
  }

  std::int64_t layers() const noexcept { return layers_; }
  std::int64_t batch() const noexcept { return batch_; }
  std::int64_t kv_heads() const noexcept { return kv_heads_; }
  std::int64_t head_dim() const noexcept { return head_dim_; }
  std::int64_t capacity() const noexcept { return capacity_; }
  /// Positions already stored (the next token's position).
  std::int64_t length() const noexcept { return length_; }
  /// Commits `n` new positions after every layer has written them.
  void advance(std::int64_t n) {
    if (n < 0 || length_ + n > capacity_)
      throw invalid_size("kv_cache: " + std::to_string(length_) + " + " + std::to_string(n) +
                         " positions exceed the capacity " + std::to_string(capacity_));
    length_ += n;
  }
  void clear() noexcept { length_ = 0; }
  std::size_t bytes() const noexcept { return (k_.size() + v_.size()) * sizeof(float); }

  float* k(std::int64_t layer, std::int64_t b, std::int64_t h) noexcept {
    return k_.data() + offset(layer, b, h);
  }
  float* v(std::int64_t layer, std::int64_t b, std::int64_t h) noexcept {
    return v_.data() + offset(layer, b, h);
  }

 private:
  std::size_t offset(std::int64_t layer, std::int64_t b, std::int64_t h) const noexcept {
    return static_cast<std::size_t>(((layer * batch_ + b) * kv_heads_ + h) * capacity_ * head_dim_);
  }
  std::int64_t layers_ = 0, batch_ = 0, kv_heads_ = 0, head_dim_ = 0, capacity_ = 0, length_ = 0;
  std::vector<float> k_, v_;
};

struct attention_shape {
  std::int64_t batch = 1;
  std::int64_t seq = 1;  ///< new positions in this call
  std::int64_t heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 1;
  std::optional<std::int64_t> sliding_window;  ///< Mistral's window, if any
};

/// Stores k_new/v_new ([batch, seq, kv_heads, head_dim], already rotated) at positions
/// cache.length() .. + seq of `layer`, then writes out[batch, seq, heads * head_dim].
/// q is [batch, seq, heads, head_dim] (rotated). The caller advances the cache afterwards.
inline void attention(std::span<const float> q, std::span<const float> k_new,
                      std::span<const float> v_new, kv_cache& cache, std::int64_t layer,
                      const attention_shape& s, std::span<float> out, thread_pool& pool) {
  const std::int64_t past = cache.length();
  if (s.heads % s.kv_heads != 0 || s.batch != cache.batch() || s.kv_heads != cache.kv_heads() ||
      s.head_dim != cache.head_dim() || layer < 0 || layer >= cache.layers())
    throw invalid_size("attention: shape (batch " + std::to_string(s.batch) + ", heads " +
                       std::to_string(s.heads) + ", kv heads " + std::to_string(s.kv_heads) +
                       ", head_dim " + std::to_string(s.head_dim) + ", layer " +
                       std::to_string(layer) + ") does not match the cache");
  if (past + s.seq > cache.capacity())
    throw invalid_size("attention: " + std::to_string(past) + " cached + " + std::to_string(s.seq) +
                       " new positions exceed the cache capacity " +
                       std::to_string(cache.capacity()));
  const auto hd = static_cast<std::size_t>(s.head_dim);
  const auto q_row = static_cast<std::size_t>(s.heads) * hd,
             kv_row = static_cast<std::size_t>(s.kv_heads) * hd;
  const auto rows = static_cast<std::size_t>(s.batch * s.seq);
  if (q.size() != rows * q_row || k_new.size() != rows * kv_row || v_new.size() != rows * kv_row ||
      out.size() != rows * q_row)
    throw invalid_size("attention: q/k/v/out sizes do not match batch x seq x heads x head_dim");

  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.kv_heads; ++h)
      for (std::int64_t t = 0; t < s.seq; ++t) {
        const std::size_t src =
            static_cast<std::size_t>(b * s.seq + t) * kv_row + static_cast<std::size_t>(h) * hd;
        const std::size_t dst = static_cast<std::size_t>(past + t) * hd;
        std::copy_n(k_new.data() + src, hd, cache.k(layer, b, h) + dst);
        std::copy_n(v_new.data() + src, hd, cache.v(layer, b, h) + dst);
      }

  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const std::int64_t group = s.heads / s.kv_heads;
  using rmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  pool.parallel_for(
      static_cast<std::size_t>(s.batch * s.heads), 1, [&](std::size_t lo, std::size_t hi) {
        std::vector<float> p;
        for (std::size_t bh = lo; bh < hi; ++bh) {
          const auto b = static_cast<std::int64_t>(bh) / s.heads,
                     h = static_cast<std::int64_t>(bh) % s.heads;
          const float* kc = cache.k(layer, b, h / group);
          const float* vc = cache.v(layer, b, h / group);
          for (std::int64_t t = 0; t < s.seq; ++t) {
            const std::int64_t pos = past + t;
            std::int64_t first = 0;
            if (s.sliding_window) first = std::max<std::int64_t>(0, pos - *s.sliding_window + 1);
            const std::int64_t n = pos + 1 - first;
            const std::size_t qo =
                static_cast<std::size_t>(b * s.seq + t) * q_row + static_cast<std::size_t>(h) * hd;
            Eigen::Map<const Eigen::VectorXf> qv(q.data() + qo, s.head_dim);
            Eigen::Map<const rmat> K(kc + static_cast<std::size_t>(first) * hd, n, s.head_dim);
            Eigen::Map<const rmat> V(vc + static_cast<std::size_t>(first) * hd, n, s.head_dim);
            p.resize(static_cast<std::size_t>(n));
            Eigen::Map<Eigen::VectorXf> pv(p.data(), n);
            pv.noalias() = K * qv;
            pv *= scale;
            const float mx = pv.maxCoeff();
            float sum = 0;
            for (auto& x : p) {
              x = std::exp(x - mx);
              sum += x;
            }
            pv /= sum;
            Eigen::Map<Eigen::VectorXf> ov(out.data() + qo, s.head_dim);
            ov.noalias() = V.transpose() * pv;
          }
        }
      });
}

}  // namespace stowage::exec::cpu
