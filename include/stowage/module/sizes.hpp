// stowage/module/sizes.hpp: how many bytes each module and tensor of a module_tree needs, counted
// exactly as accelerate's compute_module_sizes counts them (bool = 1/8 byte, a target dtype only
// shrinks floating tensors, tied tensors once under their first name) or as Transformers v5
// counts them (size_rule), plus the helpers the planner builds on: tree_index (every module and
// tensor an integer item, subtree tests by pre-order ranges), item_sizes computed in one pass,
// the largest unsplittable layer, tie groups, buffer totals.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/module/module_tree.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
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

/// Per-tensor exact sizes by full dotted name: the tensor counts as exactly these bytes whatever
/// its dtype, target or special dtype (a quantized weight with its state tensors,
/// placement/quantized_sizes.hpp). Names that match no tensor are ignored.
using tensor_size_overrides = std::vector<std::pair<std::string, byte_size>>;

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

/// How sizes are counted. accelerate: bool = 1/8 byte and a target dtype shrinks every floating
/// tensor (parameters and buffers). Transformers v5 (integrations/accelerate.py): the element
/// size torch reports (bool = 1 byte) of the tensors as the model holds them, so a target dtype
/// applies to floating parameters only (buffers such as rotary inv_freq stay float32). Both
/// count a tied tensor once, under its first name.
enum class size_rule : std::uint8_t { accelerate, transformers };

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

/// One tensor under a size rule, `special` already resolved to this tensor (or none).
inline byte_size rule_tensor_size(const tensor_entry& t, bool is_buffer,
                                  std::optional<dtype> target, std::optional<dtype> special,
                                  size_rule rule) {
  dtype d = t.dtype;
  if (special) {
    d = *special;
  } else if (target && !is_integral(t.dtype) && !(rule == size_rule::transformers && is_buffer)) {
    d = accelerate_size_eighths(*target) <= accelerate_size_eighths(t.dtype) ? *target : t.dtype;
  }
  // Element count with an overflow check by multiplication (shape::numel divides per
  // dimension, a measurable share of planning a 70B tree from scratch).
  std::int64_t numel = 1;
  for (std::int64_t dim : t.shape)
    if (__builtin_mul_overflow(numel, dim, &numel)) return byte_size(t.shape.numel());  // throws
  if (rule == size_rule::transformers && d == dtype::bool_)
    return byte_size(numel);  // torch's element_size() of bool is 1
  const std::int64_t e = accelerate_size_eighths(d);
  return byte_size::from_eighths(numel * e, e % 8 != 0);
}

}  // namespace detail

/// An integer view of a module_tree for planning. Every module and every tensor is an *item*:
/// items [0, modules()) are modules by tree index, items [modules(), items()) are tensors,
/// numbered module by module (tree index order), each module's parameters then its buffers.
/// Pre-order positions and subtree ends turn "is below" into two integer comparisons, so the
/// planner never builds or hashes a name except for the keys it outputs.
class tree_index {
 public:
  using id = std::uint32_t;
  static constexpr id none = ~id{0};

