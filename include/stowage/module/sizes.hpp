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
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
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

/// Eighths of a byte per element of a tensor of dtype `d` under a size rule (no special dtype):
/// a floating tensor shrinks to the target (not a buffer under the Transformers rule), and the
/// Transformers rule counts bool as the byte torch's element_size() reports.
constexpr std::int64_t rule_element_eighths(dtype d, bool is_buffer, std::optional<dtype> target,
                                            size_rule rule) noexcept {
  if (target && !is_integral(d) && !(rule == size_rule::transformers && is_buffer))
    d = accelerate_size_eighths(*target) <= accelerate_size_eighths(d) ? *target : d;
  if (rule == size_rule::transformers && d == dtype::bool_) return 8;
  return accelerate_size_eighths(d);
}

/// One tensor under a size rule, `special` already resolved to this tensor (or none).
inline byte_size rule_tensor_size(const tensor_entry& t, bool is_buffer,
                                  std::optional<dtype> target, std::optional<dtype> special,
                                  size_rule rule) {
  // A special dtype replaces the tensor's and is not shrunk to the target.
  const std::int64_t e = special ? rule_element_eighths(*special, is_buffer, std::nullopt, rule)
                                 : rule_element_eighths(t.dtype, is_buffer, target, rule);
  // Element count with an overflow check by multiplication (shape::numel divides per
  // dimension, a measurable share of planning a 70B tree from scratch).
  std::int64_t numel = 1;
  for (std::int64_t dim : t.shape)
    if (__builtin_mul_overflow(numel, dim, &numel)) return byte_size(t.shape.numel());  // throws
  return byte_size::from_eighths(numel * e, e % 8 != 0);
}

}  // namespace detail

namespace detail {

/// std::allocator whose value-less construct() default-initialises: resize() leaves trivial
/// elements unwritten (for arrays every element of which is written right after).
template <class T>
struct uninit_allocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = uninit_allocator<U>;
  };
  uninit_allocator() noexcept = default;
  template <class U>
  uninit_allocator(const uninit_allocator<U>&) noexcept {}  // NOLINT implicit
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using uninit_vector = std::vector<T, uninit_allocator<T>>;

/// A module as tree_index keeps it: flat, 16 bytes.
struct flat_module {
  std::uint32_t parent;        ///< none for the root
  std::uint32_t first_tensor;  ///< its first tensor (tensor index, not item)
  std::uint32_t first_buffer;  ///< its first buffer (one past its parameters)
  std::uint32_t subtree_end;   ///< one past the pre-order position of its subtree's last module
};
/// A tensor as tree_index keeps it.
struct flat_tensor {
  std::int64_t numel;
  stowage::dtype dtype;
  bool buffer;
};

}  // namespace detail

/// An integer view of a module_tree for planning. Every module and every tensor is an *item*:
/// items [0, modules()) are modules by tree index, items [modules(), items()) are tensors,
/// numbered module by module (tree index order), each module's parameters then its buffers.
/// Pre-order positions and subtree ends turn "is below" into two integer comparisons, so the
/// planner never builds or hashes a name except for the keys it outputs. Built from the nodes in
/// one pass (the tree keeps nothing for planning: what a plan needs is derived here, at the
/// first plan, and kept with the tree until it changes).
class tree_index {
 public:
  using id = std::uint32_t;
  static constexpr id none = ~id{0};

