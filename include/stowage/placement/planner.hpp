// stowage/placement/planner.hpp: accelerate's infer_auto_device_map (with its fallback
// allocation) and get_balanced_memory, and Transformers v5's get_balanced_memory, re-implemented
// on module_tree. Same maps, same verbose lines, same warnings and info logs as accelerate on the
// same inputs, except where accelerate has a bug listed in §9 of the spec: there the planner does
// the right thing and records a `deviation` naming the §9 item, so a caller (and the conformance
// tests) can tell. The planner works on integer items of a tree_index (no names except the
// output keys); plan_context keeps what depends only on the tree for repeated planning.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/placement/devices.hpp>
#include <stowage/placement/max_memory.hpp>
#include <stowage/placement/quantized_sizes.hpp>
#include <stowage/precision/bnb_config.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace stowage {

/// A tensor-name pattern (ECMAScript regex, matched against the whole name) pinned to a device
/// before the policy places the rest.
struct placement_override {
  std::string pattern;
  device target;
};

/// Memory the model needs at run time besides its weights, reserved before weights are placed.
struct runtime_memory {
  std::int64_t batch_size = 0;
  std::int64_t context_length = 0;
  /// KV-cache bytes per token per layer; 0 = derive from the tree (k_proj/v_proj outputs).
  std::int64_t kv_bytes_per_token_per_layer = 0;
  /// Scratch (activations) reserved on every accelerator.
  std::int64_t activation_workspace = 0;
  bool active() const noexcept {
    return (batch_size > 0 && context_length > 0) || activation_workspace > 0;
  }
};

/// Planning options (accelerate's infer_auto_device_map arguments plus stowage's own).
struct plan_options {
  std::vector<std::string> no_split;  ///< module class names never split across devices
  std::optional<stowage::dtype> dtype;
  stowage::special_dtypes special_dtypes;
  bool offload_buffers = false;
  bool fallback_allocation = false;
  bool clean_result = true;
  /// Receives accelerate's verbose output, one line per call (a print of "\nX" is "" then "X").
  std::function<void(std::string_view)> verbose;
  std::vector<placement_override> overrides;
  runtime_memory runtime;
  /// false: anything landing on "disk" is a placement_error saying how much more memory is needed.
  bool allow_disk_offload = true;
  /// bitsandbytes quantization: every weight precision::modules_to_quantize selects is sized as
  /// what quantize-on-load stores for it (placement/quantized_sizes.hpp), the rest by `dtype`.
  std::optional<precision::bnb_config> quantization = std::nullopt;
  /// exact (default) or Transformers' estimate (0.5 / 1 byte per element, no state tensors).
  quantized_size_estimate quantized_sizes = quantized_size_estimate::exact;
  /// The module never quantized as the output embeddings ("" for none).
  std::string output_embeddings = "lm_head";
};

/// Where stowage departs from accelerate on purpose (an accelerate §9 bug it does not copy).
struct deviation {
  std::string item;     ///< "§9.4"
  std::string message;  ///< what accelerate would have done instead
};

/// One decision of the planner.
struct placement_record {
  std::string name;
  device target;
  byte_size size;
  std::string reason;
};

/// Bytes per device against the budget.
struct device_usage {
  device target;
  std::optional<byte_size> budget;  ///< none for an unlimited disk
  byte_size weights;
  byte_size reserved_runtime;
  byte_size reserved_layer;  ///< room kept for the largest offloaded layer (main devices)
};

/// What went where and why, warnings and info logs (instead of stderr), and deviations.
struct fit_report {
  std::vector<device_usage> devices;
  std::vector<placement_record> placements;
  std::vector<std::string> warnings;  ///< accelerate's UserWarnings
  std::vector<std::string> info;      ///< accelerate's info logs
  std::vector<deviation> deviations;

  void deviate(std::string item, std::string message) {
    for (const auto& d : deviations)
      if (d.item == item) return;
    deviations.push_back({std::move(item), std::move(message)});
  }
  bool deviates(std::string_view item) const {
    return std::any_of(deviations.begin(), deviations.end(),
                       [&](const deviation& d) { return d.item == item; });
  }
};

/// A device map with the budgets it was planned against and its report. Converts to the map.
struct plan_result {
  device_map map;
  max_memory budgets;
  fit_report report;
  operator const device_map&() const noexcept { return map; }  // NOLINT implicit
};

inline void save(const plan_result& r, const std::string& path) { save(r.map, path); }

namespace detail {

/// Python's repr of a list of strings: ['a', 'b'].
inline std::string py_list(const std::vector<std::string>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", '" : "'") + v[i] + "'";
  return s + "]";
}

inline std::string py_groups(const std::vector<const std::vector<std::string>*>& g) {
  std::string s = "[";
  for (std::size_t i = 0; i < g.size(); ++i) s += (i ? ", " : "") + py_list(*g[i]);
  return s + "]";
}

}  // namespace detail

/// The size of an entry together with the queue entries holding its tied partners.
struct tied_size {
  byte_size total;
  std::vector<std::string> names;   ///< one per tied parameter (may repeat), as accelerate
  std::vector<tree_entry> entries;  ///< the same, as queue entries
  byte_size accelerate_total;       ///< what accelerate computes (over-counts, §9.4)
};

/// accelerate's get_module_size_with_ties, fixed: each partner module counts once and nothing
/// is subtracted (§9.4), and a partner absent from the queue (already placed, or a shared
/// module torch hides) adds nothing instead of raising IndexError (§9.1, §9.2).
template <class Queue>
tied_size get_module_size_with_ties(const std::vector<std::string>& tied_params, byte_size size,
                                    const module_sizes& sizes, const Queue& queue) {
  tied_size r{size, {}, {}, size};
  std::vector<std::string> seen;
  for (const auto& p : tied_params) {
    const tree_entry* hit = nullptr;
    for (const auto& e : queue)
      if (p.size() > e.name.size() + 1 && covers(e.name, p) && !e.name.empty()) {
        hit = &e;
        break;
      }
    if (!hit) continue;
    r.names.push_back(hit->name);
    r.entries.push_back(*hit);
    r.accelerate_total += sizes[hit->name] - sizes[p];
    if (std::find(seen.begin(), seen.end(), hit->name) == seen.end()) {
      seen.push_back(hit->name);
      r.total += sizes[hit->name];
    }
  }
  return r;
}

/// Options of get_balanced_memory.
struct balanced_options {
  std::vector<std::string> no_split;
  std::optional<stowage::dtype> dtype;
  stowage::special_dtypes special_dtypes;
  bool low_zero = false;
  /// As in plan_options: quantized weights sized by quantized_sizes.
  std::optional<precision::bnb_config> quantization = std::nullopt;
  quantized_size_estimate quantized_sizes = quantized_size_estimate::exact;
  std::string output_embeddings = "lm_head";
};

namespace detail {

/// Scratch space of one planning run, kept in the plan_context so repeated planning reuses the
/// allocations.
struct plan_scratch {
  using id = tree_index::id;
  std::vector<id> queue;  ///< the work queue, front at the back
  std::vector<id> requeued, stack, kids, search, partners, unique_partners, tie_params;
  std::vector<std::uint32_t> slot;  ///< per item: position in `placed`, or none
  std::vector<std::pair<id, device>> placed;
  // clean_device_map over items, per module
  std::vector<std::uint32_t> below, first;
  std::vector<device> uniform;
  std::vector<char> mixed;
  std::vector<id> touched;
  std::vector<std::pair<std::uint32_t, id>> out;
  // build_map_in_order: the stack of the current entry's ancestors and the output so far
  struct map_frame {
    id module;
    std::uint32_t below, first, out_start;
    device uniform;
    bool mixed;
  };
  struct map_key {
    std::uint32_t pos;
    id item;
    device target;
  };
  std::vector<map_frame> frames;
  std::vector<map_key> keys;
  std::vector<std::string_view> map_names;
  std::vector<std::string> joined;