  explicit tree_index(const module_tree& t) : tree_(&t), layout_(t.layout()), n_(t.size()) {
    // A tree built in pre-order (as to_module_tree and the JSON reader build one) keeps every
    // array this index needs in its layout: borrowed, nothing is built. Otherwise parents and the
    // tensor numbering come from the layout or one pass over the nodes, then pre-order positions
    // and subtree ends from a stack of the current path (or a traversal).
    if (layout_ && layout_->in_preorder && layout_->parent.size() == n_) {
      if (n_ + layout_->tensors.size() >= none)
        throw model_error("module tree: too many modules and tensors to plan (" +
                          std::to_string(n_ + layout_->tensors.size()) + ")");
      borrowed_ = true;
      bind();
      return;
    }
    const auto& nodes = t.nodes();
    std::size_t next = 0;
    parent_.resize(n_);
    tbeg_.resize(n_ + 1);
    tmid_.resize(n_);
    if (layout_) {
      for (std::size_t i = 0; i < n_; ++i) {
        parent_[i] = layout_->parent[i];
        tbeg_[i] = layout_->first_tensor[i];
        tmid_[i] = layout_->first_buffer[i];
      }
      next = layout_->tensors.size();
    } else {
      for (std::size_t i = 0; i < n_; ++i) {
        const auto& nd = nodes[i];
        parent_[i] = nd.parent == module_tree::npos ? none : static_cast<id>(nd.parent);
        tbeg_[i] = static_cast<id>(std::min<std::size_t>(next, none));
        tmid_[i] = static_cast<id>(std::min<std::size_t>(next + nd.parameters.size(), none));
        next += nd.parameters.size() + nd.buffers.size();
      }
    }
    tbeg_[n_] = static_cast<id>(std::min<std::size_t>(next, none));
    if (n_ + next >= none)
      throw model_error("module tree: too many modules and tensors to plan (" +
                        std::to_string(n_ + next) + ")");
    end_.resize(n_);
    bool in_preorder = true;
    {
      std::vector<id> path;
      path.reserve(16);
      for (std::size_t i = 0; i < n_ && in_preorder; ++i) {
        while (!path.empty() && path.back() != parent_[i]) {
          end_[path.back()] = static_cast<id>(i);
          path.pop_back();
        }
        if (i != 0 && path.empty()) in_preorder = false;
        path.push_back(static_cast<id>(i));
      }
      if (in_preorder)
        for (id i : path) end_[i] = static_cast<id>(n_);
    }
    if (!in_preorder) {
      order_.clear();
      for (std::size_t i : t.preorder()) order_.push_back(static_cast<id>(i));
      pre_.resize(n_);
      for (std::size_t k = 0; k < n_; ++k) pre_[order_[k]] = static_cast<id>(k);
      std::vector<id> span(n_, 1);
      for (std::size_t k = n_; k-- > 1;) span[parent_[order_[k]]] += span[order_[k]];
      for (std::size_t i = 0; i < n_; ++i) end_[i] = pre_[i] + span[i];
    } else {
      order_.resize(n_);
      for (std::size_t i = 0; i < n_; ++i) order_[i] = static_cast<id>(i);
    }
    owner_.resize(next);
    for (std::size_t i = 0; i < n_; ++i)
      std::fill(owner_.begin() + tbeg_[i], owner_.begin() + tbeg_[i + 1], static_cast<id>(i));
    identity_ = in_preorder;
    bind();
  }
  // The arrays may be the index's own or the tree layout's: copies point at their own.
  tree_index(const tree_index& o)
      : tree_(o.tree_),
        layout_(o.layout_),
        n_(o.n_),
        borrowed_(o.borrowed_),
        identity_(o.identity_),
        order_(o.order_),
        pre_(o.pre_),
        end_(o.end_),
        parent_(o.parent_),
        tbeg_(o.tbeg_),
        tmid_(o.tmid_),
        owner_(o.owner_) {
    bind();
  }
  tree_index& operator=(const tree_index& o) {
    if (this != &o) {
      tree_index c(o);
      *this = std::move(c);
    }
    return *this;
  }
  tree_index(tree_index&& o) noexcept
      : tree_(o.tree_),
        layout_(o.layout_),
        n_(o.n_),
        borrowed_(o.borrowed_),
        identity_(o.identity_),
        order_(std::move(o.order_)),
        pre_(std::move(o.pre_)),
        end_(std::move(o.end_)),
        parent_(std::move(o.parent_)),
        tbeg_(std::move(o.tbeg_)),
        tmid_(std::move(o.tmid_)),
        owner_(std::move(o.owner_)) {
    bind();
  }
  tree_index& operator=(tree_index&& o) noexcept {
    tree_ = o.tree_;
    layout_ = o.layout_;
    n_ = o.n_;
    borrowed_ = o.borrowed_;
    identity_ = o.identity_;
    order_ = std::move(o.order_);
    pre_ = std::move(o.pre_);
    end_ = std::move(o.end_);
    parent_ = std::move(o.parent_);
    tbeg_ = std::move(o.tbeg_);
    tmid_ = std::move(o.tmid_);
    owner_ = std::move(o.owner_);
    bind();
    return *this;
  }
  ~tree_index() = default;

  /// The nodes are in pre-order: position(m) == m and a subtree is the range [m, subtree_end(m)).
  bool preorder_is_identity() const noexcept { return identity_; }
  /// The tree's flat layout (module_tree::layout), or nullptr.
  const detail::tree_layout* layout() const noexcept { return layout_; }
  /// The index borrows the layout's arrays (a tree built in pre-order): its aggregates and class
  /// ids describe the same items.
  bool borrows_layout() const noexcept { return borrowed_; }
  const module_tree& tree() const noexcept { return *tree_; }
  std::size_t modules() const noexcept { return n_; }
  std::size_t tensors() const noexcept { return owner_v_->size(); }
  std::size_t items() const noexcept { return n_ + owner_v_->size(); }
  /// Modules in pre-order (tree indices).
  const std::vector<id>& preorder() const noexcept { return *order_v_; }

