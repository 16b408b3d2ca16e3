// stowage/module/module_tree.hpp: the runtime view of a model's structure, what placement works
// on. Modules in registration (pre-)order with their dotted names, class names, direct
// parameters and buffers (as descriptors, no bytes), and the groups of tied parameters.
// Typed models produce one (to_module_tree); so does a JSON document (module_tree_json.hpp),
// so models defined elsewhere can be planned too.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace stowage {

/// A parameter or buffer as a module holds it: its local name ("weight"), shape and dtype.
struct tensor_entry {
  std::string name;
  stowage::shape shape;
  stowage::dtype dtype = dtype::float32;
  bool persistent = true;  ///< buffers only: part of the state dict (checkpoint) or not
  friend bool operator==(const tensor_entry&, const tensor_entry&) = default;
};

/// One module of the tree.
struct module_node {
  std::string name;        ///< local name ("q_proj"); "" for the root
  std::string path;        ///< dotted name from the root ("model.layers.0.self_attn.q_proj")
  std::string class_name;  ///< "LlamaDecoderLayer", used for no-split matching
  std::vector<tensor_entry> parameters;
  std::vector<tensor_entry> buffers;
  std::vector<std::size_t> children;  ///< indices into module_tree::nodes(), registration order
  std::size_t parent = npos;
  static constexpr std::size_t npos = std::numeric_limits<std::size_t>::max();
};

/// Joins a module path and a local name the way torch does ("" + "a" = "a", "a" + "b" = "a.b").
inline std::string join_name(std::string_view prefix, std::string_view local) {
  if (prefix.empty()) return std::string(local);
  std::string s;
  s.reserve(prefix.size() + 1 + local.size());
  s.append(prefix).append(1, '.').append(local);
  return s;
}

/// True when `name` is `prefix` itself or lies below it in the dotted hierarchy
/// ("a.1" covers "a.1.w" but not "a.10.w"); "" covers everything.
inline bool covers(std::string_view prefix, std::string_view name) noexcept {
  if (prefix.empty()) return true;
  if (!name.starts_with(prefix)) return false;
  return name.size() == prefix.size() || name[prefix.size()] == '.';
}

namespace detail {

/// Data derived from a module_tree (a planner's index and size tables), kept with the tree so
/// planning it again does not redo full passes over it. One object per type, built on first use;
/// dropped whenever the tree changes. Copies and moves of a tree start empty (what was derived
/// refers to the tree it came from). Thread-safe for concurrent readers of a const tree.
class derived_cache {
 public:
  derived_cache() = default;
  derived_cache(const derived_cache&) noexcept {}
  derived_cache(derived_cache&& other) noexcept { other.clear(); }
  derived_cache& operator=(const derived_cache&) noexcept {
    clear();
    return *this;
  }
  derived_cache& operator=(derived_cache&& other) noexcept {
    clear();
    other.clear();
    return *this;
  }
  ~derived_cache() = default;

  /// The T kept here, or make() (a std::shared_ptr<T>) kept from now on.
  template <class T, class Make>
  std::shared_ptr<T> get(Make&& make) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [key, value] : entries_)
      if (key == &key_of<T>) return std::static_pointer_cast<T>(value);
    std::shared_ptr<T> v = make();
    entries_.emplace_back(&key_of<T>, v);
    filled_.store(true, std::memory_order_relaxed);
    return v;
  }
  /// Drops everything (the tree changed). Contexts still holding an entry keep it alive.
  void clear() noexcept {
    if (!filled_.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    filled_.store(false, std::memory_order_relaxed);
  }

 private:
  template <class T>
  static constexpr char key_of = 0;
  std::mutex mutex_;
  std::atomic<bool> filled_{false};
  std::vector<std::pair<const void*, std::shared_ptr<void>>> entries_;
};

}  // namespace detail

/// The runtime module tree. Node 0 is the root; a child is added after its parent, and every
/// traversal follows registration order (preorder()), whatever order nodes were added in.
class module_tree {
 public:
  static constexpr std::size_t npos = module_node::npos;

  explicit module_tree(std::string root_class = "Module") {
    module_node root;
    root.class_name = std::move(root_class);
    nodes_.push_back(std::move(root));
    index_.emplace("", 0);
  }

  // ---- building ---------------------------------------------------------------------------

  /// Adds a child module; returns its index. Throws model_error for a duplicate or dotted name.
  std::size_t add_child(std::size_t parent, std::string name, std::string class_name) {
    check_node(parent, "add_child");
    cache_.clear();
    check_local_name(name, nodes_[parent].path);
    module_node n;
    n.path = join_name(nodes_[parent].path, name);
    n.name = std::move(name);
    n.class_name = std::move(class_name);
    n.parent = parent;
    if (!index_.emplace(n.path, nodes_.size()).second)
      throw model_error("module tree: duplicate module name `" + n.path + "`");
    const std::size_t idx = nodes_.size();
    nodes_[parent].children.push_back(idx);
    nodes_.push_back(std::move(n));
    return idx;
  }

  void add_parameter(std::size_t node, tensor_entry t) { add_tensor(node, std::move(t), false); }
  void add_buffer(std::size_t node, tensor_entry t) { add_tensor(node, std::move(t), true); }

  /// Declares that the named parameters share one storage (full dotted names, at least two).
  void tie(std::vector<std::string> group) {
    if (group.size() < 2) throw model_error("module tree: a tie group needs at least two names");
    for (const auto& p : group) {
      auto t = find_tensor(p);
      if (!t || t->is_buffer)
        throw model_error("module tree: tied name `" + p + "` is not a parameter of the model");
    }
    cache_.clear();
    tied_.push_back(std::move(group));
  }

  // ---- reading ----------------------------------------------------------------------------