  /// Room for a typical plan (a few hundred entries), so a first plan does not grow every list
  /// through a dozen reallocations.
  void reserve() {
    for (auto* v : {&queue, &kids}) v->reserve(256);
    placed.reserve(256);
    frames.reserve(32);
    keys.reserve(256);
    map_names.reserve(256);
  }
};

/// Equal strings, compared inline a word at a time (class names are short; a memcmp call per
/// module visited was a measurable part of a first plan).
inline bool same_text(std::string_view a, std::string_view b) noexcept {
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

/// Entries derived once and then only read, shared by threads: lookups walk a published list
/// without locking; adding (under the owner's mutex, after looking again) publishes a new head.
/// Entries never move or change, so references handed out stay valid.
template <class T>
class append_only_list {
 public:
  append_only_list() = default;
  append_only_list(const append_only_list&) = delete;
  append_only_list& operator=(const append_only_list&) = delete;
  ~append_only_list() {
    for (node* n = head_.load(std::memory_order_relaxed); n;) {
      node* next = n->next;
      delete n;
      n = next;
    }
  }
  template <class Pred>
  const T* find(Pred&& pred) const {
    for (const node* n = head_.load(std::memory_order_acquire); n; n = n->next)
      if (pred(n->value)) return &n->value;
    return nullptr;
  }
  /// The caller holds the lock that serialises adding.
  const T& add(T value) {
    auto* n = new node{std::move(value), head_.load(std::memory_order_relaxed)};
    head_.store(n, std::memory_order_release);
    return n->value;
  }

 private:
  struct node {
    T value;
    node* next;
  };
  std::atomic<node*> head_{nullptr};
};

}  // namespace detail

/// Everything planning needs from a tree besides the budgets, computed once and reused: the
/// integer tree view (tree_index), item sizes per (dtype, special dtypes, size rule), no-split
/// flags and per-subtree largest layers per no-split list, the tie groups, and scratch space.
/// What depends only on the tree is kept with the tree (module_tree::derived) and shared by every
/// context of it, so a context built for a tree planned before (the plans from the tree,
/// infer_device_map(tree, ...)) starts with its index and size tables; the tree dropping them
/// whenever it changes. Planning a tree again costs only the planning itself.
/// One context is not thread-safe (use one per thread; contexts of one tree may run
/// concurrently); the tree must outlive it, unchanged.
class plan_context {
 public:
  using id = tree_index::id;

  explicit plan_context(const module_tree& tree)
      : data_(tree.derived<shared>([&] { return std::make_shared<shared>(tree); })),
        scratch_(data_->take_scratch()) {}
  plan_context(const plan_context& o) : data_(o.data_), scratch_(data_->take_scratch()) {}
  plan_context(plan_context&& o) noexcept = default;
  plan_context& operator=(const plan_context& o) {
    if (this != &o) {
      release();
      data_ = o.data_;
      scratch_ = data_->take_scratch();
    }
    return *this;
  }
  plan_context& operator=(plan_context&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::move(o.data_);
      scratch_ = std::move(o.scratch_);
    }
    return *this;
  }
  ~plan_context() { release(); }

  const module_tree& tree() const noexcept { return data_->index.tree(); }
  const tree_index& index() const noexcept { return data_->index; }

  /// Item sizes under these rules (computed on first use).
  const item_sizes& sizes(std::optional<stowage::dtype> d, const special_dtypes& sp,
                          size_rule rule = size_rule::accelerate) {
    return sizes(d, sp, rule, std::nullopt);
  }
  /// The same with bitsandbytes-quantized weights sized by `estimate` (quantized_sizes.hpp).
  const item_sizes& sizes(std::optional<stowage::dtype> d, const special_dtypes& sp, size_rule rule,
                          const std::optional<precision::bnb_config>& q,
                          quantized_size_estimate estimate = quantized_size_estimate::exact,
                          std::string_view output_embeddings = "lm_head") {
    shared& s = *data_;
    auto match = [&](const sizes_entry& e) {
      return e.target == d && e.rule == rule && e.special == sp &&
             same(e.quant, q, estimate, output_embeddings);
    };
    if (const auto* e = s.sizes.find(match)) return e->value;
    std::lock_guard<std::mutex> lock(s.mutex);
    if (const auto* e = s.sizes.find(match)) return e->value;
    std::optional<quant_key> k;
    if (q) k = quant_key{*q, estimate, std::string(output_embeddings)};
    tensor_size_overrides exact;
    if (q) exact = quantized_tensor_sizes(tree(), *q, d, sp, estimate, output_embeddings);
    return s.sizes
        .add({d, sp, rule, std::move(k), compute_item_sizes(s.index, d, sp, false, rule, exact)})
        .value;
  }

  /// The same sizes as planning reads them (detail::size_view): running sums over the index's
  /// tensors when they apply (no per-item table), else from sizes(...).
  const detail::size_view& size_table(std::optional<stowage::dtype> d, const special_dtypes& sp,
                                      size_rule rule, const std::optional<precision::bnb_config>& q,
                                      quantized_size_estimate estimate,
                                      std::string_view output_embeddings) {
    shared& s = *data_;
    auto match = [&](const view_entry& e) {
      return e.target == d && e.rule == rule && e.special == sp &&
             same(e.quant, q, estimate, output_embeddings);
    };
    if (const auto* e = s.views.find(match)) return e->value;
    std::optional<detail::size_view> v;
    if (!q) {
      std::lock_guard<std::mutex> lock(s.mutex);
      if (const auto* e = s.views.find(match)) return e->value;
      if (auto f = detail::size_view::from_index(s.index, d, sp, rule)) v.emplace(std::move(*f));
    }
    if (!v) v.emplace(sizes(d, sp, rule, q, estimate, output_embeddings));
    std::lock_guard<std::mutex> lock(s.mutex);
    if (const auto* e = s.views.find(match)) return e->value;
    std::optional<quant_key> k;
    if (q) k = quant_key{*q, estimate, std::string(output_embeddings)};
    return s.views.add({d, sp, rule, std::move(k), std::move(*v)}).value;
  }

