// stowage/module/sizes.hpp: how many bytes each module and tensor of a module_tree needs, counted
// exactly as accelerate's compute_module_sizes counts them (bool = 1/8 byte, a target dtype only
// shrinks floating tensors, tied tensors once under their first name), plus the helpers the
// planner builds on: the largest unsplittable layer, tie groups, buffer totals.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/module/module_tree.hpp>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace stowage {

/// Per-tensor dtype overrides by full dotted name (accelerate's special_dtypes).
using special_dtypes = std::vector<std::pair<std::string, dtype>>;

/// Name -> size in accelerate's insertion order. Names without an entry (tensor-free modules,
/// modules holding only tied aliases) read as 0, as every accelerate lookup does.
class module_sizes {
 public:
  /// The size recorded for `name`, or 0.
  byte_size operator[](std::string_view name) const {
    auto it = index_.find(name);
    return it == index_.end() ? byte_size{} : entries_[it->second].second;
  }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }
  /// Adds `s` to `name`'s entry, creating it at the end if absent.
  void add(std::string_view name, byte_size s) {
    auto it = index_.find(name);
    if (it == index_.end()) {
      index_.emplace(std::string(name), entries_.size());
      entries_.emplace_back(std::string(name), s);
    } else {
      entries_[it->second].second += s;
    }
  }
  /// Appends an entry known to be new (compute_module_sizes' fast path).
  void append_new(std::string_view name, byte_size s) {
    index_.emplace(std::string(name), entries_.size());
    entries_.emplace_back(std::string(name), s);
  }
  void reserve(std::size_t n) {
    entries_.reserve(n);
    index_.reserve(n);
  }
  const std::vector<std::pair<std::string, byte_size>>& entries() const noexcept {
    return entries_;
  }
  std::size_t size() const noexcept { return entries_.size(); }
  /// The whole model ("" entry).
  byte_size total() const { return (*this)[""]; }

 private:
  struct hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  std::vector<std::pair<std::string, byte_size>> entries_;
  std::unordered_map<std::string, std::size_t, hash, std::equal_to<>> index_;
};

namespace detail {

/// accelerate's per-tensor rule: a special dtype wins; else without a target dtype the tensor's
/// own; integer and bool tensors are never converted; floating tensors shrink to the target.
inline byte_size planned_tensor_size(std::string_view full_name, const tensor_entry& t,
                                     std::optional<dtype> target, const special_dtypes& special) {
  for (const auto& [n, d] : special)
    if (n == full_name) return accelerate_size(t.shape, d);
  if (!target || is_integral(t.dtype)) return accelerate_size(t.shape, t.dtype);
  // Python's min(a, b) returns a when equal: the target's size.
  const dtype chosen =
      accelerate_size_eighths(*target) <= accelerate_size_eighths(t.dtype) ? *target : t.dtype;
  return accelerate_size(t.shape, chosen);
}

inline void add_with_prefixes(module_sizes& sizes, std::string_view full, byte_size s) {
  sizes.add("", s);
  for (std::size_t pos = full.find('.'); pos != std::string_view::npos;
       pos = full.find('.', pos + 1))
    sizes.add(full.substr(0, pos), s);
  if (!full.empty()) sizes.add(full, s);
}

}  // namespace detail

/// accelerate's compute_module_sizes: the root "", every module owning counted tensors and every
/// counted tensor. Parameters (deduplicated: a tie counts once, under its first name) come first,
/// then buffers (non-persistent ones included: they occupy memory).
inline module_sizes compute_module_sizes(const module_tree& tree,
                                         std::optional<dtype> target = std::nullopt,
                                         const special_dtypes& special = {},
                                         bool buffers_only = false) {
  // Sums per module by tree index (no string work per prefix), then the entries in the order
  // accelerate first touches them: for each counted tensor, its not-yet-seen ancestors from
  // the root down, then the tensor itself.
  struct counted {
    std::size_t owner;
    std::string name;
    byte_size size;
  };
  std::vector<counted> tensors;
  const auto order = tree.preorder();
  std::vector<byte_size> module_total(tree.size());
  auto count = [&](std::size_t i, const tensor_entry& t) {
    const auto& n = tree.node(i);
    std::string full = join_name(n.path, t.name);
    const byte_size sz = detail::planned_tensor_size(full, t, target, special);
    for (std::size_t a = i; a != module_tree::npos; a = tree.node(a).parent) module_total[a] += sz;
    tensors.push_back({i, std::move(full), sz});
  };
  if (!buffers_only) {
    const auto canon = tree.tie_canonical_names();
    for (std::size_t i : order)
      for (const auto& p : tree.node(i).parameters) {
        if (!canon.empty()) {
          auto it = canon.find(join_name(tree.node(i).path, p.name));
          if (it != canon.end() && it->second != it->first) continue;  // a non-first alias
        }
        count(i, p);
      }
  }
  for (std::size_t i : order)
    for (const auto& b : tree.node(i).buffers) count(i, b);

  module_sizes sizes;
  sizes.reserve(tree.size() + tensors.size());
  std::vector<char> seen(tree.size(), 0);
  std::vector<std::size_t> path;
  for (const auto& t : tensors) {
    path.clear();
    for (std::size_t a = t.owner; a != module_tree::npos && !seen[a]; a = tree.node(a).parent)
      path.push_back(a);
    for (auto it = path.rbegin(); it != path.rend(); ++it) {
      seen[*it] = 1;
      sizes.append_new(tree.node(*it).path, module_total[*it]);
    }
    sizes.append_new(t.name, t.size);
  }
  return sizes;
}