  bool is_module(id x) const noexcept { return x < n_; }
  /// The module an item belongs to: itself for a module, the owner for a tensor.
  id module_of(id x) const noexcept { return x < n_ ? x : owner_d_[x - n_]; }
  /// Items of module m's direct parameters: [first_parameter(m), first_buffer(m)).
  id first_parameter(id m) const noexcept { return static_cast<id>(n_ + tbeg_d_[m]); }
  id first_buffer(id m) const noexcept { return static_cast<id>(n_ + tmid_d_[m]); }
  /// One past m's direct buffers.
  id tensors_end(id m) const noexcept { return static_cast<id>(n_ + tbeg_d_[m + 1]); }
  /// Module m has child modules.
  bool has_children(id m) const noexcept { return subtree_end(m) != position(m) + 1; }
  bool is_buffer(id x) const noexcept { return x >= n_ && x >= first_buffer(owner_d_[x - n_]); }
  const tensor_entry& tensor(id x) const {
    const id m = owner_d_[x - n_];
    const auto& nd = tree_->nodes()[m];
    const std::size_t k = x - first_parameter(m);
    return k < nd.parameters.size() ? nd.parameters[k] : nd.buffers[k - nd.parameters.size()];
  }

  /// Per module: its parent (none for the root).
  const std::vector<id>& parents() const noexcept { return *parent_v_; }
  /// Per tensor (item - modules()): the module owning it.
  const std::vector<id>& tensor_owners() const noexcept { return *owner_v_; }
  /// The parent module, or none for the root.
  id parent(id m) const noexcept { return parent_d_[m]; }
  /// Pre-order position of module m.
  id position(id m) const noexcept { return identity_ ? m : pre_[m]; }
  /// One past the pre-order position of the last module of m's subtree.
  id subtree_end(id m) const noexcept {
    // A borrowed layout marks the subtrees still open (reaching the last module) with 0.
    const id e = end_d_[m];
    return e != 0 ? e : static_cast<id>(n_);
  }
  /// Module b lies in module a's subtree (a included).
  bool in_subtree(id a, id b) const noexcept {
    const id pb = position(b);
    return position(a) <= pb && pb < subtree_end(a);
  }
  /// `x` is `a` or lies below it (a's dotted name covers x's).
  bool covers(id a, id x) const noexcept {
    if (a == x) return true;
    return a < n_ && in_subtree(a, module_of(x));
  }
  /// `x` lies strictly below `a`.
  bool strictly_covers(id a, id x) const noexcept { return a != x && covers(a, x); }

  /// The dotted name of an item.
  std::string name(id x) const {
    if (x < n_) return tree_->nodes()[x].path;
    return join_name(tree_->nodes()[owner_d_[x - n_]].path, tensor(x).name);
  }
  /// The item of a module or tensor name.
  std::optional<id> find(std::string_view name) const {
    if (auto m = tree_->find_module(name)) return static_cast<id>(*m);
    if (auto t = tree_->find_tensor(name))
      return static_cast<id>((t->is_buffer ? first_buffer(static_cast<id>(t->module))
                                           : first_parameter(static_cast<id>(t->module))) +
                             t->index);
    return std::nullopt;
  }

 private:
  void bind() noexcept {
    if (borrowed_) {
      order_v_ = &layout_->identity;
      end_v_ = &layout_->subtree_end;
      parent_v_ = &layout_->parent;
      tbeg_v_ = &layout_->first_tensor;
      tmid_v_ = &layout_->first_buffer;
      owner_v_ = &layout_->owner;
    } else {
      order_v_ = &order_;
      end_v_ = &end_;
      parent_v_ = &parent_;
      tbeg_v_ = &tbeg_;
      tmid_v_ = &tmid_;
      owner_v_ = &owner_;
    }
    end_d_ = end_v_->data();
    parent_d_ = parent_v_->data();
    tbeg_d_ = tbeg_v_->data();
    tmid_d_ = tmid_v_->data();
    owner_d_ = owner_v_->data();
  }