  /// Modules whose class is in a no-split list, as far as planning looks: every module not
  /// strictly below another no-split module. Planning never splits a no-split module, so it never
  /// asks about the modules inside one; and a module nested in one is no larger than it, so the
  /// largest instance is among those found. A walk from the root that does not descend into an
  /// instance compares the class names of a few dozen modules of a Llama, not of all of them.
  struct split_info {
    std::vector<std::string> classes;
    std::vector<char> flag;     ///< per module (0 for the modules inside an instance)
    std::vector<id> instances;  ///< the outermost instances, in pre-order
  };
  const split_info& no_split(const std::vector<std::string>& classes) {
    shared& sh = *data_;
    auto match = [&](const split_info& e) { return e.classes == classes; };
    if (const auto* e = sh.splits.find(match)) return *e;
    std::lock_guard<std::mutex> lock(sh.mutex);
    if (const auto* e = sh.splits.find(match)) return *e;
    const tree_index& ix = sh.index;
    const auto& nodes = tree().nodes();
    split_info s{classes, std::vector<char>(ix.modules(), 0), {}};
    if (!classes.empty()) {
      auto class_of = [&](id m) -> std::size_t {
        const std::string& c = nodes[m].class_name;
        for (std::size_t k = 0; k < classes.size(); ++k)
          if (detail::same_text(classes[k], c)) return k;
        return classes.size();
      };
      s.instances.reserve(128);
      auto hit = [&](id m) {
        s.flag[m] = 1;
        s.instances.push_back(m);
      };
      if (ix.preorder_is_identity()) {
        // Pre-order indices: the next module is m + 1, or past m's subtree for an instance.
        const id n = static_cast<id>(ix.modules());
        for (id m = 0; m < n;) {
          const std::size_t k = class_of(m);
          if (k == classes.size()) {
            ++m;
            continue;
          }
          hit(m);
          // The root is never planned as one block: the modules below it are still looked at.
          m = m == 0 ? 1 : ix.subtree_end(m);
        }
      } else {
        std::vector<std::size_t> stack{0};
        while (!stack.empty()) {
          const auto m = static_cast<id>(stack.back());
          stack.pop_back();
          if (class_of(m) != classes.size()) {
            hit(m);
            if (m != 0) continue;
          }
          const auto& ch = nodes[m].children;
          for (auto it = ch.rbegin(); it != ch.rend(); ++it) stack.push_back(*it);
        }
      }
    }
    return sh.splits.add(std::move(s));
  }
  /// accelerate's choice in get_balanced_memory: the first module of each no-split class in the
  /// order of compute_module_sizes' entries (the root left out): the modules whose subtree holds
  /// a parameter in pre-order, then those holding only buffers; as (class, module) in order of
  /// discovery. Only a fit report asks (to name the §9.6 difference). With one class its first
  /// instance is an outermost one (an instance without parameters holds none below it either);
  /// with several, one class may first occur inside another's instance, so every module is
  /// looked at.
  std::vector<std::pair<std::size_t, id>> first_instances(const split_info& ns,
                                                          const detail::size_view& sz) {
    std::vector<std::pair<std::size_t, id>> out;
    const auto& nodes = tree().nodes();
    const tree_index& ix = index();
    auto has_parameter = [&](id m) {
      if (ix.preorder_is_identity()) {
        for (id k = m; k < ix.subtree_end(m); ++k)
          if (ix.first_buffer(k) != ix.first_parameter(k)) return true;
        return false;
      }
      std::vector<std::size_t> stack{m};
      while (!stack.empty()) {
        const auto k = static_cast<id>(stack.back());
        stack.pop_back();
        if (ix.first_buffer(k) != ix.first_parameter(k)) return true;
        for (std::size_t c : nodes[k].children) stack.push_back(c);
      }
      return false;
    };
    auto add = [&](id m, bool with_parameter) {
      if (m == 0) return;
      std::size_t k = 0;
      while (k < ns.classes.size() && ns.classes[k] != nodes[m].class_name) ++k;
      if (k == ns.classes.size()) return;
      for (const auto& e : out)
        if (e.first == k) return;
      if (sz.counted(m) && has_parameter(m) == with_parameter) out.emplace_back(k, m);
    };
    for (const bool with_parameter : {true, false}) {
      if (ns.classes.size() == 1) {
        for (id m : ns.instances)
          if (add(m, with_parameter), !out.empty()) break;
      } else if (!ns.classes.empty()) {
        for (id m : ix.preorder()) add(m, with_parameter);
      }
      if (out.size() == ns.classes.size()) break;
    }
    return out;
  }

  /// The largest layer of each module's subtree (accelerate's get_max_layer_size per subtree: a
  /// layer is a module without children or of a no-split class), for the modules planning can
  /// ask about only: the root's children and, below them, the children of every module planning
  /// may split (one with children, not of a no-split class). Planning never looks further down,
  /// so a first plan sizes a few dozen modules here, not the tree; the other entries are never
  /// read (and never written).
  struct layer_table {
    struct entry {
      std::int64_t eighths;
      std::uint32_t count;  // its layers of that largest size
      bool is_float;
    };
    const detail::size_view* sizes;
    const split_info* split;
    std::unique_ptr<entry[]> entries;  // per module
    byte_size at(id m) const noexcept {
      return byte_size::from_eighths(entries[m].eighths, entries[m].is_float);
    }
    std::uint32_t count(id m) const noexcept { return entries[m].count; }
  };
  const layer_table& planning_layers(const detail::size_view& v, const split_info& ns) {
    shared& sh = *data_;
    auto match = [&](const layer_table& e) { return e.sizes == &v && e.split == &ns; };
    if (const auto* e = sh.layers.find(match)) return *e;
    std::lock_guard<std::mutex> lock(sh.mutex);
    if (const auto* e = sh.layers.find(match)) return *e;
    const tree_index& ix = sh.index;
    const std::size_t n = ix.modules();
    // Uninitialised on purpose: only the entries planning reads are written.
    layer_table t{&v, &ns, std::unique_ptr<layer_table::entry[]>(new layer_table::entry[n])};
    const auto& nodes = tree().nodes();
    auto fill = [&](auto& self, id m) -> byte_size {
      byte_size b{};
      std::uint32_t k = 0;
      auto take = [&](id c) {
        const byte_size x = self(self, c);
        if (k == 0 || x > b) {
          b = x;
          k = t.count(c);
        } else if (x == b) {
          k += t.count(c);
        }
      };
      if (!ix.has_children(m) || ns.flag[m]) {
        b = v.size(m);
        k = 1;
      } else if (ix.preorder_is_identity()) {
        // Children in pre-order: m + 1, then each one's subtree end (no node is read).
        for (id c = m + 1; c < ix.subtree_end(m); c = ix.subtree_end(c)) take(c);
      } else {
        for (std::size_t c : nodes[m].children) take(static_cast<id>(c));
      }
      t.entries[m] = {b.eighths(), k, b.is_float()};
      return b;
    };
    for (std::size_t c : nodes[0].children) fill(fill, static_cast<id>(c));
    return sh.layers.add(std::move(t));
  }

  /// find_tied_parameters (names sorted in each group) and the same members as items.
  struct tie_info {
    std::vector<std::vector<std::string>> groups;
    std::vector<std::vector<id>> items;
  };
  const tie_info& ties() {
    shared& sh = *data_;
    auto any = [](const tie_info&) { return true; };
    if (const auto* e = sh.ties.find(any)) return *e;
    std::lock_guard<std::mutex> lock(sh.mutex);
    if (const auto* e = sh.ties.find(any)) return *e;
    tie_info t;
    t.groups = find_tied_parameters(tree());
    for (const auto& g : t.groups) {
      std::vector<id> ids;
      for (const auto& p : g) ids.push_back(sh.index.find(p).value_or(tree_index::none));
      t.items.push_back(std::move(ids));
    }
    return sh.ties.add(std::move(t));
  }

  detail::plan_scratch& scratch() noexcept { return *scratch_; }

 private:
  struct quant_key {
    precision::bnb_config config;
    quantized_size_estimate estimate;
    std::string output_embeddings;
  };
  // Whether a quantization sizes every tensor as the stored one (the fields sizes depend on).
  static bool same(const std::optional<quant_key>& a, const std::optional<precision::bnb_config>& b,
                   quantized_size_estimate estimate, std::string_view output_embeddings) {
    if (!a || !b) return !a && !b;
    const auto &x = a->config, &y = *b;
    return a->estimate == estimate && a->output_embeddings == output_embeddings &&
           x.load_in_4bit == y.load_in_4bit && x.load_in_8bit == y.load_in_8bit &&
           x.bnb_4bit_quant_type == y.bnb_4bit_quant_type &&
           x.bnb_4bit_use_double_quant == y.bnb_4bit_use_double_quant &&
           x.blocksize == y.blocksize && x.llm_int8_skip_modules == y.llm_int8_skip_modules;
  }
  struct sizes_entry {
    std::optional<stowage::dtype> target;
    special_dtypes special;
    size_rule rule;
    std::optional<quant_key> quant;
    item_sizes value;
  };
  struct view_entry {
    std::optional<stowage::dtype> target;
    special_dtypes special;
    size_rule rule;
    std::optional<quant_key> quant;
    detail::size_view value;
  };

  /// What depends only on the tree, kept with it and shared by its contexts. Entries are only
  /// ever added (under the mutex) and never change, so references handed out stay valid and
  /// lookups need no lock. One spare scratch space is kept for the next context.
  struct shared {
    explicit shared(const module_tree& t) : index(t) {}
    ~shared() { delete spare.load(std::memory_order_relaxed); }
    std::unique_ptr<detail::plan_scratch> take_scratch() {
      if (auto* w = spare.exchange(nullptr, std::memory_order_acquire))
        return std::unique_ptr<detail::plan_scratch>(w);
      return std::make_unique<detail::plan_scratch>();
    }
    void give_back(std::unique_ptr<detail::plan_scratch> w) noexcept {
      detail::plan_scratch* expected = nullptr;
      if (spare.compare_exchange_strong(expected, w.get(), std::memory_order_release,
                                        std::memory_order_relaxed))
        (void)w.release();  // kept for the next context; else freed here
    }
    tree_index index;
    std::mutex mutex;  // serialises adding entries
    detail::append_only_list<sizes_entry> sizes;
    detail::append_only_list<view_entry> views;
    detail::append_only_list<split_info> splits;
    detail::append_only_list<layer_table> layers;
    detail::append_only_list<tie_info> ties;            // one entry once computed
    std::atomic<detail::plan_scratch*> spare{nullptr};  // one scratch space kept for reuse
  };
  void release() noexcept {
    if (data_ && scratch_) data_->give_back(std::move(scratch_));
  }
  std::shared_ptr<shared> data_;
  std::unique_ptr<detail::plan_scratch> scratch_;
};

