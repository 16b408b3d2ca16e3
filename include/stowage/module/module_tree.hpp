// stowage/module/module_tree.hpp: the runtime view of a model's structure, what placement works
// on. Modules in registration (pre-)order with their dotted names, class names, direct
// parameters and buffers (as descriptors, no bytes), and the groups of tied parameters.
// Typed models produce one (to_module_tree); so does a JSON document (module_tree_json.hpp),
// so models defined elsewhere can be planned too.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

/// What planning reads from a tree, kept flat as the tree is built (module_tree::layout), so a
/// first plan reads a few arrays instead of every module_node and tensor_entry. The arrays are in
/// the form tree_index uses (which borrows them instead of building its own), and the layout
/// also keeps, updated on every add (O(depth) per tensor), aggregates that make a plan's size
/// table a few multiplications: per module the element count of its subtree per size key (dtype
/// and parameter-or-buffer), the same over accelerate's get_balanced_memory leaves, the distinct
/// direct element counts of tensor-owning modules, and the class names interned to ids with the
/// modules of each class.
struct tree_layout {
  using id = std::uint32_t;
  static constexpr id none = ~id{0};
  /// Size keys (dtype, parameter or buffer) the aggregates distinguish; a tree with more turns
  /// them off (planning then sizes every tensor).
  static constexpr std::size_t max_keys = 4;
  /// Distinct direct element counts kept; beyond that the aggregates are off.
  static constexpr std::size_t max_directs = 64;
  /// Distinct class names interned; beyond that class ids are off.
  static constexpr std::size_t max_classes = 255;

  struct tensor {
    std::int64_t numel;
    stowage::dtype dtype;
    bool buffer;
    std::uint8_t key;  ///< index into `keys` (valid while `aggregates`)
  };
  /// Element counts per size key, and which keys occur (tensors of zero elements included).
  struct counts {
    std::array<std::int64_t, max_keys> numel{};
    std::uint8_t mask = 0;
    bool child_has = false;  ///< (subtrees) a child's subtree holds a tensor
    /// Adds another subtree's counts; false on overflow.
    bool add(const counts& o) noexcept {
      bool ok = true;
      for (std::size_t k = 0; k < max_keys; ++k)
        ok = !__builtin_add_overflow(numel[k], o.numel[k], &numel[k]) && ok;
      mask = static_cast<std::uint8_t>(mask | o.mask);
      return ok;
    }
  };

  // Per module, by module index (tree_index's arrays).
  std::vector<id> parent;        ///< none for the root
  std::vector<id> first_tensor;  ///< its first tensor in `tensors`; one more entry: the count
  std::vector<id> first_buffer;  ///< its first buffer in `tensors`
  /// One past its subtree's last module, set when the module is finished (valid if
  /// in_preorder); 0 while it is open: its subtree reaches the newest module (read: the count).
  std::vector<id> subtree_end;
  std::vector<id> identity;  ///< 0, 1, 2, ...: pre-order positions when in_preorder
  /// Per module: its own tensors plus the subtrees of its finished children (valid while
  /// `aggregates`). A module is finished once a module outside its subtree follows (its subtree
  /// is then final, and added to its parent's entry); the modules still open are the newest one
  /// and its ancestors (those whose subtree_end is still 0), completed on reading
  /// (for_each_open).
  std::vector<counts> subtree;
  // Per tensor, module by module in index order, each module's parameters then its buffers (the
  // order of tree_index's tensor items).
  std::vector<tensor> tensors;
  std::vector<id> owner;
  /// Modules were added in pre-order (each one's parent on the path to the previous one).
  bool in_preorder = true;

  // Interned class names, and each module's (one byte per module: a plan finds the modules of
  // a no-split class by scanning these bytes, no node is read).
  std::vector<std::string> classes;
  std::vector<std::uint8_t> class_of;
  bool classes_usable = true;

  // Aggregates.
  std::array<std::pair<stowage::dtype, bool>, max_keys> keys{};
  std::size_t key_count = 0;
  /// Over the finished modules among accelerate's leaves (non-root modules holding tensors, none
  /// below a child): element counts of their subtrees summed, and how many.
  counts leaves;
  std::int64_t leaf_count = 0;
  /// Direct counts of the non-root modules owning tensors but the newest, distinct.
  std::vector<counts> directs;
  bool aggregates = true;