  const module_tree* tree_;
  const detail::tree_layout* layout_;
  std::size_t n_;
  bool borrowed_ = false;  // the arrays are the layout's
  bool identity_ = true;   // nodes are in pre-order: positions are the indices
  std::vector<id> order_, pre_, end_, parent_, tbeg_, tmid_, owner_;
  const std::vector<id>*order_v_ = nullptr, *end_v_ = nullptr, *parent_v_ = nullptr,
        *tbeg_v_ = nullptr, *tmid_v_ = nullptr, *owner_v_ = nullptr;
  const id *end_d_ = nullptr, *parent_d_ = nullptr, *tbeg_d_ = nullptr, *tmid_d_ = nullptr,
           *owner_d_ = nullptr;
};

/// Sizes of every item of a tree_index, computed in one pass (no names involved).
struct item_sizes {
  std::vector<byte_size> size;     ///< modules: their subtree; tensors: their own (0: tied alias)
  std::vector<char> counted;       ///< has an entry in accelerate's name -> size map
  std::vector<byte_size> buffers;  ///< per module: bytes of the buffers in its subtree
  bool any_buffers = false;
  /// accelerate's get_balanced_memory leaves: modules with an entry none of whose children has
  /// one (the lowest modules owning tensors), their sizes summed and counted.
  byte_size leaf_sum;
  std::int64_t leaf_count = 0;
  /// Transformers v5's biggest leaf: the largest sum of counted tensors a non-root module owns
  /// directly.
  byte_size biggest_direct;
};

namespace detail {

/// Per tensor: 1 for a tied parameter that is not the first of its group in named_parameters
/// order (torch deduplicates it away; it has no size of its own).
inline std::vector<char> tied_aliases(const tree_index& ix) {
  std::vector<char> alias(ix.tensors(), 0);
  for (const auto& g : ix.tree().tied_parameters()) {
    tree_index::id first = tree_index::none;
    std::vector<tree_index::id> members;
    for (const auto& p : g)
      if (auto x = ix.find(p); x && !ix.is_module(*x)) members.push_back(*x);
    // named_parameters order: pre-order position of the owner, then position in the owner.
    auto key = [&](tree_index::id x) { return std::pair{ix.position(ix.module_of(x)), x}; };
    for (auto x : members)
      if (first == tree_index::none || key(x) < key(first)) first = x;
    for (auto x : members)
      if (x != first) alias[x - ix.modules()] = 1;
  }
  return alias;
}

}  // namespace detail

namespace detail {

/// Module totals bottom-up over the pre-order (each module's own tensors already in r), with
/// accelerate's get_balanced_memory leaves.
inline void sum_item_sizes_up(const tree_index& ix, item_sizes& r) {
  using id = tree_index::id;
  const std::size_t n = ix.modules();
  // Raw pointers in locals: the char stores would otherwise make every vector reload.
  const id* order = ix.preorder().data();
  const id* parent = ix.parents().data();
  byte_size* size = r.size.data();
  byte_size* buffers = r.buffers.data();
  char* counted = r.counted.data();
  std::vector<char> child_counted_v(n, 0);
  char* child_counted = child_counted_v.data();
  byte_size leaf_sum = r.leaf_sum;
  std::int64_t leaf_count = r.leaf_count;
  for (std::size_t k = n; k-- > 1;) {
    const id i = order[k];
    // accelerate's leaves after removing tensor names: modules with an entry and no child
    // module with one.
    if (counted[i] && !child_counted[i]) {
      leaf_sum += size[i];
      ++leaf_count;
    }
    const id p = parent[i];
    size[p] += size[i];
    buffers[p] += buffers[i];
    if (counted[i]) {
      counted[p] = 1;
      child_counted[p] = 1;
    }
  }
  r.leaf_sum = leaf_sum;
  r.leaf_count = leaf_count;
}

}  // namespace detail