  explicit tree_index(const module_tree& t) : tree_(&t), n_(t.size()) {
    const auto& nodes = t.nodes();
    if (n_ >= none) throw model_error("module tree: too many modules to plan");
    mods_.resize(n_ + 1);
    tens_.reserve(n_ + n_ / 2);
    detail::flat_module* mods = mods_.data();
    bool overflow = false;
    auto add = [&](const tensor_entry& e, bool buffer) {
      // Element count: rank <= 2 with dimensions below 2^31 (nearly every tensor) without a
      // branch per dimension; anything else checked dimension by dimension.
      const std::size_t r = e.shape.rank();
      const std::int64_t d0 = r > 0 ? e.shape[0] : 1, d1 = r > 1 ? e.shape[1] : 1;
      std::int64_t numel;
      if (r <= 2 && static_cast<std::uint64_t>(d0 | d1) < (std::uint64_t{1} << 31)) {
        numel = d0 * d1;
      } else {
        numel = 1;
        for (std::int64_t d : e.shape)
          overflow = __builtin_mul_overflow(numel, d, &numel) || overflow;
      }
      tens_.push_back({numel, e.dtype, buffer});
    };
    for (std::size_t i = 0; i < n_; ++i) {
      const auto& nd = nodes[i];
      auto& m = mods[i];
      m.parent = nd.parent == module_tree::npos ? none : static_cast<id>(nd.parent);
      m.first_tensor = static_cast<id>(tens_.size());
      for (const auto& p : nd.parameters) add(p, false);
      m.first_buffer = static_cast<id>(tens_.size());
      for (const auto& b : nd.buffers) add(b, true);
      if (tens_.size() >= none - n_)
        throw model_error("module tree: too many modules and tensors to plan (" +
                          std::to_string(n_ + tens_.size()) + ")");
    }
    if (overflow) {
      for (const auto& nd : nodes)
        for (const auto* list : {&nd.parameters, &nd.buffers})
          for (const auto& e : *list) (void)e.shape.numel();  // throws, naming the shape
    }
    const auto nt = static_cast<id>(tens_.size());
    mods[n_] = {none, nt, nt, 0};
    // Subtree ends and the pre-order test in one backward pass (a parent's index is below its
    // children's): a subtree ends one past its largest index, and the nodes are in pre-order
    // exactly when every subtree fills the range up to there. No branch per module.
    {
      // On the stack for trees up to 2,048 modules (a 405B Llama has 1,645).
      std::array<id, 2048> count_small;
      std::unique_ptr<id[]> count_big;
      if (n_ > count_small.size()) count_big.reset(new id[n_]);
      id* count = count_big ? count_big.get() : count_small.data();
      for (std::size_t i = 0; i < n_; ++i) {
        mods[i].subtree_end = static_cast<id>(i + 1);
        count[i] = 1;
      }
      for (std::size_t i = n_; i-- > 1;) {
        const id p = mods[i].parent;
        mods[p].subtree_end = std::max(mods[p].subtree_end, mods[i].subtree_end);
        count[p] += count[i];
      }
      unsigned gaps = 0;
      for (std::size_t i = 0; i < n_; ++i)
        gaps |= mods[i].subtree_end - static_cast<id>(i) != count[i] ? 1u : 0u;
      identity_ = gaps == 0;
    }
    if (!identity_) {
      order_.clear();
      for (std::size_t i : t.preorder()) order_.push_back(static_cast<id>(i));
      pre_.resize(n_);
      for (std::size_t k = 0; k < n_; ++k) pre_[order_[k]] = static_cast<id>(k);
      std::vector<id> span(n_, 1);
      for (std::size_t k = n_; k-- > 1;) span[mods[order_[k]].parent] += span[order_[k]];
      for (std::size_t i = 0; i < n_; ++i) mods[i].subtree_end = pre_[i] + span[i];
      order_ready_.store(true, std::memory_order_relaxed);
    }
  }
  tree_index(const tree_index& o)
      : tree_(o.tree_),
        n_(o.n_),
        identity_(o.identity_),
        order_(o.identity_ ? std::vector<id>{} : o.order_),
        pre_(o.pre_),
        mods_(o.mods_),
        tens_(o.tens_),
        order_ready_(!o.identity_) {}
  tree_index& operator=(const tree_index& o) {
    if (this != &o) {
      tree_index c(o);
      *this = std::move(c);
    }
    return *this;
  }
  tree_index(tree_index&& o) noexcept
      : tree_(o.tree_),
        n_(o.n_),
        identity_(o.identity_),
        order_(std::move(o.order_)),
        pre_(std::move(o.pre_)),
        mods_(std::move(o.mods_)),
        tens_(std::move(o.tens_)),
        owner_(std::move(o.owner_)),
        order_ready_(!identity_ || order_.size() == n_),
        owners_ready_(owner_.size() == tens_.size()) {}
  tree_index& operator=(tree_index&& o) noexcept {
    tree_ = o.tree_;
    n_ = o.n_;
    identity_ = o.identity_;
    order_ = std::move(o.order_);
    pre_ = std::move(o.pre_);
    mods_ = std::move(o.mods_);
    tens_ = std::move(o.tens_);
    owner_ = std::move(o.owner_);
    order_ready_.store(!identity_ || order_.size() == n_, std::memory_order_relaxed);
    owners_ready_.store(owner_.size() == tens_.size(), std::memory_order_relaxed);
    return *this;
  }
  ~tree_index() = default;

