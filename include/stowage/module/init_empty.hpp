// stowage/module/init_empty.hpp: init_empty<Model>(config), accelerate's init_empty_weights
// for typed models: the whole structure, every parameter a meta descriptor, no weight bytes.
// A model opts in by being constructible from its config; construction must not allocate
// weights (parameters cannot hold any), so this is the only way a model is built.
#pragma once

#include <stowage/config.hpp>
#include <stowage/module/reflection.hpp>

#include <concepts>

namespace stowage {

/// Builds Model from its configuration with meta parameters only.
template <module_type Model, class Config>
  requires std::constructible_from<Model, const Config&> Model init_empty(const Config& config) {
    return Model(config);
  }

}  // namespace stowage