/// Sizes of every item in one pass: each tensor's size under `rule` (tied aliases 0, buffers
/// only with `buffers_only`; an `exact` entry wins over everything), then module totals
/// bottom-up over the pre-order.
inline item_sizes compute_item_sizes(const tree_index& ix,
                                     std::optional<dtype> target = std::nullopt,
                                     const special_dtypes& special = {}, bool buffers_only = false,
                                     size_rule rule = size_rule::accelerate,
                                     const tensor_size_overrides& exact = {}) {
  using id = tree_index::id;
  const std::size_t n = ix.modules();
  item_sizes r;
  r.size.assign(ix.items(), byte_size{});
  r.counted.assign(ix.items(), 0);
  r.buffers.assign(n, byte_size{});
  std::vector<char> alias;
  if (!buffers_only && !ix.tree().tied_parameters().empty()) alias = detail::tied_aliases(ix);
  // Special dtypes resolved to items once (the first entry for a name wins, as in accelerate).
  std::vector<std::pair<id, dtype>> sp;
  for (const auto& [name, d] : special)
    if (auto x = ix.find(name); x && !ix.is_module(*x)) {
      bool dup = false;
      for (const auto& e : sp) dup = dup || e.first == *x;
      if (!dup) sp.emplace_back(*x, d);
    }
  // Exact sizes resolved to tensors once (the first entry for a name wins).
  std::vector<std::optional<byte_size>> fixed;
  if (!exact.empty()) {
    fixed.resize(ix.tensors());
    for (const auto& [name, b] : exact)
      if (auto x = ix.find(name); x && !ix.is_module(*x) && !fixed[*x - n]) fixed[*x - n] = b;
  }
  const auto& nodes = ix.tree().nodes();
  // With the tree's flat layout, element counts and dtypes come from one array and no node is
  // read (a node is read only for a special dtype).
  const detail::tree_layout* lay = ix.layout();
  if (lay && alias.empty() && sp.empty() && fixed.empty() && !buffers_only) {
    // The common case (no ties, special dtypes or exact sizes): every tensor counts, sized from
    // the layout alone; each module's own total summed in registers.
    const auto& ts = lay->tensors;
    byte_size* size = r.size.data();
    char* counted = r.counted.data();
    std::size_t cached_key = ~std::size_t{0};
    std::int64_t slot = 0;
    bool slot_float = false;
    // Tensor by tensor (no branch per module): each size, added to its owner's own total. Raw
    // pointers held in locals: the char stores would otherwise make every vector reload.
    const id* owner = ix.tensor_owners().data();
    byte_size* buffers = r.buffers.data();
    bool any_buffers = false;
    const std::size_t nt = ts.size();
    for (std::size_t k = 0; k < nt; ++k) {
      const auto& e = ts[k];
      const std::size_t key = (e.buffer ? 256u : 0u) + static_cast<std::size_t>(e.dtype);
      if (key != cached_key) {
        const tensor_entry unit{"", shape{1}, e.dtype, true};
        slot = detail::rule_tensor_size(unit, e.buffer, target, std::nullopt, rule).eighths();
        slot_float = slot % 8 != 0;
        cached_key = key;
      }
      const byte_size b = byte_size::from_eighths(e.numel * slot, slot_float);
      const id m = owner[k];
      size[n + k] = b;
      counted[n + k] = 1;
      size[m] += b;
      if (e.buffer) {
        buffers[m] += b;
        any_buffers = true;
      }
    }
    r.any_buffers = any_buffers;
    const auto* first = lay->first_tensor.data();  // n + 1 entries
    byte_size biggest{};
    for (std::size_t i = 0; i < n; ++i) {
      const bool owns = first[i] != first[i + 1];
      counted[i] = owns;
      if (i != 0 && owns && size[i] > biggest) biggest = size[i];
    }
    r.biggest_direct = biggest;
    detail::sum_item_sizes_up(ix, r);
    return r;
  }
  std::array<std::array<std::int64_t, 256>, 2> per_element;  // [is buffer][dtype]
  for (auto& a : per_element) a.fill(-1);
  // One pass over the modules: each one's own tensors (its direct size is Transformers' leaf
  // size); then module totals bottom-up over the pre-order.
  for (std::size_t i = 0; i < n; ++i) {
    const id m = static_cast<id>(i);
    const id fp = ix.first_parameter(m);
    const id fb = ix.first_buffer(m);
    const id te = ix.tensors_end(m);
    const module_node* nd = lay ? nullptr : &nodes[i];
    byte_size direct{};
    bool owns = false;
    for (id x = buffers_only ? fb : fp; x < te; ++x) {
      const bool buf = x >= fb;
      if (!buf && !alias.empty() && alias[x - n]) continue;
      byte_size b;
      bool special_hit = false;
      if (!fixed.empty() && fixed[x - n]) {
        b = *fixed[x - n];
        special_hit = true;
      }
      for (auto e = sp.begin(); !special_hit && e != sp.end(); ++e)
        if (e->first == x) {
          b = detail::rule_tensor_size(ix.tensor(x), buf, target, e->second, rule);
          special_hit = true;
        }
      if (!special_hit) {
        std::int64_t numel = 1;
        dtype dt;
        if (lay) {
          const auto& ft = lay->tensors[x - n];
          numel = ft.numel;
          dt = ft.dtype;
        } else {
          const auto& t = buf ? nd->buffers[x - fb] : nd->parameters[x - fp];
          dt = t.dtype;
          for (std::int64_t dim : t.shape)
            if (__builtin_mul_overflow(numel, dim, &numel)) (void)t.shape.numel();  // throws
        }
        // Eighths per element of this dtype under the rule, looked up once per dtype.
        auto& slot = per_element[buf][static_cast<std::size_t>(dt)];
        if (slot < 0) {
          const tensor_entry unit{"", shape{1}, dt, true};
          slot = detail::rule_tensor_size(unit, buf, target, std::nullopt, rule).eighths();
        }
        b = byte_size::from_eighths(numel * slot, slot % 8 != 0);
      }
      r.size[x] = b;
      r.counted[x] = 1;
      direct += b;
      owns = true;
      if (buf) {
        r.buffers[i] += b;
        r.any_buffers = true;
      }
    }
    r.size[i] = direct;
    r.counted[i] = owns;
    if (i != 0 && owns && direct > r.biggest_direct) r.biggest_direct = direct;
  }
  detail::sum_item_sizes_up(ix, r);
  return r;
}