namespace detail {

/// Python floor division of a (maybe float) size by a positive count.
inline byte_size floor_div(byte_size v, std::int64_t k) {
  if (v.is_float()) {
    const double x = v.bytes() / static_cast<double>(k);
    const auto q = static_cast<std::int64_t>(x >= 0 ? x : x - 1);
    return byte_size::from_eighths(q * 8, true);
  }
  return byte_size(v.floor_bytes() / k);
}

/// int(1.25 * x), exact in eighths (x * 10 / 8), truncated toward zero.
inline byte_size one_and_a_quarter(byte_size x) { return byte_size(x.eighths() * 10 / 64); }

/// The tail both get_balanced_memory versions share: every GPU but the last capped at
/// `per_gpu`; with low_zero the first GPU keeps only what the others cannot hold. By sorted
/// GPU id, not by position (§9.5; accelerate and Transformers sum positions 1..n-1).
inline void cap_balanced(max_memory& out, const std::vector<int>& ids, std::size_t n,
                         byte_size per_gpu, byte_size total, bool low_zero, fit_report* report) {
  for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
    const device d = device::gpu(ids[i]);
    const byte_size cur = out.at(d);
    const byte_size cap = (low_zero && i == 0) ? out.at(device::gpu(ids.front())) : per_gpu;
    out.set(d, std::min(cap, cur));
  }
  if (!low_zero) return;
  byte_size others{};
  for (std::size_t i = 1; i < ids.size(); ++i) others += out.at(device::gpu(ids[i]));
  byte_size positional{};
  bool positional_ok = true;
  for (std::size_t i = 1; i < n; ++i) {
    auto b = out.find(device::gpu(static_cast<int>(i)));
    if (!b) {
      positional_ok = false;
      break;
    }
    positional += *b;
  }
  if (report && (!positional_ok || positional != others || ids.front() != 0))
    report->deviate("§9.5",
                    "balanced_low_0 sums the budgets of GPUs after the first by id; "
                    "accelerate sums positions 1..n-1 (wrong budgets or KeyError)");
  byte_size min_zero = total - others;
  if (min_zero.eighths() < 0) min_zero = byte_size{};
  const device first = device::gpu(ids.front());
  out.set(first, std::min(min_zero, out.at(first)));
}

inline std::string ninety_percent_note(device d) {
  return "We will use 90% of the memory on device " + d.to_string() +
         " for storing the model, and 10% for the buffer to avoid OOM. You can set "
         "`max_memory` in to a higher value to use more memory (at your own risk).";
}

}  // namespace detail

/// accelerate's get_balanced_memory: lowers every GPU budget but the last to about
/// total / n + a buffer so the model spreads over the GPUs. Fixed against accelerate: the
/// no-split buffer is the largest instance of each class, not the first (§9.6); balanced_low_0
/// uses the sorted GPU ids, not positions (§9.5); a "disk" key is accepted (§9.10).
inline max_memory get_balanced_memory(plan_context& ctx, const max_memory& mm,
                                      const balanced_options& opt, fit_report* report = nullptr) {
  max_memory out = mm;
  std::vector<int> ids;  // GPUs with a positive budget, sorted
  for (const auto& [d, b] : mm)
    if (d.is_gpu() && b.eighths() > 0) ids.push_back(d.index());
  if (mm.contains(device::disk()) && report)
    report->deviate("§9.10", "a \"disk\" budget is accepted; accelerate raises RuntimeError");
  const std::size_t n = ids.size();
  if (n == 0) return out;
  bool low_zero = opt.low_zero;
  if (n == 1) {
    low_zero = false;
    if (mm.measured) {
      const device first = device::gpu(ids.front());
      // Python: budget * 0.9 (a float); kept to the eighth of a byte.
      out.set(first, byte_size::from_eighths(mm.at(first).eighths() * 9 / 10, true));
      if (report) report->info.push_back(detail::ninety_percent_note(first));
    }
  }
  const detail::size_view& sz =
      ctx.size_table(opt.dtype, opt.special_dtypes, size_rule::accelerate, opt.quantization,
                     opt.quantized_sizes, opt.output_embeddings);
  const byte_size total = sz.size(0);
  byte_size per_gpu = detail::floor_div(total, static_cast<std::int64_t>(low_zero ? n - 1 : n));

  byte_size buffer{};
  if (!opt.no_split.empty()) {
    // The largest instance (stowage, §9.6); accelerate takes each class's first instance.
    const auto& ns = ctx.no_split(opt.no_split);
    byte_size fixed_buffer{};
    for (auto i : ns.instances)
      if (i != 0 && sz.counted(i)) fixed_buffer = std::max(fixed_buffer, sz.size(i));
    if (report) {
      byte_size acc_buffer{};
      for (const auto& [k, m] : ctx.first_instances(ns, sz))
        acc_buffer = std::max(acc_buffer, sz.size(m));
      if (acc_buffer != fixed_buffer)
        report->deviate("§9.6", "no-split buffer uses the largest instance (" +
                                    fixed_buffer.to_python_string() +
                                    " bytes); accelerate takes the first instance (" +
                                    acc_buffer.to_python_string() + ")");
    }
    buffer = fixed_buffer;
  }
  // Mean size of the lowest modules that own tensors; int(sum / max(count, 1)).
  const std::int64_t mean = static_cast<std::int64_t>(
      sz.leaf_sum().bytes() / static_cast<double>(std::max<std::int64_t>(sz.leaf_count(), 1)));
  per_gpu += detail::one_and_a_quarter(std::max(buffer, byte_size(mean)));
  detail::cap_balanced(out, ids, n, per_gpu, total, low_zero, report);
  return out;
}

inline max_memory get_balanced_memory(const module_tree& tree, const max_memory& mm,
                                      const balanced_options& opt, fit_report* report = nullptr) {
  plan_context ctx(tree);
  return get_balanced_memory(ctx, mm, opt, report);
}

/// Transformers v5's get_balanced_memory (transformers/integrations/accelerate.py), what
/// from_pretrained(device_map="auto" | "balanced" | "balanced_low_0") uses, as a pure function
/// of explicit budgets: no allocator slack (Transformers adds reserved-minus-allocated CUDA
/// memory, §9.20). Differences from accelerate's: sizes by the Transformers rule
/// (size_rule::transformers: element sizes, buffers keep their dtype), accelerators = every key
/// but cpu/disk with a positive budget, buffer = 1.25 x max(largest instance of any no-split
/// class, largest sum of tensors one module owns directly). Measured budgets (max_memory::
/// measured) get Transformers' 90% of the CPU, and of a single GPU. balanced_low_0 by sorted
/// GPU id (§9.5, as in accelerate).
inline max_memory transformers_balanced_memory(plan_context& ctx, const max_memory& mm,
                                               const balanced_options& opt,
                                               fit_report* report = nullptr) {
  max_memory out = mm;
  if (mm.measured)
    if (auto cpu = mm.find(device::cpu()))
      out.set(device::cpu(), byte_size::from_eighths(cpu->eighths() * 9 / 10, true));
  std::vector<int> ids;
  std::size_t n = 0;
  for (const auto& [d, b] : out) {
    if (d.is_cpu() || d.is_disk() || b.eighths() <= 0) continue;
    ++n;
    if (d.is_gpu()) ids.push_back(d.index());
  }
  if (n == 0 || ids.empty()) return out;
  bool low_zero = opt.low_zero;
  if (n == 1) {
    low_zero = false;
    if (mm.measured)
      for (const auto& [d, b] : mm)
        if (d.is_gpu()) {
          out.set(d, byte_size::from_eighths(b.eighths() * 9 / 10, true));
          if (report) report->info.push_back(detail::ninety_percent_note(d));
          break;
        }
  }
  const detail::size_view& sz =
      ctx.size_table(opt.dtype, opt.special_dtypes, size_rule::transformers, opt.quantization,
                     opt.quantized_sizes, opt.output_embeddings);
  const byte_size total = sz.size(0);
  if (low_zero && n < 2) low_zero = false;
  byte_size per_gpu = detail::floor_div(total, static_cast<std::int64_t>(low_zero ? n - 1 : n));
  byte_size biggest_block{};
  if (!opt.no_split.empty()) {
    const auto& inst = ctx.no_split(opt.no_split).instances;
    if (inst.empty() && report)
      report->deviate("transformers",
                      "no module is of a no-split class; Transformers' "
                      "get_balanced_memory raises ValueError (max of nothing)");
    for (auto i : inst) biggest_block = std::max(biggest_block, sz.size(i));
  }
  per_gpu += detail::one_and_a_quarter(std::max(biggest_block, sz.biggest_direct()));
  detail::cap_balanced(out, ids, n, per_gpu, total, low_zero, report);
  return out;
}