  /// The nodes are in pre-order: position(m) == m and a subtree is the range [m, subtree_end(m)).
  bool preorder_is_identity() const noexcept { return identity_; }
  const module_tree& tree() const noexcept { return *tree_; }
  std::size_t modules() const noexcept { return n_; }
  std::size_t tensors() const noexcept { return tens_.size(); }
  std::size_t items() const noexcept { return n_ + tens_.size(); }
  /// Modules in pre-order (tree indices).
  const std::vector<id>& preorder() const {
    if (!order_ready_.load(std::memory_order_acquire)) {
      // The identity, built on first use: a first plan never asks (positions are the indices).
      std::lock_guard<std::mutex> lock(order_mutex_);
      if (!order_ready_.load(std::memory_order_relaxed)) {
        order_.resize(n_);
        for (std::size_t i = 0; i < n_; ++i) order_[i] = static_cast<id>(i);
        order_ready_.store(true, std::memory_order_release);
      }
    }
    return order_;
  }
  /// Per module (by index) its parent, tensor range and subtree end, plus one last entry whose
  /// first_tensor is the tensor count.
  const detail::flat_module* flat_modules() const noexcept { return mods_.data(); }
  /// Per tensor (item - modules()) its element count, dtype and whether it is a buffer.
  const std::vector<detail::flat_tensor>& flat_tensors() const noexcept { return tens_; }

  bool is_module(id x) const noexcept { return x < n_; }
  /// The module an item belongs to: itself for a module, the owner for a tensor (the last
  /// module whose first tensor is at or before it: a binary search until tensor_owners() was
  /// asked for, since a plan looks up few tensors).
  id module_of(id x) const noexcept {
    if (x < n_) return x;
    if (owners_ready_.load(std::memory_order_acquire)) return owner_[x - n_];
    const id k = x - static_cast<id>(n_);
    const auto it =
        std::upper_bound(mods_.begin(), mods_.begin() + static_cast<std::ptrdiff_t>(n_), k,
                         [](id v, const detail::flat_module& m) { return v < m.first_tensor; });
    return static_cast<id>(it - mods_.begin()) - 1;
  }
  /// Items of module m's direct parameters: [first_parameter(m), first_buffer(m)).
  id first_parameter(id m) const noexcept { return static_cast<id>(n_ + mods_[m].first_tensor); }
  id first_buffer(id m) const noexcept { return static_cast<id>(n_ + mods_[m].first_buffer); }
  /// One past m's direct buffers.
  id tensors_end(id m) const noexcept { return static_cast<id>(n_ + mods_[m + 1].first_tensor); }
  /// Module m has child modules.
  bool has_children(id m) const noexcept { return subtree_end(m) != position(m) + 1; }
  bool is_buffer(id x) const noexcept { return x >= n_ && tens_[x - n_].buffer; }
  const tensor_entry& tensor(id x) const {
    const id m = module_of(x);
    const auto& nd = tree_->nodes()[m];
    const std::size_t k = x - first_parameter(m);
    return k < nd.parameters.size() ? nd.parameters[k] : nd.buffers[k - nd.parameters.size()];
  }

  /// Per tensor (item - modules()): the module owning it (built on first use).
  const std::vector<id>& tensor_owners() const {
    if (!owners_ready_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(order_mutex_);
      if (!owners_ready_.load(std::memory_order_relaxed)) {
        fill_owners();
        owners_ready_.store(true, std::memory_order_release);
      }
    }
    return owner_;
  }
  /// The parent module, or none for the root.
  id parent(id m) const noexcept { return mods_[m].parent; }
  /// Pre-order position of module m.
  id position(id m) const noexcept { return identity_ ? m : pre_[m]; }
  /// One past the pre-order position of the last module of m's subtree.
  id subtree_end(id m) const noexcept { return mods_[m].subtree_end; }
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
    return join_name(tree_->nodes()[module_of(x)].path, tensor(x).name);
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
  void fill_owners() const {
    // Tensor k's owner is the last module whose first tensor is at or before k (the modules
    // between own none). Without a branch per module (their tensor counts vary, and mispredicted
    // loop exits were most of this): each module's index is written at its first tensor (a
    // later module with the same first tensor overwrites it; one spare entry takes those
    // starting at the end), then a running maximum fills the rest.
    const std::size_t nt = tens_.size();
    owner_.assign(nt + 1, 0);
    id* o = owner_.data();
    for (std::size_t i = 0; i < n_; ++i) o[mods_[i].first_tensor] = static_cast<id>(i);
    id run = 0;
    for (std::size_t k = 0; k < nt; ++k) {
      run = std::max(run, o[k]);
      o[k] = run;
    }
    owner_.pop_back();
  }