namespace detail {

/// Item sizes as planning reads them, one at a time: from a table computed for every item
/// (item_sizes), or, when the tree's layout aggregates apply (a tree built in pre-order, no ties,
/// special dtypes or exact sizes), computed on demand from them: a module's size is its
/// subtree's element count per size key times that key's size, a tensor's its count times its
/// key's size, so a first plan never sizes the modules it does not visit. Both give the same
/// values (flags included) for every item, and the same totals.
class size_view {
 public:
  using id = tree_index::id;
  /// Reads a computed table (kept alive by the caller).
  explicit size_view(const item_sizes& s) noexcept
      : full_(&s),
        any_buffers_(s.any_buffers),
        leaf_sum_(s.leaf_sum),
        leaf_count_(s.leaf_count),
        biggest_direct_(s.biggest_direct) {}
  /// From the tree's aggregates, or nullopt when they do not apply (then compute_item_sizes).
  static std::optional<size_view> from_aggregates(const tree_index& ix, std::optional<dtype> target,
                                                  const special_dtypes& special, size_rule rule) {
    const tree_layout* lay = ix.layout();
    if (!lay || !ix.borrows_layout() || !lay->aggregates || !special.empty() ||
        !ix.tree().tied_parameters().empty())
      return std::nullopt;
    size_view v;
    v.lay_ = lay;
    v.n_ = static_cast<id>(ix.modules());
    v.keys_ = lay->key_count;
    for (std::size_t k = 0; k < v.keys_; ++k) {
      const auto [d, buffer] = lay->keys[k];
      const tensor_entry unit{"", shape{1}, d, true};
      v.slot_[k] = rule_tensor_size(unit, buffer, target, std::nullopt, rule).eighths();
      const auto bit = static_cast<std::uint8_t>(1u << k);
      if (v.slot_[k] % 8 != 0) v.float_mask_ = static_cast<std::uint8_t>(v.float_mask_ | bit);
      if (buffer) v.buffer_mask_ = static_cast<std::uint8_t>(v.buffer_mask_ | bit);
    }
    // The modules still open (the newest and its ancestors) completed; the leaves among them
    // join the finished ones.
    tree_layout::counts leaves = lay->leaves;
    v.leaf_count_ = lay->leaf_count;
    v.open_.reserve(8);
    bool ok = true;
    ok = lay->for_each_open([&](id m, const tree_layout::counts& c, bool leaf) {
      v.open_.emplace_back(m, c);
      if (leaf) {
        ok = leaves.add(c) && ok;
        ++v.leaf_count_;
      }
    }) && ok;
    if (!ok) return std::nullopt;
    v.any_buffers_ = (v.counts_of(0).mask & v.buffer_mask_) != 0;
    v.leaf_sum_ = v.of(leaves, 0xff);
    // The largest direct size: the first module reaching it keeps its flag in the table; the
    // planner reads only the value.
    lay->for_each_direct([&](const tree_layout::counts& c) {
      const byte_size b = v.of(c, 0xff);
      if (b > v.biggest_direct_) v.biggest_direct_ = b;
    });
    return v;
  }

