// stowage/exec/cpu/sampling.hpp: choosing the next token from logits. Greedy is torch.argmax
// (the first maximum wins). Sampling applies Transformers' logits warpers in their order —
// temperature, then top-k (ties with the k-th value kept), then top-p (drop the ascending
// prefix whose cumulative probability is <= 1 - top_p, keep at least one) — then draws from
// the softmax with a seeded std::mt19937_64, so a run is reproducible from its seed (the draws
// differ from torch's generator).
#pragma once

#include <stowage/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace stowage::exec::cpu {

struct sampling_options {
  bool do_sample = false;    ///< false: greedy
  float temperature = 1.0f;  ///< > 0
  std::int64_t top_k = 0;    ///< 0: off
  float top_p = 1.0f;        ///< 1: off
  std::uint64_t seed = 0;
};

/// Index of the first maximum (NaN never wins).
inline std::int64_t argmax(std::span<const float> logits) {
  if (logits.empty()) throw invalid_size("argmax: empty logits");
  std::size_t best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best] || (std::isnan(logits[best]) && !std::isnan(logits[i]))) best = i;
  return static_cast<std::int64_t>(best);
}

/// Applies temperature, top-k and top-p to `scores` in place (removed entries become -inf).
inline void warp_logits(std::span<float> scores, const sampling_options& o) {
  if (!(o.temperature > 0.0f))
    throw invalid_config("sampling: temperature must be > 0 (got " + std::to_string(o.temperature) +
                         ")");
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f))
    throw invalid_config("sampling: top_p must be in (0, 1] (got " + std::to_string(o.top_p) + ")");
  if (o.top_k < 0) throw invalid_config("sampling: top_k must be >= 0");
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  if (o.temperature != 1.0f)
    for (float& s : scores) s /= o.temperature;
  if (o.top_k > 0 && static_cast<std::size_t>(o.top_k) < scores.size()) {
    std::vector<float> tmp(scores.begin(), scores.end());
    std::nth_element(tmp.begin(), tmp.begin() + (o.top_k - 1), tmp.end(), std::greater<>());
    const float kth = tmp[static_cast<std::size_t>(o.top_k - 1)];
    for (float& s : scores)
      if (s < kth) s = ninf;
  }
  if (o.top_p < 1.0f) {
    std::vector<std::size_t> idx(scores.size());
    std::iota(idx.begin(), idx.end(), std::size_t{0});
    std::stable_sort(idx.begin(), idx.end(),
                     [&](std::size_t a, std::size_t b) { return scores[a] < scores[b]; });
    const float mx = scores[idx.back()];
    double total = 0;
    for (float s : scores) total += std::exp(static_cast<double>(s - mx));
    double cum = 0;
    for (std::size_t j = 0; j + 1 < idx.size(); ++j) {  // the largest is always kept
      cum += std::exp(static_cast<double>(scores[idx[j]] - mx)) / total;
      if (cum <= 1.0 - static_cast<double>(o.top_p))
        scores[idx[j]] = ninf;
      else
        break;
    }
  }
}

/// A token sampler with its own generator.
class sampler {
 public:
  explicit sampler(sampling_options o = {}) : o_(o), rng_(o.seed) {}
  const sampling_options& options() const noexcept { return o_; }

  std::int64_t next(std::span<const float> logits) {
    if (!o_.do_sample) return argmax(logits);
    std::vector<float> s(logits.begin(), logits.end());
    warp_logits(s, o_);
    const float mx = *std::max_element(s.begin(), s.end());
    std::vector<double> p(s.size());
    double total = 0;
    for (std::size_t i = 0; i < s.size(); ++i)
      total += (p[i] = std::exp(static_cast<double>(s[i] - mx)));
    std::uniform_real_distribution<double> u(0.0, total);
    double r = u(rng_), acc = 0;
    for (std::size_t i = 0; i < p.size(); ++i) {
      acc += p[i];
      if (r < acc && p[i] > 0) return static_cast<std::int64_t>(i);
    }
    return argmax(s);  // r landed on the rounding edge: the last kept token
  }

 private:
  sampling_options o_;
  std::mt19937_64 rng_;
};

}  // namespace stowage::exec::cpu