  const module_tree* tree_;
  std::size_t n_;
  bool identity_ = true;           // nodes are in pre-order: positions are the indices
  mutable std::vector<id> order_;  // pre-order; for an identity, filled on first use
  std::vector<id> pre_;
  detail::uninit_vector<detail::flat_module> mods_;  // n + 1 entries
  std::vector<detail::flat_tensor> tens_;
  mutable std::vector<id> owner_;  // filled on first use
  mutable std::atomic<bool> order_ready_{false};
  mutable std::atomic<bool> owners_ready_{false};
  mutable std::mutex order_mutex_;
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
    const id p = ix.parent(i);
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
  // Element counts and dtypes come from the index's flat tensors; a node is read only for a
  // special dtype.
  const auto& ts = ix.flat_tensors();
  if (alias.empty() && sp.empty() && fixed.empty() && !buffers_only) {
    // The common case (no ties, special dtypes or exact sizes): every tensor counts; each
    // module's own total summed in registers.
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
        slot = detail::rule_element_eighths(e.dtype, e.buffer, target, rule);
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
    byte_size biggest{};
    for (std::size_t i = 0; i < n; ++i) {
      const auto m = static_cast<id>(i);
      const bool owns = ix.first_parameter(m) != ix.tensors_end(m);
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
        const std::int64_t numel = ts[x - n].numel;
        const dtype dt = ts[x - n].dtype;
        // Eighths per element of this dtype under the rule, looked up once per dtype.
        auto& slot = per_element[buf][static_cast<std::size_t>(dt)];
        if (slot < 0) slot = detail::rule_element_eighths(dt, buf, target, rule);
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
/// (item_sizes), or, for a tree whose nodes are in pre-order and without ties, special dtypes or
/// exact sizes, from running sums over the tensors: a module's subtree is
/// a contiguous range of tensors, so its size is the difference of two prefix sums, and a plan
/// computes one sum per tensor (no per-module table) and sizes only the modules it visits. Both
/// give the same values (flags included) for every item, and the same totals.
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
  /// Running sums over the index's tensors, or nullopt when they do not apply (then
  /// compute_item_sizes).
  static std::optional<size_view> from_index(const tree_index& ix, std::optional<dtype> target,
                                             const special_dtypes& special, size_rule rule) {
    if (!ix.preorder_is_identity() || !special.empty() || !ix.tree().tied_parameters().empty())
      return std::nullopt;
    size_view v;
    v.ix_ = &ix;
    v.n_ = static_cast<id>(ix.modules());
    const flat_tensor* ts = ix.flat_tensors().data();
    const std::size_t nt = ix.flat_tensors().size();
    // Eighths per element for every (dtype, buffer), so the pass below calls nothing.
    static_assert(dtype_count <= 32);
    std::array<std::int64_t, 64> per{};
    for (std::size_t d = 0; d < dtype_count; ++d) {
      per[d] = rule_element_eighths(static_cast<dtype>(d), false, target, rule);
      per[32 + d] = rule_element_eighths(static_cast<dtype>(d), true, target, rule);
    }
    // One running sum of eighths per tensor boundary. Buffers and fractional-sized tensors (a
    // module's size is a Python float when one lies in its subtree, even of zero elements) are
    // rare: listed by tensor index afterwards, found in a range by binary search. Checks are
    // or-ed into flags, not branched on: this pass is a first plan's largest piece.
    v.sum_.resize(nt + 1);
    std::int64_t* sum = v.sum_.data();
    sum[0] = 0;
    std::int64_t total = 0;
    unsigned bad = 0;
    std::size_t first_rare = nt;
    for (std::size_t k = 0; k < nt; ++k) {
      const flat_tensor& t = ts[k];
      const auto d = static_cast<unsigned>(t.dtype);
      bad |= d >= dtype_count ? 1u : 0u;
      const std::int64_t p = per[(t.buffer ? 32u : 0u) | (d & 31u)];
      std::int64_t e;
      bad |= __builtin_mul_overflow(t.numel, p, &e) ? 1u : 0u;
      bad |= __builtin_add_overflow(total, e, &total) ? 1u : 0u;
      sum[k + 1] = total;
      const bool rare = t.buffer || (p & 7) != 0;
      first_rare = rare && first_rare == nt ? k : first_rare;
    }
    const bool ok = bad == 0;
    if (!ok) return std::nullopt;
    if (first_rare != nt) {
      v.buffer_at_.reserve(8);
      v.buffer_sum_.reserve(8);
      std::int64_t buffers = 0;
      for (std::size_t k = first_rare; k < nt; ++k) {
        const flat_tensor& t = ts[k];
        const std::int64_t p = per[(t.buffer ? 32u : 0u) | static_cast<unsigned>(t.dtype)];
        if (t.buffer) {
          buffers += t.numel * p;  // no overflow: part of the total above
          v.buffer_at_.push_back(static_cast<id>(k));
          v.buffer_sum_.push_back(buffers);
          if (p % 8 != 0) v.float_buffer_at_.push_back(static_cast<id>(k));
        }
        if (p % 8 != 0) v.float_at_.push_back(static_cast<id>(k));
      }
    }
    v.any_buffers_ = !v.buffer_at_.empty();
    return v;
  }

  /// An item's size: a module's subtree, a tensor's own.
  byte_size size(id x) const noexcept {
    if (full_) return full_->size[x];
    std::size_t b, e;
    range(x, b, e);
    return byte_size::from_eighths(sum_[e] - sum_[b], any_in(float_at_, b, e));
  }
  /// The item has an entry in accelerate's name -> size map.
  bool counted(id x) const noexcept {
    if (full_) return full_->counted[x] != 0;
    if (x >= n_) return true;
    std::size_t b, e;
    range(x, b, e);
    return e != b;
  }
  /// Bytes of the buffers in module m's subtree.
  byte_size buffers(id m) const noexcept {
    if (full_) return full_->buffers[m];
    if (buffer_at_.empty()) return byte_size{};
    std::size_t b, e;
    range(m, b, e);
    if (e <= buffer_at_.front() || b > buffer_at_.back()) return byte_size{};  // most modules
    // The buffers listed in [b, e): their running sum after the last one minus before the first.
    const auto first = std::lower_bound(buffer_at_.begin(), buffer_at_.end(), b);
    const auto last = std::lower_bound(first, buffer_at_.end(), e);
    if (first == last) return byte_size{};
    const auto i = static_cast<std::size_t>(first - buffer_at_.begin());
    const auto j = static_cast<std::size_t>(last - buffer_at_.begin());
    return byte_size::from_eighths(buffer_sum_[j - 1] - (i == 0 ? 0 : buffer_sum_[i - 1]),
                                   any_in(float_buffer_at_, b, e));
  }
  bool any_buffers() const noexcept { return any_buffers_; }
  /// accelerate's get_balanced_memory leaves (the lowest modules owning tensors) summed and
  /// counted, and Transformers' biggest leaf (the largest sum of tensors one non-root module owns
  /// directly); from the running sums, one pass over the modules, on first use (sequential
  /// plans never ask).
  byte_size leaf_sum() const {
    leaf_stats();
    return leaf_sum_;
  }
  std::int64_t leaf_count() const {
    leaf_stats();
    return leaf_count_;
  }
  byte_size biggest_direct() const {
    leaf_stats();
    return biggest_direct_;
  }

  size_view(const size_view& o)
      : full_(o.full_),
        ix_(o.ix_),
        n_(o.n_),
        sum_(o.sum_),
        buffer_sum_(o.buffer_sum_),
        buffer_at_(o.buffer_at_),
        float_at_(o.float_at_),
        float_buffer_at_(o.float_buffer_at_),
        any_buffers_(o.any_buffers_),
        leaf_sum_(o.leaf_sum_),
        leaf_count_(o.leaf_count_),
        biggest_direct_(o.biggest_direct_),
        leaves_ready_(o.leaves_ready_.load(std::memory_order_acquire)) {}
  size_view(size_view&& o) noexcept
      : full_(o.full_),
        ix_(o.ix_),
        n_(o.n_),
        sum_(std::move(o.sum_)),
        buffer_sum_(std::move(o.buffer_sum_)),
        buffer_at_(std::move(o.buffer_at_)),
        float_at_(std::move(o.float_at_)),
        float_buffer_at_(std::move(o.float_buffer_at_)),
        any_buffers_(o.any_buffers_),
        leaf_sum_(o.leaf_sum_),
        leaf_count_(o.leaf_count_),
        biggest_direct_(o.biggest_direct_),
        leaves_ready_(o.leaves_ready_.load(std::memory_order_acquire)) {}
  size_view& operator=(const size_view&) = delete;
  size_view& operator=(size_view&&) = delete;
  ~size_view() = default;

 private:
  size_view() = default;
  // Item x's tensors: [b, e) in the running sums (a module's subtree, a tensor itself).
  void range(id x, std::size_t& b, std::size_t& e) const noexcept {
    if (x >= n_) {
      b = x - n_;
      e = b + 1;
      return;
    }
    const flat_module* mods = ix_->flat_modules();
    b = mods[x].first_tensor;
    e = mods[ix_->subtree_end(x)].first_tensor;
  }
  // Some listed tensor index lies in [b, e).
  static bool any_in(const std::vector<id>& at, std::size_t b, std::size_t e) noexcept {
    if (at.empty() || e <= at.front() || b > at.back()) return false;
    const auto it = std::lower_bound(at.begin(), at.end(), b);
    return it != at.end() && *it < e;
  }
  void leaf_stats() const {
    if (full_ || leaves_ready_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(leaf_mutex_);
    if (leaves_ready_.load(std::memory_order_relaxed)) return;
    // A leaf owns tensors and no module below it does: its subtree's tensors are its own.
    const flat_module* mods = ix_->flat_modules();
    const std::int64_t* sum = sum_.data();
    std::int64_t leaf_eighths = 0, count = 0;
    bool leaf_float = false;
    byte_size biggest{};
    if (float_at_.empty()) {
      // Whole sizes only: no branch per module (tensor-owning and empty modules alternate).
      std::int64_t big = 0;
      for (id m = 1; m < n_; ++m) {
        const id b = mods[m].first_tensor, own_end = mods[m + 1].first_tensor;
        const id se = mods[m].subtree_end;
        const id sub_end = mods[se].first_tensor;
        const std::int64_t own = sum[own_end] - sum[b];
        big = std::max(big, own);
        const bool leaf = (b != own_end) & (sub_end == own_end);
        leaf_eighths += leaf ? own : 0;
        count += leaf ? 1 : 0;
      }
      biggest = byte_size::from_eighths(big, false);
    } else {
      for (id m = 1; m < n_; ++m) {
        const id b = mods[m].first_tensor, own_end = mods[m + 1].first_tensor;
        if (b == own_end) continue;
        const byte_size own =
            byte_size::from_eighths(sum[own_end] - sum[b], any_in(float_at_, b, own_end));
        if (own > biggest) biggest = own;
        if (mods[ix_->subtree_end(m)].first_tensor == own_end) {
          leaf_eighths += own.eighths();
          leaf_float = leaf_float || own.is_float();
          ++count;
        }
      }
    }
    leaf_sum_ = byte_size::from_eighths(leaf_eighths, leaf_float);
    leaf_count_ = count;
    biggest_direct_ = biggest;
    leaves_ready_.store(true, std::memory_order_release);
  }

  const item_sizes* full_ = nullptr;
  const tree_index* ix_ = nullptr;
  id n_ = 0;
  uninit_vector<std::int64_t> sum_;                         // per tensor boundary
  std::vector<std::int64_t> buffer_sum_;                    // after each listed buffer
  std::vector<id> buffer_at_, float_at_, float_buffer_at_;  // tensor indices, ascending
  bool any_buffers_ = false;
  mutable byte_size leaf_sum_;
  mutable std::int64_t leaf_count_ = 0;
  mutable byte_size biggest_direct_;
  mutable std::atomic<bool> leaves_ready_{false};
  mutable std::mutex leaf_mutex_;
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
