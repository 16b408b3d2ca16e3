// stowage/module/traverse.hpp: walking a typed model the way torch walks an nn.Module.
// Members of a reflected module struct are classified by type: parameter / std::optional<
// parameter> (a bias that may be absent), buffer, module_list<T>, or a child module; anything
// else (eps, sizes, flags) is configuration and is skipped. Names are built at traversal time
// in one reused string, so the model itself stores no names.
//
// Order is torch's: modules in pre-order (root first, then each child subtree in declaration
// order), each module's direct parameters (and buffers) before its children.
#pragma once

#include <stowage/config.hpp>
#include <stowage/module/module_list.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/reflection.hpp>

#include <charconv>
#include <concepts>
#include <cstddef>
#include <optional>
#include <ranges>
#include <string>
#include <string_view>
#include <type_traits>

namespace stowage {

/// A tie: the parameter `alias` is the same tensor as `target` (full dotted names), the way
/// Transformers' `_tied_weights_keys` maps "lm_head.weight" to "model.embed_tokens.weight".
struct tied_weight {
  std::string_view alias;
  std::string_view target;
};

/// A model that declares tied parameters through `m.tied_weights()`, a range of tied_weight
/// (empty when the config unties them).
template <class M>
concept has_tied_weights = requires(const M& m) {
  { m.tied_weights() } -> std::ranges::input_range;
  requires std::convertible_to<std::ranges::range_value_t<decltype(m.tied_weights())>, tied_weight>;
};

namespace detail {

// Appends ".local" (or "local" at the root) to path; returns the previous length to restore.
inline std::size_t push_name(std::string& path, std::string_view local) {
  const std::size_t old = path.size();
  if (!path.empty()) path.push_back('.');
  path.append(local);
  return old;
}

/// Visitor protocol used by walk_module:
///   v.parameter(full_name, local_name, const parameter&)
///   v.buffer(full_name, local_name, const buffer&)
///   v.enter(full_name, local_name, class_name) / v.leave()
template <module_type M, class V>
void walk_module(const M& m, std::string& path, V& v) {
  // Direct tensors first, in declaration order.
  for_each_member(m, [&](std::string_view local, const auto& x) {
    using X = std::remove_cvref_t<decltype(x)>;
    if constexpr (std::is_same_v<X, buffer> || std::is_same_v<X, std::optional<buffer>> ||
                  std::is_same_v<X, parameter> || std::is_same_v<X, std::optional<parameter>>) {
      const auto* t = [&] {
        if constexpr (std::is_same_v<X, buffer> || std::is_same_v<X, parameter>)
          return &x;
        else
          return x ? &*x : nullptr;
      }();
      if (!t) return;
      const std::size_t old = push_name(path, local);
      if constexpr (std::is_same_v<X, buffer> || std::is_same_v<X, std::optional<buffer>>)
        v.buffer(std::string_view(path), local, *t);
      else
        v.parameter(std::string_view(path), local, *t);
      path.resize(old);
    }
  });
  // Then child modules, in declaration order.
  for_each_member(m, [&](std::string_view local, const auto& x) {
    using X = std::remove_cvref_t<decltype(x)>;
    if constexpr (is_module_list_v<X>) {
      const std::size_t old = push_name(path, local);
      v.enter(std::string_view(path), local, module_class_name(x));
      for (std::size_t i = 0; i < x.size(); ++i) {
        char digits[24];
        const auto r = std::to_chars(digits, digits + sizeof digits, i);
        const std::string_view idx(digits, static_cast<std::size_t>(r.ptr - digits));
        const std::size_t old_i = push_name(path, idx);
        v.enter(std::string_view(path), idx, module_class_name(x[i]));
        walk_module(x[i], path, v);
        v.leave();
        path.resize(old_i);
      }
      v.leave();
      path.resize(old);
    } else if constexpr (module_type<X>) {
      const std::size_t old = push_name(path, local);
      v.enter(std::string_view(path), local, module_class_name(x));
      walk_module(x, path, v);
      v.leave();
      path.resize(old);
    } else if constexpr (reflected_struct<X>) {
      static_assert(dependent_false_v<X>,
                    "stowage: a member of a module is a reflected struct without a class name; "
                    "give it `static constexpr std::string_view class_name` or specialise "
                    "stowage::module_class_name_v so it is a module_type");
    }
  });
}

template <class F>
struct parameter_visitor {
  F& f;
  void parameter(std::string_view full, std::string_view, const stowage::parameter& p) {
    f(full, p);
  }
  void buffer(std::string_view, std::string_view, const stowage::buffer&) {}
  void enter(std::string_view, std::string_view, std::string_view) {}
  void leave() {}
};

template <class F>
struct buffer_visitor {
  F& f;
  void parameter(std::string_view, std::string_view, const stowage::parameter&) {}
  void buffer(std::string_view full, std::string_view, const stowage::buffer& b) { f(full, b); }
  void enter(std::string_view, std::string_view, std::string_view) {}
  void leave() {}
};

template <class F>
struct module_visitor {
  F& f;
  void parameter(std::string_view, std::string_view, const stowage::parameter&) {}
  void buffer(std::string_view, std::string_view, const stowage::buffer&) {}
  void enter(std::string_view full, std::string_view, std::string_view cls) { f(full, cls); }
  void leave() {}
};

}  // namespace detail

/// Calls f(std::string_view full_name, const parameter&) for every parameter of the model in
/// torch's named_parameters(remove_duplicate=False) order: a tied alias (lm_head.weight) is
/// visited under its own name too. The name view is valid only during the call.
template <module_type M, class F>
  requires std::invocable<F&, std::string_view, const parameter&>
void for_each_parameter(const M& model, F&& f) {
  std::string path;
  path.reserve(128);
  detail::parameter_visitor<std::remove_reference_t<F>> v{f};
  detail::walk_module(model, path, v);
}

/// Calls f(std::string_view full_name, const buffer&) for every buffer, persistent or not, in
/// torch's named_buffers order.
template <module_type M, class F>
  requires std::invocable<F&, std::string_view, const buffer&>
void for_each_buffer(const M& model, F&& f) {
  std::string path;
  path.reserve(128);
  detail::buffer_visitor<std::remove_reference_t<F>> v{f};
  detail::walk_module(model, path, v);
}

/// Calls f(std::string_view full_name, std::string_view class_name) for every module below the
/// root, in torch's named_modules order.
template <module_type M, class F>
  requires std::invocable<F&, std::string_view, std::string_view>
void for_each_module(const M& model, F&& f) {
  std::string path;
  path.reserve(128);
  detail::module_visitor<std::remove_reference_t<F>> v{f};
  detail::walk_module(model, path, v);
}

}  // namespace stowage
