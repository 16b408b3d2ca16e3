// stowage/module/to_module_tree.hpp: the runtime view of a typed model. to_module_tree(model)
// gives the module_tree placement works on, with the same module names, class names, tensors
// (shape, dtype, persistence), registration order and tie groups as the torch model
// Transformers builds from the same config.
#pragma once

#include <stowage/config.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/traverse.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace stowage {

namespace detail {
struct tree_builder {
  module_tree& tree;
  std::vector<std::size_t> stack;

  void parameter(std::string_view, std::string_view local, const stowage::parameter& p) {
    tree.add_parameter(stack.back(), tensor_entry{std::string(local), p.shape(), p.dtype(), true});
  }
  void buffer(std::string_view, std::string_view local, const stowage::buffer& b) {
    tree.add_buffer(stack.back(),
                    tensor_entry{std::string(local), b.shape(), b.dtype(), b.persistent()});
  }
  void enter(std::string_view, std::string_view local, std::string_view cls) {
    stack.push_back(tree.add_child(stack.back(), std::string(local), std::string(cls)));
  }
  void leave() { stack.pop_back(); }
};
}  // namespace detail

/// The module tree of a typed model. Tie groups (from m.tied_weights()) list every name of a
/// shared tensor, string-sorted, as accelerate's find_tied_parameters does.
template <module_type M>
module_tree to_module_tree(const M& model) {
  module_tree tree{std::string(module_class_name(model))};
  detail::tree_builder b{tree, {0}};
  std::string path;
  path.reserve(128);
  detail::walk_module(model, path, b);
  if constexpr (has_tied_weights<M>) {
    std::vector<std::vector<std::string>> groups;
    for (const tied_weight& t : model.tied_weights()) {
      auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& grp) {
        return std::find(grp.begin(), grp.end(), t.target) != grp.end() ||
               std::find(grp.begin(), grp.end(), t.alias) != grp.end();
      });
      if (g == groups.end()) {
        groups.push_back({std::string(t.target)});
        g = std::prev(groups.end());
      }
      for (std::string_view n : {t.target, t.alias})
        if (std::find(g->begin(), g->end(), n) == g->end()) g->emplace_back(n);
    }
    for (auto& g : groups) {
      std::sort(g.begin(), g.end());
      tree.tie(std::move(g));
    }
  }
  return tree;
}

}  // namespace stowage
