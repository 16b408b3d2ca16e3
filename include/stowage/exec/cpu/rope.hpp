// stowage/exec/cpu/rope.hpp: rotary position embeddings as Transformers computes them.
// inv_freq is built in float32 with the operations in the order of modeling_rope_utils.py
// ("default", "linear", "dynamic", "llama3"), so the angles match torch bit for bit up to the
// last ulp of pow/cos/sin; q and k are rotated in the rotate_half convention
// (the first and second halves of a head form the pairs).
#pragma once

#include <stowage/core/error.hpp>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <vector>

namespace stowage::exec::cpu {

/// The rope settings of a config (rope_theta + rope_scaling / rope_parameters).
struct rope_params {
  std::string type = "default";  ///< default | linear | dynamic | llama3
  double theta = 10000.0;
  std::int64_t dim = 0;  ///< rotated dimensions (head_dim; partial_rotary_factor = 1)
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  std::int64_t original_max_position_embeddings = 0;  ///< llama3
  std::int64_t max_position_embeddings = 2048;        ///< dynamic
};

namespace detail {
/// 1 / base^(arange(0, dim, 2) / dim) in float32 (Transformers' default inv_freq).
inline std::vector<float> default_inv_freq(float base, std::int64_t dim) {
  std::vector<float> f(static_cast<std::size_t>(dim / 2));
  for (std::size_t i = 0; i < f.size(); ++i) {
    const float e = static_cast<float>(2 * static_cast<std::int64_t>(i)) / static_cast<float>(dim);
    f[i] = 1.0f / std::pow(base, e);
  }
  return f;
}
}  // namespace detail

class rotary_embedding {
 public:
  explicit rotary_embedding(rope_params p) : p_(std::move(p)) {
    if (p_.dim <= 0 || p_.dim % 2 != 0)
      throw invalid_config("rope: head dimension " + std::to_string(p_.dim) +
                           " must be positive and even");
    if (!(p_.theta > 0)) throw invalid_config("rope: rope_theta must be positive");
    if (p_.type == "default") {
      inv_freq_ = detail::default_inv_freq(static_cast<float>(p_.theta), p_.dim);
    } else if (p_.type == "linear") {
      inv_freq_ = detail::default_inv_freq(static_cast<float>(p_.theta), p_.dim);
      for (float& f : inv_freq_) f /= static_cast<float>(p_.factor);
    } else if (p_.type == "dynamic") {
      inv_freq_ = detail::default_inv_freq(static_cast<float>(p_.theta), p_.dim);
      original_ = inv_freq_;
      cached_len_ = p_.max_position_embeddings;
    } else if (p_.type == "llama3") {
      init_llama3();
    } else {
      throw invalid_config("rope: rope_type '" + p_.type +
                           "' is not supported (default, linear, dynamic, llama3 are)");
    }
  }

  const rope_params& params() const noexcept { return p_; }
  std::span<const float> inv_freq() const noexcept { return inv_freq_; }

  /// "dynamic" only: Transformers' dynamic_rope_update for a forward whose largest position
  /// is seq_len - 1 (grow beyond the cached length; reset when back inside the original one).
  void update(std::int64_t seq_len) {
    if (p_.type != "dynamic") return;
    const std::int64_t cached_before = cached_len_;
    if (seq_len > cached_len_) {
      // In float32, as the tensor expression in _compute_dynamic_ntk_parameters evaluates.
      const float fac = static_cast<float>(p_.factor);
      const float s =
          fac * static_cast<float>(seq_len) / static_cast<float>(p_.max_position_embeddings) -
          (fac - 1.0f);
      const float ex =
          static_cast<float>(static_cast<double>(p_.dim) / static_cast<double>(p_.dim - 2));
      const float base = static_cast<float>(p_.theta) * std::pow(s, ex);
      inv_freq_ = detail::default_inv_freq(base, p_.dim);
      cached_len_ = seq_len;
    }
    if (seq_len < p_.max_position_embeddings && cached_before > p_.max_position_embeddings) {
      inv_freq_ = original_;
      cached_len_ = p_.max_position_embeddings;
    }
  }

  /// cos/sin of position `pos` for the dim/2 frequencies.
  void angles(std::int64_t pos, float* cos_out, float* sin_out) const noexcept {
    const float fp = static_cast<float>(pos);
    for (std::size_t i = 0; i < inv_freq_.size(); ++i) {
      const float a = fp * inv_freq_[i];
      cos_out[i] = std::cos(a);
      sin_out[i] = std::sin(a);
    }
  }

  /// Rotates `heads` consecutive head vectors of length dim in place, at one position.
  void apply(float* x, std::int64_t heads, const float* cos_v, const float* sin_v) const noexcept {
    const auto h = static_cast<std::size_t>(p_.dim / 2);
    for (std::int64_t hd = 0; hd < heads; ++hd) {
      float* v = x + static_cast<std::size_t>(hd) * 2 * h;
      for (std::size_t i = 0; i < h; ++i) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos_v[i] - b * sin_v[i];
        v[i + h] = b * cos_v[i] + a * sin_v[i];
      }
    }
  }

 private:
  void init_llama3() {
    if (p_.original_max_position_embeddings <= 0 || !(p_.factor > 0) ||
        p_.high_freq_factor == p_.low_freq_factor)
      throw invalid_config(
          "rope: llama3 scaling needs factor > 0, original_max_position_embeddings > 0 and "
          "high_freq_factor != low_freq_factor");
    const auto base = detail::default_inv_freq(static_cast<float>(p_.theta), p_.dim);
    const double old_ctx = static_cast<double>(p_.original_max_position_embeddings);
    const double low_wavelen = old_ctx / p_.low_freq_factor;    // Python floats
    const double high_wavelen = old_ctx / p_.high_freq_factor;  // Python floats
    const float factor = static_cast<float>(p_.factor);
    const float lff = static_cast<float>(p_.low_freq_factor);
    const float span = static_cast<float>(p_.high_freq_factor - p_.low_freq_factor);
    const float two_pi = static_cast<float>(2 * std::numbers::pi);
    inv_freq_.resize(base.size());
    for (std::size_t i = 0; i < base.size(); ++i) {
      const float inv = base[i];
      const float wavelen = two_pi / inv;
      // Comparisons of a float32 tensor with a Python scalar happen in float32.
      float v = wavelen > static_cast<float>(low_wavelen) ? inv / factor : inv;
      const float smooth = (static_cast<float>(old_ctx) / wavelen - lff) / span;
      const float smoothed = (1.0f - smooth) * v / factor + smooth * v;
      const bool medium = !(wavelen < static_cast<float>(high_wavelen)) &&
                          !(wavelen > static_cast<float>(low_wavelen));
      inv_freq_[i] = medium ? smoothed : v;
    }
  }

  rope_params p_;
  std::vector<float> inv_freq_;
  std::vector<float> original_;
  std::int64_t cached_len_ = 0;
};

}  // namespace stowage::exec::cpu