  /// False once a tensor was added out of that order (to a module other than the newest, or a
  /// parameter after a buffer) or its element count overflows: readers then use the nodes.
  bool usable = true;

  // The adders keep the layout whole or drop it (usable = false): it is only a shortcut.
  void add_module(std::size_t parent_index, const std::string& class_name) noexcept {
    if (!usable) return;
    try {
      const auto idx = static_cast<id>(parent.size());
      const id p = parent_index == std::numeric_limits<std::size_t>::max()
                       ? none
                       : static_cast<id>(parent_index);
      if (idx >= none - 1 || (p != none && p >= idx)) {
        clear();
        return;
      }
      const id k = static_cast<id>(tensors.size());
      if (idx != 0 && aggregates) add_direct(idx - 1);
      // Pre-order: the parent is the previous module or one of its ancestors. The modules on
      // the way up to it are finished: their subtrees join their parents'.
      if (in_preorder && idx != 0) {
        id a = idx - 1;
        while (a != none && a != p) {
          subtree_end[a] = idx;
          if (aggregates) finish(a);
          a = parent[a];
        }
        if (a == none) {
          in_preorder = false;
          aggregates = false;
        }
      }
      parent.push_back(p);
      if (first_tensor.empty()) first_tensor.push_back(k);
      first_tensor.push_back(k);  // the count entry, moved along
      first_buffer.push_back(k);
      identity.push_back(idx);
      subtree_end.push_back(0);  // open
      subtree.emplace_back();
      intern(class_name);
    } catch (...) {
      clear();
    }
  }
  void add_tensor(std::size_t node, const tensor_entry& t, bool is_buffer,
                  bool node_had_buffers) noexcept {
    if (!usable) return;
    std::int64_t numel = 1;
    bool overflow = false;
    for (std::int64_t d : t.shape) overflow = overflow || __builtin_mul_overflow(numel, d, &numel);
    if (overflow || node + 1 != parent.size() || (!is_buffer && node_had_buffers) ||
        tensors.size() >= none - 1) {
      clear();
      return;
    }
    std::uint8_t key = 0;
    if (aggregates) key = key_of(t.dtype, is_buffer);
    try {
      tensors.push_back({numel, t.dtype, is_buffer, key});
      owner.push_back(static_cast<id>(node));
    } catch (...) {
      clear();
      return;
    }
    first_tensor.back() = static_cast<id>(tensors.size());
    if (!is_buffer) first_buffer.back() = static_cast<id>(tensors.size());
    if (aggregates) {
      counts& c = subtree[node];
      if (__builtin_add_overflow(c.numel[key], numel, &c.numel[key])) aggregates = false;
      c.mask = static_cast<std::uint8_t>(c.mask | (1u << key));
    }
  }
  void clear() noexcept {
    usable = false;
    parent = {};
    first_tensor = {};
    first_buffer = {};
    subtree_end = {};
    identity = {};
    subtree = {};
    tensors = {};
    owner = {};
    classes = {};
    class_of = {};
    directs = {};
  }

  /// The modules still open (the newest and its ancestors, newest first) with their complete
  /// subtree counts and whether each is one of accelerate's leaves: f(module, counts, leaf).
  /// False when a count overflows.
  template <class F>
  bool for_each_open(F&& f) const {
    if (parent.empty()) return true;
    counts below;  // the open child's complete counts
    bool below_has = false, ok = true;
    for (id a = static_cast<id>(parent.size() - 1); a != none; a = parent[a]) {
      counts c = subtree[a];
      ok = c.add(below) && ok;
      c.child_has = subtree[a].child_has || below_has;
      f(a, c, a != 0 && c.mask != 0 && !c.child_has);
      below = c;
      below_has = c.mask != 0;
    }
    return ok;
  }
  /// Direct counts of the non-root tensor-owning modules, the newest one's included: f(counts).
  template <class F>
  void for_each_direct(F&& f) const {
    for (const auto& d : directs) f(d);
    const std::size_t newest = parent.size() - 1;
    if (newest != 0 && subtree[newest].mask != 0) f(subtree[newest]);  // no children yet
  }
  /// The interned id of a class name, or none.
  id class_id(std::string_view name) const noexcept {
    for (std::size_t i = 0; i < classes.size(); ++i)
      if (classes[i] == name) return static_cast<id>(i);
    return none;
  }

