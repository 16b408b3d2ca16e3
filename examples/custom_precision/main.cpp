// A precision of one's own: int8 weights with one float32 scale per output channel (symmetric,
// round to nearest), computed in float32. The tag satisfies stowage::precision_policy, so
// module containers take it (linear<int8_per_channel>: an int8 weight, a float32 bias) and the
// planner sizes its weights; the quantize / dequantize / matvec functions next to it are the
// storage format's own code. It quantizes a linear layer's weight, checks the round trip, and
// runs y = W x + b from the int8 bytes against the float32 product.
#include <stowage/module/leaf_modules.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/precision/concepts.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sw = stowage;

// [doc:policy]
// The policy is an empty tag: what a weight is stored as, what it is computed in, a name.
struct int8_per_channel {
  static constexpr sw::dtype storage_dtype = sw::dtype::int8;
  static constexpr sw::dtype compute_dtype = sw::dtype::float32;
  static constexpr std::string_view name = "int8_pc";
  static constexpr bool quantized = true;  // stored in another form than it computes in
};
static_assert(sw::precision_policy<int8_per_channel>,
              "int8_per_channel must satisfy precision_policy: an empty trivially copyable tag "
              "with storage_dtype, a floating compute_dtype and a name");
static_assert(sw::is_quantized_v<int8_per_channel>);

// The stored form of one weight [rows, cols]: int8 codes and a scale per row (output channel).
struct int8_pc_weight {
  std::size_t rows = 0, cols = 0;
  std::vector<std::int8_t> q;
  std::vector<float> scale;
};

// scale = max|w| / 127 per row; q = round(w / scale). A zero row keeps scale 0 and codes 0.
int8_pc_weight quantize(std::span<const float> w, std::size_t rows, std::size_t cols) {
  if (w.size() != rows * cols)
    throw sw::invalid_size("int8_per_channel::quantize: expected " + std::to_string(rows * cols) +
                           " elements, got " + std::to_string(w.size()));
  int8_pc_weight out{rows, cols, std::vector<std::int8_t>(w.size()), std::vector<float>(rows)};
  for (std::size_t r = 0; r < rows; ++r) {
    float amax = 0;
    for (std::size_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
    out.scale[r] = amax / 127.0f;
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (std::size_t c = 0; c < cols; ++c)
      out.q[r * cols + c] = static_cast<std::int8_t>(std::lrint(w[r * cols + c] * inv));
  }
  return out;
}

std::vector<float> dequantize(const int8_pc_weight& w) {
  std::vector<float> out(w.q.size());
  for (std::size_t r = 0; r < w.rows; ++r)
    for (std::size_t c = 0; c < w.cols; ++c)
      out[r * w.cols + c] = static_cast<float>(w.q[r * w.cols + c]) * w.scale[r];
  return out;
}

// y = W x + b straight from the codes: one integer-valued dot product per row, scaled once.
void matvec(const int8_pc_weight& w, std::span<const float> x, std::span<const float> bias,
            std::span<float> y) {
  for (std::size_t r = 0; r < w.rows; ++r) {
    float acc = 0;
    for (std::size_t c = 0; c < w.cols; ++c) acc += static_cast<float>(w.q[r * w.cols + c]) * x[c];
    y[r] = acc * w.scale[r] + (bias.empty() ? 0.0f : bias[r]);
  }
}
// [/doc:policy]

int main() try {
  // [doc:use]
  // A linear layer in the new precision: the weight is int8 [out, in], the bias float32.
  const sw::linear<int8_per_channel> layer(/*in_features=*/256, /*out_features=*/64,
                                           /*has_bias=*/true);
  std::printf(
      "weight %s [%lld, %lld], bias %s\n", std::string(sw::name(layer.weight.dtype())).c_str(),
      static_cast<long long>(layer.out_features()), static_cast<long long>(layer.in_features()),
      std::string(sw::name(layer.bias->dtype())).c_str());
  // The planner sizes it from the descriptors (the 64 scales are the format's own extra bytes).
  const auto sizes = sw::compute_module_sizes(sw::to_module_tree(layer));
  std::printf("planned size: %s bytes (+ %zu bytes of scales)\n",
              sizes[""].to_python_string().c_str(), 64 * sizeof(float));

  // Weights and input from a fixed formula (a checkpoint would provide the weights).
  const std::size_t rows = 64, cols = 256;
  std::vector<float> w(rows * cols), x(cols), bias(rows);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.37f * static_cast<float>(i)) * 0.05f;
  for (std::size_t i = 0; i < cols; ++i) x[i] = std::cos(0.11f * static_cast<float>(i));
  for (std::size_t i = 0; i < rows; ++i) bias[i] = 0.01f * static_cast<float>(i);

  const int8_pc_weight q = quantize(w, rows, cols);
  const std::vector<float> back = dequantize(q);
  bool within_half_step = true;  // round to nearest: |w - dequant(q(w))| <= scale / 2
  for (std::size_t i = 0; i < w.size(); ++i)
    within_half_step &= std::fabs(w[i] - back[i]) <= q.scale[i / cols] * 0.5f + 1e-7f;

  std::vector<float> y(rows), ref(rows);
  matvec(q, x, bias, y);
  double err = 0, norm = 0;
  for (std::size_t r = 0; r < rows; ++r) {
    double s = bias[r];
    for (std::size_t c = 0; c < cols; ++c) s += static_cast<double>(w[r * cols + c]) * x[c];
    ref[r] = static_cast<float>(s);
    err += (y[r] - s) * (y[r] - s);
    norm += s * s;
  }
  const double rel = std::sqrt(err / norm);
  std::printf("round trip within half a step: %s; matvec relative error vs float32: %s\n",
              within_half_step ? "yes" : "no", rel < 1e-2 ? "< 1%" : "too large");
  std::printf("stored bytes: %zu (int8) + %zu (scales) vs %zu as float32\n", q.q.size(),
              q.scale.size() * sizeof(float), w.size() * sizeof(float));
  // [/doc:use]
  return within_half_step && rel < 1e-2 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "custom_precision: %s\n", e.what());
  return 1;
}