inline max_memory transformers_balanced_memory(const module_tree& tree, const max_memory& mm,
                                               const balanced_options& opt,
                                               fit_report* report = nullptr) {
  plan_context ctx(tree);
  return transformers_balanced_memory(ctx, mm, opt, report);
}

namespace detail {

/// One planning run over items (accelerate's infer_auto_device_map with the §9 fixes).
class item_planner {
 public:
  using id = tree_index::id;
  static constexpr std::uint32_t no_slot = 0xffffffffu;

  item_planner(plan_context& ctx, const max_memory& budgets, const plan_options& opt,
               size_rule rule)
      : ctx_(ctx),
        ix_(ctx.index()),
        nodes_(ctx.tree().nodes()),
        budgets_(budgets),
        opt_(opt),
        sz_(ctx.size_table(opt.dtype, opt.special_dtypes, rule, opt.quantization,
                           opt.quantized_sizes, opt.output_embeddings)),
        ns_(ctx.no_split(opt.no_split)),
        layers_(ctx.planning_layers(sz_, ns_)),
        ties_(ctx.ties()),
        w_(ctx.scratch()),
        verbose_(static_cast<bool>(opt.verbose)) {}

  plan_result run();

 private:
  void say(std::string_view line) const {
    if (verbose_) opt_.verbose(line);
  }
  bool is_leaf(id x) const { return !ix_.is_module(x) || !ix_.has_children(x) || ns_.flag[x]; }

  /// The entries a split module is replaced by: its direct parameters, its children and
  /// (unlike accelerate, §9.3) its direct buffers, so they get a device too.
  bool split_kids(id m, std::vector<id>& out) const {
    out.clear();
    for (id x = ix_.first_parameter(m); x < ix_.first_buffer(m); ++x) out.push_back(x);
    for (std::size_t c : nodes_[m].children) out.push_back(static_cast<id>(c));
    for (id x = ix_.first_buffer(m); x < ix_.tensors_end(m); ++x) out.push_back(x);
    return ix_.first_buffer(m) != ix_.tensors_end(m);
  }
  /// The largest layer of module m's subtree (plan_context::planning_layers: m is a root child or
  /// a child of a module planning can split, the only modules planning asks about).
  byte_size layer_max(id m) const noexcept { return layers_.at(m); }
  /// Puts `kids` (in order) at the front of a reversed queue.
  static void push_front(std::vector<id>& q, const std::vector<id>& kids) {
    q.insert(q.end(), kids.rbegin(), kids.rend());
  }

  /// accelerate's get_max_layer_size over the queue (tensors only on the first call), from the
  /// cached subtree maxima. accelerate keeps the names of every layer of that size and drops
  /// those at or below each entry it pops, recomputing when none is left; only their number
  /// matters, so it is kept as a count: a queue entry's subtree holds layer_count() of them
  /// (the queue's entries are disjoint subtrees).
  void compute_max(bool with_tensors) {
    auto& q = w_.queue;
    byte_size best{};
    for (auto it = q.rbegin(); it != q.rend(); ++it) {
      if (ix_.is_module(*it))
        best = std::max(best, layer_max(*it));
      else if (with_tensors)
        best = std::max(best, sz_.size(*it));
    }
    std::size_t count = 0;
    for (const id x : q) {
      if (!ix_.is_module(x)) {
        if (with_tensors && sz_.size(x) == best) ++count;
      } else if (layer_max(x) == best) {
        count += layers_.count(x);
      }
    }
    max_count_ = count;
    tensors_counted_ = with_tensors;
    w_.requeued.clear();
    max_layer_ = best;
  }
  /// An item's order in names: the pre-order position of its module, then the item.
  std::pair<id, id> name_key(id x) const { return {ix_.position(ix_.module_of(x)), x}; }
  /// Drops the largest layers at or below the popped entry x from the count. An entry pushed
  /// back without a recount (it went to the next device, or waits behind a fallback entry) had
  /// its layers dropped when it was popped before.
  void erase_covered(id x) {
    auto& rq = w_.requeued;
    if (auto it = std::find(rq.begin(), rq.end(), x); it != rq.end()) {
      rq.erase(it);
      return;
    }
    std::size_t k = 0;
    if (!ix_.is_module(x))
      k = tensors_counted_ && sz_.size(x) == max_layer_ ? 1 : 0;
    else if (layer_max(x) == max_layer_)
      k = layers_.count(x);
    max_count_ -= std::min(k, max_count_);
  }
  /// Tie groups relevant to entry x (some member strictly inside, not all), with accelerate's
  /// substring test compared for §9.1. Fills w_.tie_params; returns the groups for verbose.
  std::vector<const std::vector<std::string>*> relevant_ties(id x, const std::string& name,
                                                             fit_report* rep) {
    std::vector<const std::vector<std::string>*> groups;
    w_.tie_params.clear();
    const std::string dotted = name + ".";
    for (std::size_t g = 0; g < ties_.groups.size(); ++g) {
      const auto& names = ties_.groups[g];
      const auto& items = ties_.items[g];
      bool any = false, all = true, any_s = false, all_s = true, same = true;
      for (std::size_t k = 0; k < names.size(); ++k) {
        const bool in = items[k] != tree_index::none && ix_.strictly_covers(x, items[k]);
        const bool ins = (names[k] + ".").find(dotted) != std::string::npos;
        any = any || in;
        all = all && in;
        any_s = any_s || ins;
        all_s = all_s && ins;
        same = same && in == ins;
      }
      const bool rel = any && !all, rel_s = any_s && !all_s;
      if (rep && (rel != rel_s || (rel && !same)))
        rep->deviate("§9.1", "tie membership of `" + name +
                                 "` uses a dotted prefix; accelerate's substring test would "
                                 "have matched other names");
      if (!rel) continue;
      groups.push_back(&names);
      for (std::size_t k = 0; k < names.size(); ++k)
        if (!(items[k] != tree_index::none && ix_.strictly_covers(x, items[k])))
          w_.tie_params.push_back(items[k]);
    }
    return groups;
  }

  /// get_module_size_with_ties over a reversed queue (plus `extra` at its back), fixed (§9.4,
  /// §9.2): partners counted once, nothing subtracted, a missing partner adds nothing.
  struct ties_size {
    byte_size total, accelerate_total;
  };
  ties_size size_with_ties(byte_size size, const std::vector<id>& q, id extra) {
    ties_size r{size, size};
    w_.partners.clear();
    w_.unique_partners.clear();
    for (id p : w_.tie_params) {
      if (p == tree_index::none) continue;
      id hit = tree_index::none;
      for (auto it = q.rbegin(); it != q.rend(); ++it)
        if (ix_.strictly_covers(*it, p)) {
          hit = *it;
          break;
        }
      if (hit == tree_index::none && extra != tree_index::none && ix_.strictly_covers(extra, p))
        hit = extra;
      if (hit == tree_index::none) continue;
      w_.partners.push_back(hit);
      r.accelerate_total += sz_.size(hit) - sz_.size(p);
      if (std::find(w_.unique_partners.begin(), w_.unique_partners.end(), hit) ==
          w_.unique_partners.end()) {
        w_.unique_partners.push_back(hit);
        r.total += sz_.size(hit);
      }
    }
    return r;
  }