 private:
  std::uint8_t key_of(stowage::dtype d, bool buffer) noexcept {
    for (std::size_t i = 0; i < key_count; ++i)
      if (keys[i].first == d && keys[i].second == buffer) return static_cast<std::uint8_t>(i);
    if (key_count == max_keys) {
      aggregates = false;
      return 0;
    }
    keys[key_count] = {d, buffer};
    return static_cast<std::uint8_t>(key_count++);
  }
  // Module a's subtree is final: it joins its parent's, and the leaf sums if it is a leaf.
  void finish(id a) noexcept {
    const counts& c = subtree[a];
    bool ok = true;
    if (a != 0 && c.mask != 0 && !c.child_has) {
      ++leaf_count;
      ok = leaves.add(c);
    }
    if (parent[a] != none) {
      counts& up = subtree[parent[a]];
      ok = up.add(c) && ok;
      up.child_has = up.child_has || c.mask != 0;
    }
    if (!ok) aggregates = false;
  }
  // Module m is no longer the newest: its own tensors are final (it has no children yet, so its
  // entry holds exactly them) and join the distinct direct counts.
  void add_direct(id m) {
    const counts& c = subtree[m];
    if (m == 0 || c.mask == 0) return;
    if (last_direct < directs.size() && same(directs[last_direct], c)) return;
    for (std::size_t i = 0; i < directs.size(); ++i)
      if (same(directs[i], c)) {
        last_direct = i;
        return;
      }
    if (directs.size() == max_directs) {
      aggregates = false;
      return;
    }
    last_direct = directs.size();
    directs.push_back(c);
  }
  static bool same(const counts& a, const counts& b) noexcept {
    return a.mask == b.mask && a.numel == b.numel;
  }
  void intern(const std::string& name) {
    if (!classes_usable) return;
    // Most modules repeat a recent class: try the last class of this name length first.
    const std::size_t slot = name.size() % last_by_size.size();
    id c = last_by_size[slot];
    if (c == none || !same_name(classes[c], name)) {
      c = class_id(name);
      if (c == none) {
        if (classes.size() == max_classes) {
          classes_usable = false;
          return;
        }
        c = static_cast<id>(classes.size());
        classes.push_back(name);
      }
      last_by_size[slot] = c;
    }
    class_of.push_back(static_cast<std::uint8_t>(c));
  }
  // Equal strings, compared inline a word at a time (class names are short; a memcmp call per
  // module was a measurable part of building a tree).
  static bool same_name(const std::string& a, const std::string& b) noexcept {
    const std::size_t n = a.size();
    if (n != b.size()) return false;
    const char *p = a.data(), *q = b.data();
    auto word = [](const char* x) {
      std::uint64_t w;
      std::memcpy(&w, x, sizeof w);
      return w;
    };
    if (n >= 8) {
      for (std::size_t i = 0; i + 8 < n; i += 8)
        if (word(p + i) != word(q + i)) return false;
      return word(p + n - 8) == word(q + n - 8);
    }
    for (std::size_t i = 0; i < n; ++i)
      if (p[i] != q[i]) return false;
    return true;
  }
  std::size_t last_direct = 0;
  std::array<id, 32> last_by_size = filled_none();
  static constexpr std::array<id, 32> filled_none() {
    std::array<id, 32> a{};
    for (auto& x : a) x = none;
    return a;
  }
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
    layout_.add_module(npos, nodes_.front().class_name);
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
    layout_.add_module(parent, nodes_.back().class_name);
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

  /// The flat layout kept as the tree was built (parents, tensor ranges, element counts and
  /// dtypes), or nullptr when tensors were added out of module order (then read the nodes).
  const detail::tree_layout* layout() const noexcept { return layout_.usable ? &layout_ : nullptr; }

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
    const bool had_buffers = !n.buffers.empty();
    auto& list = buffer ? n.buffers : n.parameters;
    list.push_back(std::move(t));
    layout_.add_tensor(node, list.back(), buffer, had_buffers);
  }

  std::vector<module_node> nodes_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<std::vector<std::string>> tied_;
  detail::tree_layout layout_;
  mutable detail::derived_cache cache_;
};

}  // namespace stowage