/// accelerate's compute_module_total_buffer_size: bytes of every buffer of the model (0 if none).
inline byte_size compute_module_total_buffer_size(const module_tree& tree,
                                                  std::optional<dtype> target = std::nullopt,
                                                  const special_dtypes& special = {}) {
  return compute_module_sizes(tree, target, special, true).total();
}

/// One entry of a placement work queue: a module (by index into the tree) or a raw tensor.
struct tree_entry {
  std::string name;
  std::size_t module = module_tree::npos;  ///< npos for a tensor
  bool is_module() const noexcept { return module != module_tree::npos; }
};

/// The root's queue as accelerate builds it: direct parameters, direct children, direct buffers.
inline std::vector<tree_entry> root_queue(const module_tree& tree) {
  std::vector<tree_entry> q;
  const auto& r = tree.root();
  for (const auto& p : r.parameters) q.push_back({p.name, module_tree::npos});
  for (std::size_t c : r.children) q.push_back({tree.node(c).name, c});
  for (const auto& b : r.buffers) q.push_back({b.name, module_tree::npos});
  return q;
}

/// The root's direct children only (accelerate's `model.named_children()`).
inline std::vector<tree_entry> root_children(const module_tree& tree) {
  std::vector<tree_entry> q;
  for (std::size_t c : tree.root().children) q.push_back({tree.node(c).name, c});
  return q;
}

inline bool is_no_split(const module_tree& tree, std::size_t module,
                        const std::vector<std::string>& no_split) {
  const auto& cls = tree.node(module).class_name;
  return std::find(no_split.begin(), no_split.end(), cls) != no_split.end();
}

/// The largest "layer" among `entries` and all their descendants, and every layer of that size:
/// a layer is a tensor, a module without children, or a module whose class is in `no_split`.
/// Depth-first pre-order, ties kept in order (accelerate's get_max_layer_size).
inline std::pair<byte_size, std::vector<std::string>> get_max_layer_size(
    const module_tree& tree, const std::vector<tree_entry>& entries, const module_sizes& sizes,
    const std::vector<std::string>& no_split) {
  byte_size best{};
  std::vector<std::string> names;
  // Explicit stack in reverse so pops follow pre-order.
  std::vector<std::pair<std::string, std::size_t>> stack;
  stack.reserve(entries.size() + 16);
  for (auto it = entries.rbegin(); it != entries.rend(); ++it)
    stack.emplace_back(it->name, it->module);
  while (!stack.empty()) {
    auto [name, m] = std::move(stack.back());
    stack.pop_back();
    const bool leaf =
        m == module_tree::npos || tree.node(m).children.empty() || is_no_split(tree, m, no_split);
    if (leaf) {
      const byte_size s = sizes[name];
      if (s > best) {
        best = s;
        names.assign(1, std::move(name));
      } else if (s == best) {
        names.push_back(std::move(name));  // also zero-size layers while best is still 0
      }
      continue;
    }
    const auto& ch = tree.node(m).children;
    for (auto it = ch.rbegin(); it != ch.rend(); ++it)
      stack.emplace_back(join_name(name, tree.node(*it).name), *it);
  }
  return {best, std::move(names)};
}

/// accelerate's find_tied_parameters: one list per group of parameters sharing storage, each
/// list sorted as Python sorts strings. Group order is not significant.
inline std::vector<std::vector<std::string>> find_tied_parameters(const module_tree& tree) {
  std::vector<std::vector<std::string>> out;
  for (const auto& g : tree.tied_parameters()) {
    std::vector<std::string> s(g.begin(), g.end());
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    if (s.size() > 1) out.push_back(std::move(s));
  }
  return out;
}

/// accelerate's calculate_maximum_sizes: (total, largest layer over the root queue).
inline std::pair<byte_size, std::pair<byte_size, std::vector<std::string>>> calculate_maximum_sizes(
    const module_tree& tree, const std::vector<std::string>& no_split = {}) {
  auto sizes = compute_module_sizes(tree);
  return {sizes.total(), get_max_layer_size(tree, root_queue(tree), sizes, no_split)};
}

}  // namespace stowage