  std::vector<std::string> partner_names() const {
    std::vector<std::string> v;
    for (id p : w_.partners) v.push_back(ix_.name(p));
    return v;
  }

  void place(id x, device d) {
    // Without ties every item is placed once (each leaves the queue once); with them a tied
    // partner may be placed again, keeping its first position.
    if (ties_.groups.empty()) {
      w_.placed.emplace_back(x, d);
      return;
    }
    auto& slot = w_.slot;
    if (slot[x] == no_slot) {
      slot[x] = static_cast<std::uint32_t>(w_.placed.size());
      w_.placed.emplace_back(x, d);
    } else {
      w_.placed[slot[x]].second = d;
    }
  }
  static void erase_first(std::vector<id>& q, id x) {
    for (auto it = q.end(); it != q.begin();) {
      --it;
      if (*it == x) {
        q.erase(it);
        return;
      }
    }
  }

  bool fallback(byte_size limit, id current, id& found, fit_report& rep);
  device_map build_map();
  device_map build_map_in_order(device_map& map);

  plan_context& ctx_;
  const tree_index& ix_;
  const std::vector<module_node>& nodes_;
  const max_memory& budgets_;
  const plan_options& opt_;
  const size_view& sz_;
  const plan_context::split_info& ns_;
  const plan_context::layer_table& layers_;
  const plan_context::tie_info& ties_;
  plan_scratch& w_;
  bool verbose_;
  byte_size max_layer_;
  std::size_t max_count_ = 0;     // largest layers still in the queue (accelerate's names)
  bool tensors_counted_ = false;  // the count includes tensor entries of the queue
};

/// accelerate's fallback_allocate: the first entry (depth-first through splittable modules)
/// that fits `limit` with its tied partners, made a direct entry of the queue.
inline bool item_planner::fallback(byte_size limit, id current, id& found, fit_report& rep) {
  if (limit.eighths() < 0) return false;  // accelerate: ValueError -> no fallback
  if (limit.is_float())
    rep.deviate("§9.9",
                "fallback allocation with a fractional limit works; accelerate raises "
                "AttributeError");
  auto& search = w_.search;
  search = w_.queue;
  found = tree_index::none;
  const bool tied = !ties_.groups.empty();
  std::vector<id> kids;
  while (!search.empty()) {
    const id e = search.back();
    search.pop_back();
    byte_size total = sz_.size(e);
    if (tied) {
      relevant_ties(e, ix_.name(e), &rep);
      // Partners are looked up in what is still to place, the entry being retried included
      // (accelerate omits it and raises IndexError when it is a partner, §9.2).
      if (!w_.tie_params.empty()) total = size_with_ties(sz_.size(e), search, current).total;
    }
    if (total <= limit) {
      found = e;
      break;
    }
    if (is_leaf(e)) continue;
    split_kids(e, kids);
    push_front(search, kids);
  }
  if (found == tree_index::none) return false;
  // Expand the queue entry holding the found one until it is a direct entry.
  auto& q = w_.queue;
  while (true) {
    auto it = std::find_if(q.begin(), q.end(),
                           [&](id a) { return ix_.is_module(a) && ix_.strictly_covers(a, found); });
    if (it == q.end()) break;
    split_kids(*it, kids);
    it = q.erase(it);
    q.insert(it, kids.rbegin(), kids.rend());
  }
  erase_first(q, found);
  return true;
}

/// The placed entries as a device map, cleaned (accelerate's clean_device_map) on the tree:
/// a module all of whose (at least two) placed keys below share a device replaces them, at the
/// position of its first key; the whole model becomes "" when every key agrees.
inline device_map item_planner::build_map() {
  device_map map;
  const auto& placed = w_.placed;
  if (!opt_.clean_result) {
    map.reserve(placed.size());
    for (const auto& [x, d] : placed) map.append_new(ix_.name(x), d);
    return map;
  }
  auto parent_of = [&](id a) -> id { return ix_.parent(a); };
  // The module whose subtree holds an entry's name strictly: its parent, or a tensor's owner.
  auto base_of = [&](id x) -> id { return ix_.is_module(x) ? parent_of(x) : ix_.module_of(x); };
  bool in_order = true;  // placed in name (pre-)order: every subtree's entries are contiguous
  for (std::size_t pos = 1; pos < placed.size() && in_order; ++pos)
    in_order = name_key(placed[pos - 1].first) < name_key(placed[pos].first);
  if (in_order && !placed.empty() && base_of(placed.front().first) != tree_index::none)
    return build_map_in_order(map);
  // Otherwise per module: entries below, the first one's position and device, mixed devices.
  const std::size_t n = ix_.modules();
  if (w_.below.size() != n) {
    w_.below.assign(n, 0);
    w_.first.assign(n, 0);
    w_.uniform.assign(n, device::cpu());
    w_.mixed.assign(n, 0);
  }
  w_.touched.clear();
  for (std::uint32_t pos = 0; pos < placed.size(); ++pos) {
    const auto [x, d] = placed[pos];
    for (id a = ix_.is_module(x) ? parent_of(x) : ix_.module_of(x); a != tree_index::none;
         a = parent_of(a)) {
      if (w_.below[a] == 0) {
        w_.touched.push_back(a);
        w_.first[a] = pos;
        w_.uniform[a] = d;
      } else if (w_.uniform[a] != d) {
        w_.mixed[a] = 1;
      }
      ++w_.below[a];
    }
  }
  if (w_.below[0] > 1 && !w_.mixed[0]) {
    map.append_new("", w_.uniform[0]);
  } else {
    auto& out = w_.out;
    out.clear();
    for (std::uint32_t pos = 0; pos < placed.size(); ++pos) {
      const id x = placed[pos].first;
      id top = tree_index::none;
      for (id a = ix_.is_module(x) ? parent_of(x) : ix_.module_of(x);
           a != tree_index::none && a != 0; a = parent_of(a))
        if (w_.below[a] > 1 && w_.mixed[a] != 1) top = a;
      if (top == tree_index::none) {
        out.emplace_back(pos, x);
      } else if (w_.mixed[top] != 2) {
        w_.mixed[top] = 2;  // emitted
        out.emplace_back(w_.first[top], top);
      }
    }
    if (!std::is_sorted(out.begin(), out.end())) std::sort(out.begin(), out.end());
    map.reserve(out.size());
    for (const auto& [pos, x] : out)
      map.append_new(ix_.name(x), ix_.is_module(x) && x != placed[pos].first ? w_.uniform[x]
                                                                             : placed[pos].second);
  }
  for (id a : w_.touched) {
    w_.below[a] = 0;
    w_.mixed[a] = 0;
  }
  return map;
}

/// build_map for entries placed in name order (no tied partner or fallback moved one): one
/// sweep with a stack of the current entry's ancestors. Each frame counts the entries below it
/// (and whether they share a device) and is merged into its parent when popped; the output so
/// far is one list in which a frame's entries are the suffix added since it was pushed, so a
/// frame found collapsible when popped replaces that suffix by itself. No per-module table, no
/// walk up every entry's ancestors.
inline device_map item_planner::build_map_in_order(device_map& map) {
  using frame = plan_scratch::map_frame;
  const auto& placed = w_.placed;
  auto& st = w_.frames;
  auto& out = w_.keys;
  out.clear();
  auto& chain = w_.kids;  // ancestors to push, deepest first
  auto pop = [&] {
    const frame f = st.back();
    st.pop_back();
    // Collapsible (not the root): every (at least two) entry below shares one device.
    if (!st.empty() && f.below > 1 && !f.mixed) {
      out.erase(out.begin() + f.out_start, out.end());
      out.push_back({f.first, f.module, f.uniform});
    }
    if (st.empty()) {
      st.push_back(f);  // the root stays, for the whole-model test
      return;
    }
    frame& g = st.back();
    if (g.below == 0) {
      g.first = f.first;
      g.uniform = f.uniform;
      g.mixed = f.mixed;
    } else if (f.mixed || f.uniform != g.uniform) {
      g.mixed = true;
    }
    g.below += f.below;
  };
  st.clear();
  for (std::uint32_t pos = 0; pos < placed.size(); ++pos) {
    const auto [x, d] = placed[pos];
    const id base = ix_.is_module(x) ? ix_.parent(x) : ix_.module_of(x);
    while (!st.empty() && !ix_.in_subtree(st.back().module, base)) pop();
    chain.clear();
    for (id a = base; a != tree_index::none && (st.empty() || a != st.back().module);
         a = ix_.parent(a))
      chain.push_back(a);
    const auto start = static_cast<std::uint32_t>(out.size());
    for (auto it = chain.rbegin(); it != chain.rend(); ++it)
      st.push_back({*it, 0, 0, start, d, false});
    frame& f = st.back();
    if (f.below == 0) {
      f.first = pos;
      f.uniform = d;
    } else if (f.uniform != d) {
      f.mixed = true;
    }
    ++f.below;
    out.push_back({pos, x, d});
  }
  while (st.size() > 1) pop();
  const frame& root = st.back();
  if (root.below > 1 && !root.mixed) {
    map.append_new("", root.uniform);
  } else {
    // Module keys are the nodes' paths (no string built); tensor keys are joined into scratch.
    auto& names = w_.map_names;
    names.clear();
    auto& joined = w_.joined;
    joined.clear();
    for (const auto& k : out)
      if (!ix_.is_module(k.item)) joined.push_back(ix_.name(k.item));
    std::size_t t = 0;
    for (const auto& k : out)
      names.push_back(ix_.is_module(k.item) ? std::string_view(nodes_[k.item].path)
                                            : std::string_view(joined[t++]));
    map.append_new_all(names, [&](std::size_t i) { return out[i].target; });
  }
  return std::move(map);
}

inline plan_result item_planner::run() {
  plan_result res;
  res.budgets = budgets_;
  fit_report& rep = res.report;

  // Devices: budget order, zero-budget accelerators left out (§9.8), then disk.
  std::vector<device> devices;
  std::vector<byte_size> limits;
  devices.reserve(budgets_.size() + 1);
  limits.reserve(budgets_.size() + 1);
  for (const auto& [d, b] : budgets_) {
    if (d.is_accelerator() && b.eighths() == 0) {
      rep.deviate("§9.8", "device " + d.to_string() +
                              " has a zero budget and is not used; accelerate still visits it "
                              "(and keeps it as the main device)");
      continue;
    }
    devices.push_back(d);
    limits.push_back(b);
  }
  if (std::find(devices.begin(), devices.end(), device::disk()) == devices.end()) {
    devices.push_back(device::disk());
    limits.push_back(byte_size{});
  }
  const std::size_t nd = devices.size();
  // Per device, in two allocations: flags (main device, layer reservation recorded) and byte
  // counts (used, buffers of offloaded modules, layer reservation, weights).
  std::vector<char> flags(2 * nd, 0);
  char* const main = flags.data();
  char* const reserved_set = main + nd;
  std::vector<byte_size> counts(4 * nd);
  byte_size* const used = counts.data();
  byte_size* const buffer_bytes = used + nd;
  byte_size* const layer_reserved = buffer_bytes + nd;
  byte_size* const weights = layer_reserved + nd;
  bool any_gpu = false;
  {
    std::size_t first_gpu = devices.size(), mps = devices.size();
    for (std::size_t i = 0; i < devices.size(); ++i) {
      if (devices[i].is_cpu() || devices[i].is_disk()) continue;
      any_gpu = true;
      if (first_gpu == devices.size()) first_gpu = i;
      if (devices[i].is_mps()) mps = i;
    }
    if (mps != devices.size()) {
      main[mps] = 1;
    } else {
      if (first_gpu != devices.size()) main[first_gpu] = 1;
      for (std::size_t i = 0; i < devices.size(); ++i)
        if (devices[i].is_cpu()) main[i] = 1;
    }
  }
  std::vector<std::pair<device, byte_size>> min_needed;

  auto& q = w_.queue;
  q.clear();
  if (q.capacity() == 0) w_.reserve();  // a fresh scratch space: one allocation per list
  w_.placed.clear();
  if (!ties_.groups.empty() && w_.slot.size() != ix_.items()) w_.slot.assign(ix_.items(), no_slot);
  // Root queue: direct parameters, children, direct buffers.
  split_kids(0, w_.kids);
  push_front(q, w_.kids);
  compute_max(true);

  const bool tied = !ties_.groups.empty();
  const bool named = verbose_ || tied;
  rep.placements.reserve(ix_.modules() / 4 + 16);
  const std::size_t step_limit = 64 * (ix_.items() + 16) * (nd + 1);
  std::size_t steps = 0, cur = 0;
  std::string name;
  while (!q.empty()) {
    const id x = q.back();
    q.pop_back();
    if (++steps > step_limit)
      throw placement_error("infer_auto_device_map did not converge (internal error) at `" +
                            ix_.name(x) + "`");
    if (named) name = ix_.name(x);
    if (verbose_) {
      say("");
      say("Treating module " + name + ".");
    }
    erase_covered(x);
    if (max_count_ == 0) compute_max(false);
    const byte_size size = sz_.size(x);

    std::vector<const std::vector<std::string>*> groups;
    w_.tie_params.clear();
    if (tied) groups = relevant_ties(x, name, &rep);
    const bool has_ties = !w_.tie_params.empty();
    if (verbose_ && has_ties) {
      std::vector<std::string> params;
      for (id p : w_.tie_params) params.push_back(ix_.name(p));
      say("  Found the relevant tied param groups " + detail::py_groups(groups));
      say("  So those parameters need to be taken into account " + detail::py_list(params));
    }

    const device dev = devices[cur];
    const bool unlimited = dev.is_disk();
    byte_size limit = limits[cur];
    byte_size reserved{};
    if (!unlimited && main[cur]) {
      if (max_layer_ > limits[cur]) {
        if (max_layer_.eighths() > 0)
          rep.deviate("§9.7", "device " + dev.to_string() + " cannot hold the largest layer (" +
                                  max_layer_.to_python_string() +
                                  " bytes) and reserves nothing for it; accelerate reserves it "
                                  "anyway and leaves the device unused");
      } else {
        limit -= max_layer_;
        reserved = max_layer_;
      }
    }
    ties_size ts{size, size};
    w_.partners.clear();
    if (has_ties) {
      ts = size_with_ties(size, q, tree_index::none);
      if (ts.accelerate_total != ts.total)
        rep.deviate("§9.4", "`" + name + "` with its tied partners needs " +
                                ts.total.to_python_string() + " bytes; accelerate counts " +
                                ts.accelerate_total.to_python_string());
      if (w_.partners.size() != w_.tie_params.size())
        rep.deviate("§9.2", "a tied partner of `" + name +
                                "` is not in the queue (shared or already placed); accelerate "
                                "raises IndexError");
    }
    byte_size& u = used[cur];

    // (A) it fits with its tied partners.
    if (unlimited || u + ts.total <= limit) {
      if (verbose_) {
        std::string line = "Putting " + name;
        line += w_.partners.empty() ? " (size=" + size.to_python_string() + ")"
                                    : " and " + detail::py_list(partner_names());
        if (!unlimited) line += " (available=" + (limit - u).to_python_string() + ")";
        say(line + " on " + dev.to_string() + ".");
      }
      u += ts.total;
      weights[cur] += ts.total;
      place(x, dev);
      static const std::string fits = "fits", fits_tied = "fits with its tied partners";
      const std::string& why = w_.partners.empty() ? fits : fits_tied;
      if (named)
        rep.placements.emplace_back(name, dev, ts.total, why);
      else if (ix_.is_module(x))
        rep.placements.emplace_back(nodes_[x].path, dev, ts.total, why);  // one copy of the name
      else
        rep.placements.emplace_back(ix_.name(x), dev, ts.total, why);
      for (id tn : w_.partners) {
        erase_first(q, tn);
        place(tn, dev);
        rep.placements.push_back(
            {ix_.name(tn), dev, byte_size{}, "tied to " + name + " (counted there)"});
      }
      if (!opt_.offload_buffers && ix_.is_module(x) && sz_.any_buffers())
        buffer_bytes[cur] += sz_.buffers(x);
      continue;
    }

    // (B) alone it fits, not with its partners: split a partner.
    if (has_ties && u + size <= limit) {
      if (verbose_)
        say("Not enough space on " + dev.to_string() + " to put " + name + " and " +
            detail::py_list(partner_names()) + " (space available " +
            (limit - u).to_python_string() + ", needed size " + ts.total.to_python_string() + ").");
      bool split = false;
      const std::vector<id> partners = w_.partners;
      for (id te : partners) {
        if (is_leaf(te)) continue;
        if (verbose_) say("Splitting " + ix_.name(te) + ".");
        if (split_kids(te, w_.kids))
          rep.deviate("§9.3", "split module `" + ix_.name(te) +
                                  "` keeps its direct buffers in the queue; accelerate drops them");
        auto it = std::find(q.begin(), q.end(), te);
        if (it != q.end()) {
          it = q.erase(it);
          q.insert(it, w_.kids.rbegin(), w_.kids.rend());
        }
        q.push_back(x);
        compute_max(false);
        split = true;
        break;
      }
      if (split) continue;
      if (verbose_) say("None of the tied module can be split, going to the next device.");
    }

    // (C) the entry itself does not fit (an exact fit lands here too, as in accelerate).
    if (unlimited || u + size >= limit) {
      const bool leaf = is_leaf(x);
      if (verbose_)
        say("Not enough space on " + dev.to_string() + " to put " + name + " (space available " +
            (limit - u).to_python_string() + ", module size " + size.to_python_string() + ").");
      if (leaf) {
        if (verbose_) say("This module cannot be split, going to the next device.");
      } else {
        if (verbose_) say("Splitting " + name + ".");
        if (split_kids(x, w_.kids))
          rep.deviate("§9.3", "split module `" + ix_.name(x) +
                                  "` keeps its direct buffers in the queue; accelerate drops them");
        push_front(q, w_.kids);
        compute_max(false);
        continue;
      }
    }

    // (D) fallback: the device is still empty, try any smaller entry.
    if (u.eighths() == 0 && opt_.fallback_allocation && !unlimited) {
      const byte_size limit2 = limits[cur] - std::max(max_layer_, ts.total);
      id f = tree_index::none;
      if (fallback(limit2, x, f, rep)) {
        q.push_back(x);
        w_.requeued.push_back(x);
        q.push_back(f);
        continue;
      }
    }

    // (E) give up on this device.
    if (u.eighths() == 0) min_needed.emplace_back(dev, ts.total + reserved);
    u += reserved;
    layer_reserved[cur] = reserved;
    reserved_set[cur] = 1;
    ++cur;
    q.push_back(x);
    w_.requeued.push_back(x);
  }

  res.map = build_map();
  if (!ties_.groups.empty())
    for (const auto& [x, d] : w_.placed) w_.slot[x] = no_slot;

  // Buffer check: buffers of CPU/disk-placed modules stay resident on the execution device.
  if (!opt_.offload_buffers) {
    byte_size need{};
    for (std::size_t i = 0; i < nd; ++i)
      if (devices[i].is_cpu() || devices[i].is_disk()) need += buffer_bytes[i];
    if (need.eighths() > 0) {
      bool fits_any = false;
      for (const auto& [d, b] : budgets_) {
        if (d.is_cpu() || d.is_disk()) continue;
        byte_size ud{};
        for (std::size_t i = 0; i < nd; ++i)
          if (devices[i] == d) ud = used[i];
        if (b >= need + ud) fits_any = true;
      }
      if (any_gpu && !fits_any)
        rep.warnings.push_back("Current model requires " + need.to_python_string() +
                               " bytes of buffer for offloaded layers, which seems does not fit "
                               "any GPU's remaining memory. If you are experiencing a OOM later, "
                               "please consider using offload_buffers=True.");
    }
  }
  if (!min_needed.empty()) {
    std::string s =
        "Based on the current allocation process, no modules could be assigned to the following "
        "devices due to insufficient memory:\n";
    for (const auto& [d, b] : min_needed)
      s += "  - " + d.to_string() + ": " + b.to_python_string() + " bytes required\n";
    s += "These minimum requirements are specific to this allocation attempt and may vary. "
         "Consider increasing the available memory for these devices to at least the specified "
         "minimum, or adjusting the model config.";
    rep.info.push_back(std::move(s));
  }

  // Usage per device (weights as placed, not counting the layer reservation).
  rep.devices.reserve(nd);
  for (std::size_t i = 0; i < nd; ++i) {
    const device d = devices[i];
    device_usage du{d, std::nullopt, weights[i], {}, {}};
    if (!d.is_disk())
      if (auto b = budgets_.find(d)) du.budget = *b;
    if (reserved_set[i]) du.reserved_layer = layer_reserved[i];
    if (du.weights.eighths() > 0 || du.budget) rep.devices.push_back(du);
  }
  if (!opt_.allow_disk_offload) {
    byte_size on_disk{};
    std::string first;
    for (const auto& p : rep.placements)
      if (p.target.is_disk()) {
        on_disk += p.size;
        if (first.empty()) first = p.name;
      }
    if (on_disk.eighths() > 0) {
      std::string where;
      for (const auto& [d, b] : min_needed)
        where += (where.empty() ? "" : ", ") + d.to_string() + " needs at least " +
                 b.to_python_string() + " bytes (budget " + budgets_.at(d).to_python_string() + ")";
      throw placement_error(
          "the model does not fit without disk offload: " + on_disk.to_python_string() +
          " more bytes (starting with `" + first + "`) need room on a GPU or the CPU" +
          (where.empty() ? std::string() : "; " + where));
    }
  }
  return res;
}

/// infer_auto_device_map under a size rule (the Transformers rule for placement::auto_).
inline plan_result plan_items(plan_context& ctx, const max_memory& budgets, const plan_options& opt,
                              size_rule rule) {
  return item_planner(ctx, budgets, opt, rule).run();
}

}  // namespace detail

