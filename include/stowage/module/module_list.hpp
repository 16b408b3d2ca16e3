// stowage/module/module_list.hpp: module_list<T>, torch's nn.ModuleList for one module type
// with a length known only at run time (num_hidden_layers). Its children are named "0", "1",
// ... in index order, so a decoder layer's weight is "model.layers.17.mlp.up_proj.weight".
// One vector holds the modules: building 126 decoder layers is one allocation.
#pragma once

#include <stowage/config.hpp>
#include <stowage/module/reflection.hpp>

#include <cstddef>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace stowage {

/// A run-time-length list of modules of one type (Transformers' nn.ModuleList).
template <module_type T>
class module_list {
 public:
  using value_type = T;
  static constexpr std::string_view class_name = "ModuleList";

  module_list() = default;
  /// n modules, each built by make(i) (the index is torch's layer_idx).
  template <class Make>
    requires std::is_invocable_r_v<T, Make&, std::size_t> module_list(std::size_t n, Make make) {
      items_.reserve(n);
      for (std::size_t i = 0; i < n; ++i) items_.push_back(make(i));
    }

  void reserve(std::size_t n) { items_.reserve(n); }
  T& push_back(T m) { return items_.emplace_back(std::move(m)); }
  template <class... Args>
  T& emplace_back(Args&&... args) {
    return items_.emplace_back(std::forward<Args>(args)...);
  }

  std::size_t size() const noexcept { return items_.size(); }
  bool empty() const noexcept { return items_.empty(); }
  T& operator[](std::size_t i) noexcept { return items_[i]; }
  const T& operator[](std::size_t i) const noexcept { return items_[i]; }
  T& at(std::size_t i) { return items_.at(i); }
  const T& at(std::size_t i) const { return items_.at(i); }
  auto begin() noexcept { return items_.begin(); }
  auto end() noexcept { return items_.end(); }
  auto begin() const noexcept { return items_.begin(); }
  auto end() const noexcept { return items_.end(); }

 private:
  std::vector<T> items_;
};

/// True for module_list<T> (the traversal names its children by index).
template <class T>
inline constexpr bool is_module_list_v = false;
template <class T>
inline constexpr bool is_module_list_v<module_list<T>> = true;

}  // namespace stowage