  const std::vector<module_node>& nodes() const noexcept { return nodes_; }
  const module_node& node(std::size_t i) const { return nodes_.at(i); }
  const module_node& root() const noexcept { return nodes_.front(); }
  std::size_t size() const noexcept { return nodes_.size(); }
  const std::vector<std::vector<std::string>>& tied_parameters() const noexcept { return tied_; }

  /// Index of the module with this dotted name, if any.
  std::optional<std::size_t> find_module(std::string_view path) const {
    auto it = index_.find(std::string(path));
    if (it == index_.end()) return std::nullopt;
    return it->second;
  }

  struct tensor_ref {
    std::size_t module;
    std::size_t index;  ///< into parameters or buffers
    bool is_buffer;
  };
  /// Finds a parameter or buffer by full dotted name.
  std::optional<tensor_ref> find_tensor(std::string_view full) const {
    const auto dot = full.rfind('.');
    const std::string_view owner = dot == std::string_view::npos ? "" : full.substr(0, dot);
    const std::string_view local = dot == std::string_view::npos ? full : full.substr(dot + 1);
    auto m = find_module(owner);
    if (!m) return std::nullopt;
    const auto& n = nodes_[*m];
    for (std::size_t i = 0; i < n.parameters.size(); ++i)
      if (n.parameters[i].name == local) return tensor_ref{*m, i, false};
    for (std::size_t i = 0; i < n.buffers.size(); ++i)
      if (n.buffers[i].name == local) return tensor_ref{*m, i, true};
    return std::nullopt;
  }
  const tensor_entry& tensor(const tensor_ref& r) const {
    const auto& n = nodes_.at(r.module);
    return r.is_buffer ? n.buffers.at(r.index) : n.parameters.at(r.index);
  }

  /// Module indices in pre-order (root first, then each child subtree in registration order),
  /// whatever order the nodes were added in.
  std::vector<std::size_t> preorder() const {
    std::vector<std::size_t> out;
    out.reserve(nodes_.size());
    std::vector<std::size_t> stack{0};
    while (!stack.empty()) {
      const std::size_t i = stack.back();
      stack.pop_back();
      out.push_back(i);
      const auto& ch = nodes_[i].children;
      for (auto it = ch.rbegin(); it != ch.rend(); ++it) stack.push_back(*it);
    }
    return out;
  }

  /// Visits every module in pre-order: f(index, node).
  template <class F>
  void for_each_module(F&& f) const {
    for (std::size_t i : preorder()) f(i, nodes_[i]);
  }

  /// torch's named_parameters(remove_duplicate=False) order: pre-order over modules, each
  /// module's direct parameters in registration order. f(full_name, entry).
  template <class F>
  void for_each_parameter(F&& f) const {
    for (std::size_t i : preorder())
      for (const auto& p : nodes_[i].parameters) f(join_name(nodes_[i].path, p.name), p);
  }
  /// Same over buffers.
  template <class F>
  void for_each_buffer(F&& f) const {
    for (std::size_t i : preorder())
      for (const auto& b : nodes_[i].buffers) f(join_name(nodes_[i].path, b.name), b);
  }

  /// Every name in a tie group mapped to the group's canonical name: the first of the group in
  /// named_parameters order (the one torch keeps when it removes duplicates).
  std::unordered_map<std::string, std::string> tie_canonical_names() const {
    std::unordered_map<std::string, std::string> canon;
    if (tied_.empty()) return canon;
    std::unordered_map<std::string, std::size_t> order;
    std::size_t k = 0;
    for_each_parameter([&](std::string name, const tensor_entry&) { order.emplace(name, k++); });
    for (const auto& g : tied_) {
      const std::string* first = &g.front();
      for (const auto& p : g)
        if (order.at(p) < order.at(*first)) first = &p;
      for (const auto& p : g) canon[p] = *first;
    }
    return canon;
  }

  /// Data of type T derived from this tree (a planner's index and size tables), built by make()
  /// (returning std::shared_ptr<T>) on first use and kept until the tree changes (add_child,
  /// add_parameter, add_buffer, tie); copies and moves of the tree start without it.
  template <class T, class Make>
  std::shared_ptr<T> derived(Make&& make) const {
    return cache_.template get<T>(std::forward<Make>(make));
  }

 private:
  void check_node(std::size_t i, const char* what) const {
    if (i >= nodes_.size())
      throw model_error(std::string("module tree: ") + what + ": no module with index " +
                        std::to_string(i));
  }
  static void check_local_name(const std::string& name, const std::string& parent) {
    if (name.empty() || name.find('.') != std::string::npos)
      throw model_error("module tree: invalid name `" + name + "` under `" + parent +
                        "` (names are non-empty and contain no dot)");
  }
  void add_tensor(std::size_t node, tensor_entry t, bool buffer) {
    check_node(node, buffer ? "add_buffer" : "add_parameter");
    auto& n = nodes_[node];
    check_local_name(t.name, n.path);
    for (const auto& p : n.parameters)
      if (p.name == t.name)
        throw model_error("module tree: duplicate tensor `" + join_name(n.path, t.name) + "`");
    for (const auto& b : n.buffers)
      if (b.name == t.name)
        throw model_error("module tree: duplicate tensor `" + join_name(n.path, t.name) + "`");
    for (std::size_t c : n.children)
      if (nodes_[c].name == t.name)
        throw model_error("module tree: `" + join_name(n.path, t.name) +
                          "` names both a module and a tensor");
    if (!buffer) t.persistent = true;
    cache_.clear();
    (buffer ? n.buffers : n.parameters).push_back(std::move(t));
  }

  std::vector<module_node> nodes_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<std::vector<std::string>> tied_;
  mutable detail::derived_cache cache_;
};

}  // namespace stowage