/// accelerate's infer_auto_device_map on explicit budgets (no measuring). Sequential over the
/// devices in budget order, then "disk". Departures from accelerate (§9), each recorded in
/// report.deviations when it changes anything: tie membership by dotted prefix (§9.1), shared
/// or already-placed partners do not crash (§9.2), a split module's own buffers are placed
/// (§9.3), tied partners counted once (§9.4), a main device that cannot hold the largest layer
/// reserves nothing for it (§9.7), zero-budget GPUs are not used (§9.8), fractional limits work
/// in the fallback (§9.9). With a plan_context, everything that depends only on the tree is
/// computed once for all plans.
inline plan_result infer_auto_device_map(plan_context& ctx, const max_memory& budgets,
                                         const plan_options& opt) {
  return detail::plan_items(ctx, budgets, opt, size_rule::accelerate);
}

/// The same planner with sizes counted by `rule`: size_rule::transformers gives Transformers
/// v5's infer_auto_device_map (element sizes, buffers in their own dtype; tied partners counted
/// once, as the planner always does).
inline plan_result infer_auto_device_map(plan_context& ctx, const max_memory& budgets,
                                         const plan_options& opt, size_rule rule) {
  return detail::plan_items(ctx, budgets, opt, rule);
}

inline plan_result infer_auto_device_map(const module_tree& tree, const max_memory& budgets,
                                         const plan_options& opt) {
  plan_context ctx(tree);
  return infer_auto_device_map(ctx, budgets, opt);
}

}  // namespace stowage
