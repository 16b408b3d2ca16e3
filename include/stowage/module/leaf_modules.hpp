// stowage/module/leaf_modules.hpp: the leaf modules every transformer is built from, with
// torch's class names and parameter order: linear<Precision> ("Linear": weight [out, in],
// optional bias [out]), embedding ("Embedding": weight [num, dim]), rms_norm ("RMSNorm":
// weight [dim]), layer_norm ("LayerNorm": weight, optional bias) and activation (a
// parameter-free module such as Transformers' "SiLUActivation"). All parameters are meta.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/precision/concepts.hpp>

#include <boost/hana/define_struct.hpp>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace stowage {

namespace detail {
inline void check_dim(std::int64_t v, const char* module, const char* what) {
  if (v <= 0)
    throw model_error(std::string(module) + ": " + what + " must be positive, got " +
                      std::to_string(v));
}
}  // namespace detail

/// y = x W^T + b. The weight is stored as Precision says (storage_dtype); the bias, which no
/// quantizer touches, in its compute dtype. Whether there is a bias is a run-time choice
/// (attention_bias in a config), as in torch.
template <precision_policy Precision>
struct linear {
  using precision_type = Precision;
  static constexpr std::string_view class_name = "Linear";

  BOOST_HANA_DEFINE_STRUCT(linear, (parameter, weight), (std::optional<parameter>, bias));

  linear() = default;
  linear(std::int64_t in_features, std::int64_t out_features, bool has_bias) {
    detail::check_dim(in_features, "linear", "in_features");
    detail::check_dim(out_features, "linear", "out_features");
    weight = parameter({out_features, in_features}, Precision::storage_dtype);
    if (has_bias) bias = parameter({out_features}, Precision::compute_dtype);
  }
  std::int64_t in_features() const noexcept { return weight.shape()[1]; }
  std::int64_t out_features() const noexcept { return weight.shape()[0]; }
  bool has_bias() const noexcept { return bias.has_value(); }
};

/// A lookup table: weight [num_embeddings, embedding_dim].
struct embedding {
  static constexpr std::string_view class_name = "Embedding";

  BOOST_HANA_DEFINE_STRUCT(embedding, (parameter, weight));

  embedding() = default;
  embedding(std::int64_t num_embeddings, std::int64_t embedding_dim, dtype d) {
    detail::check_dim(num_embeddings, "embedding", "num_embeddings");
    detail::check_dim(embedding_dim, "embedding", "embedding_dim");
    weight = parameter({num_embeddings, embedding_dim}, d);
  }
  std::int64_t num_embeddings() const noexcept { return weight.shape()[0]; }
  std::int64_t embedding_dim() const noexcept { return weight.shape()[1]; }
};

/// Root-mean-square normalisation with a learned scale: weight [dim]. Model families wrap it
/// to give it their own class name (LlamaRMSNorm).
struct rms_norm {
  static constexpr std::string_view class_name = "RMSNorm";

  BOOST_HANA_DEFINE_STRUCT(rms_norm, (parameter, weight));
  double eps = 1e-6;

  rms_norm() = default;
  rms_norm(std::int64_t dim, dtype d, double epsilon) : eps(epsilon) {
    detail::check_dim(dim, "rms_norm", "dim");
    weight = parameter({dim}, d);
  }
};

/// Layer normalisation: weight [dim] and (optionally) bias [dim].
struct layer_norm {
  static constexpr std::string_view class_name = "LayerNorm";

  BOOST_HANA_DEFINE_STRUCT(layer_norm, (parameter, weight), (std::optional<parameter>, bias));
  double eps = 1e-5;

  layer_norm() = default;
  layer_norm(std::int64_t dim, dtype d, double epsilon, bool has_bias = true) : eps(epsilon) {
    detail::check_dim(dim, "layer_norm", "dim");
    weight = parameter({dim}, d);
    if (has_bias) bias = parameter({dim}, d);
  }
};

/// Transformers' activation modules by config name (ACT2CLS in transformers/activations.py),
/// restricted to those without parameters or buffers (prelu and xielu have some).
inline constexpr std::array<std::pair<std::string_view, std::string_view>, 22> activation_classes{{
    {"gelu", "GELUActivation"},
    {"gelu_10", "ClippedGELUActivation"},
    {"gelu_fast", "FastGELUActivation"},
    {"gelu_new", "NewGELUActivation"},
    {"gelu_python", "GELUActivation"},
    {"gelu_pytorch_tanh", "GELUTanh"},
    {"gelu_python_tanh", "GELUTanh"},
    {"gelu_accurate", "AccurateGELUActivation"},
    {"hardswish", "Hardswish"},
    {"laplace", "LaplaceActivation"},
    {"leaky_relu", "LeakyReLU"},
    {"linear", "LinearActivation"},
    {"mish", "MishActivation"},
    {"quick_gelu", "QuickGELUActivation"},
    {"relu", "ReLU"},
    {"relu2", "ReLUSquaredActivation"},
    {"relu6", "ReLU6"},
    {"sigmoid", "Sigmoid"},
    {"silu", "SiLUActivation"},
    {"sqrtsoftplus", "SqrtSoftplusActivation"},
    {"swish", "SiLU"},
    {"tanh", "Tanh"},
}};

/// The module class of an activation name ("silu" -> "SiLUActivation"); empty if unknown.
constexpr std::string_view activation_class_name(std::string_view act) noexcept {
  for (const auto& [n, c] : activation_classes)
    if (n == act) return c;
  return {};
}

/// A parameter-free activation module (act_fn in an MLP). It owns no tensor but is a module
/// in torch, so it is a node of the module tree (and a leaf for get_max_layer_size).
struct activation {
  static constexpr std::string_view class_name = "SiLUActivation";
  BOOST_HANA_DEFINE_STRUCT(activation);
  std::string_view cls = class_name;  ///< points into activation_classes: static storage

  activation() = default;
  /// Throws model_error for a name Transformers does not know or one with parameters.
  explicit activation(std::string_view act) : cls(activation_class_name(act)) {
    if (cls.empty())
      throw model_error("activation: unsupported activation \"" + std::string(act) + "\"");
  }
  std::string_view runtime_class_name() const noexcept { return cls; }
};

}  // namespace stowage