  /// An item's size: a module's subtree, a tensor's own.
  byte_size size(id x) const noexcept {
    if (full_) return full_->size[x];
    if (x < n_) return of(counts_of(x), 0xff);
    const auto& t = lay_->tensors[x - n_];
    return byte_size::from_eighths(t.numel * slot_[t.key], ((float_mask_ >> t.key) & 1u) != 0);
  }
  /// The item has an entry in accelerate's name -> size map.
  bool counted(id x) const noexcept {
    if (full_) return full_->counted[x] != 0;
    return x >= n_ || counts_of(x).mask != 0;
  }
  /// Bytes of the buffers in module m's subtree.
  byte_size buffers(id m) const noexcept {
    if (full_) return full_->buffers[m];
    return of(counts_of(m), buffer_mask_);
  }
  bool any_buffers() const noexcept { return any_buffers_; }
  byte_size leaf_sum() const noexcept { return leaf_sum_; }
  std::int64_t leaf_count() const noexcept { return leaf_count_; }
  byte_size biggest_direct() const noexcept { return biggest_direct_; }

 private:
  size_view() = default;
  // A module's complete subtree counts: the layout's entry, or for a module still open (its
  // subtree reaches the last module) the completed one.
  const tree_layout::counts& counts_of(id m) const noexcept {
    if (lay_->subtree_end[m] == 0)
      for (const auto& [a, c] : open_)
        if (a == m) return c;
    return lay_->subtree[m];
  }
  byte_size of(const tree_layout::counts& c, std::uint8_t keys) const noexcept {
    std::int64_t e = 0;
    for (std::size_t k = 0; k < keys_; ++k)
      if ((keys >> k) & 1u) e += c.numel[k] * slot_[k];
    return byte_size::from_eighths(e, (c.mask & keys & float_mask_) != 0);
  }
  const item_sizes* full_ = nullptr;
  const tree_layout* lay_ = nullptr;
  std::vector<std::pair<id, tree_layout::counts>> open_;
  id n_ = 0;
  std::size_t keys_ = 0;
  std::array<std::int64_t, tree_layout::max_keys> slot_{};
  std::uint8_t float_mask_ = 0, buffer_mask_ = 0;
  bool any_buffers_ = false;
  byte_size leaf_sum_;
  std::int64_t leaf_count_ = 0;
  byte_size biggest_direct_;
};

}  // namespace detail

/// accelerate's compute_module_sizes: the root "", every module owning counted tensors and every
/// counted tensor. Parameters (deduplicated: a tie counts once, under its first name) come first,
/// then buffers (non-persistent ones included: they occupy memory).
inline module_sizes compute_module_sizes(const module_tree& tree,
                                         std::optional<dtype> target = std::nullopt,
                                         const special_dtypes& special = {},
                                         bool buffers_only = false) {
  using id = tree_index::id;
  const tree_index ix(tree);
  const item_sizes s = compute_item_sizes(ix, target, special, buffers_only);
  // Entries in the order accelerate first touches them: for each counted tensor (parameters
  // over the pre-order, then buffers), its not-yet-seen ancestors from the root down, then the
  // tensor itself.
  module_sizes out;
  out.reserve(ix.items());
  std::vector<char> seen(ix.modules(), 0);
  std::vector<id> path;
  auto emit = [&](id x) {
    path.clear();
    for (std::size_t a = ix.module_of(x); a != module_tree::npos && !seen[a];
         a = tree.nodes()[a].parent)
      path.push_back(static_cast<id>(a));
    for (auto it = path.rbegin(); it != path.rend(); ++it) {
      seen[*it] = 1;
      out.append_new(tree.nodes()[*it].path, s.size[*it]);
    }
    out.append_new(ix.name(x), s.size[x]);
  };
  for (int pass = buffers_only ? 1 : 0; pass < 2; ++pass)
    for (id m : ix.preorder()) {
      const id b = pass == 0 ? ix.first_parameter(m) : ix.first_buffer(m);
      const id e = pass == 0 ? ix.first_buffer(m) : ix.tensors_end(m);
      for (id x = b; x < e; ++x)
        if (s.counted[x]) emit(x);
    }
  return out;
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
