// stowage/placement/policies.hpp: the compile-time placement policies (sequential, balanced,
// balanced_low_0, auto_), the placement_policy concept a user's own type satisfies, the runtime
// name -> policy mapping for command lines, and infer_device_map<Policy>(model, budgets,
// options), which also applies regex overrides and runtime-memory reservations around the
// policy and returns a fit report.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/placement/max_memory.hpp>
#include <stowage/placement/planner.hpp>

#include <concepts>
#include <functional>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace stowage {

/// A placement policy: turns (module tree, budgets, options) into a device map.
template <class P>
concept placement_policy = std::default_initializable<P> &&
    requires(const P& p, const module_tree& t, const max_memory& m, const plan_options& o) {
  { p.plan(t, m, o) } -> std::convertible_to<device_map>;
};

/// The class names of module types, for plan_options::no_split:
/// `{.no_split = stowage::no_split<models::llama_decoder_layer>}`.
template <class... T>
  requires(!module_class_name_v<T>.empty() && ...)
inline const std::vector<std::string> no_split = {std::string(module_class_name_v<T>)...};

/// A policy that can also plan through a plan_context (the built-in ones): repeated planning of
/// one tree reuses what depends only on the tree.
template <class P>
concept context_policy = placement_policy<P> &&
    requires(const P& p, plan_context& c, const max_memory& m, const plan_options& o) {
  { p.plan(c, m, o) } -> std::same_as<plan_result>;
};

namespace placement {

/// accelerate's "sequential": the budgets as given; fills GPU 0, then 1, ..., then CPU, disk.
struct sequential {
  static constexpr std::string_view name = "sequential";
  plan_result plan(plan_context& c, const max_memory& m, const plan_options& o) const {
    return infer_auto_device_map(c, m, o);
  }
  plan_result plan(const module_tree& t, const max_memory& m, const plan_options& o) const {
    plan_context c(t);
    return plan(c, m, o);
  }
};

namespace detail {
inline void merge_notes(plan_result& r, fit_report& notes) {
  r.report.info.insert(r.report.info.begin(), notes.info.begin(), notes.info.end());
  for (auto& d : notes.deviations) r.report.deviate(d.item, d.message);
}
/// The balanced-budget options of a plan (same sizes: dtype, special dtypes, quantization).
inline balanced_options balanced_from(const plan_options& o, bool low_zero) {
  balanced_options b{o.no_split, o.dtype, o.special_dtypes, low_zero};
  b.quantization = o.quantization;
  b.quantized_sizes = o.quantized_sizes;
  b.output_embeddings = o.output_embeddings;
  return b;
}
inline plan_result balanced_plan(plan_context& c, const max_memory& m, const plan_options& o,
                                 bool low_zero) {
  fit_report notes;
  const max_memory b = get_balanced_memory(c, m, balanced_from(o, low_zero), &notes);
  plan_result r = infer_auto_device_map(c, b, o);
  merge_notes(r, notes);
  return r;
}
}  // namespace detail

/// accelerate's "balanced": GPU budgets lowered so the model spreads evenly over the GPUs.
struct balanced {
  static constexpr std::string_view name = "balanced";
  plan_result plan(plan_context& c, const max_memory& m, const plan_options& o) const {
    return detail::balanced_plan(c, m, o, false);
  }
  plan_result plan(const module_tree& t, const max_memory& m, const plan_options& o) const {
    plan_context c(t);
    return plan(c, m, o);
  }
};

/// accelerate's "balanced_low_0": like balanced, with the first GPU kept as free as possible
/// (room for generation there).
struct balanced_low_0 {
  static constexpr std::string_view name = "balanced_low_0";
  plan_result plan(plan_context& c, const max_memory& m, const plan_options& o) const {
    return detail::balanced_plan(c, m, o, true);
  }
  plan_result plan(const module_tree& t, const max_memory& m, const plan_options& o) const {
    plan_context c(t);
    return plan(c, m, o);
  }
};

/// What Transformers' from_pretrained(device_map="auto") resolves to (v5,
/// transformers.integrations.accelerate._get_device_map): Transformers' own balanced budgets
/// (transformers_balanced_memory: sizes by element size with buffers in their own dtype, buffer
/// from the largest no-split instance and the largest directly owned tensors, no allocator
/// slack), then the planner on those sizes (size_rule::transformers). Tied partners count once
/// (as Transformers does), and the planner's other §9 fixes apply.
struct auto_ {
  static constexpr std::string_view name = "auto";
  plan_result plan(plan_context& c, const max_memory& m, const plan_options& o) const {
    fit_report notes;
    const max_memory b =
        transformers_balanced_memory(c, m, detail::balanced_from(o, false), &notes);
    plan_result r = stowage::detail::plan_items(c, b, o, size_rule::transformers);
    detail::merge_notes(r, notes);
    return r;
  }
  plan_result plan(const module_tree& t, const max_memory& m, const plan_options& o) const {
    plan_context c(t);
    return plan(c, m, o);
  }
};

/// The run-time names, for command lines and JSON. Never the other way round: code picks a type.
enum class strategy { auto_, balanced, balanced_low_0, sequential };

inline strategy parse_strategy(std::string_view s) {
  if (s == "auto") return strategy::auto_;
  if (s == "balanced") return strategy::balanced;
  if (s == "balanced_low_0") return strategy::balanced_low_0;
  if (s == "sequential") return strategy::sequential;
  throw placement_error(
      "If passing a string for `device_map`, please choose 'auto', 'balanced', "
      "'balanced_low_0' or 'sequential' (got \"" +
      std::string(s) + "\").");
}

}  // namespace placement

static_assert(placement_policy<placement::sequential>,
              "placement::sequential must satisfy placement_policy: plan(tree, budgets, options)");
static_assert(placement_policy<placement::balanced>,
              "placement::balanced must satisfy placement_policy: plan(tree, budgets, options)");
static_assert(
    placement_policy<placement::balanced_low_0>,
    "placement::balanced_low_0 must satisfy placement_policy: plan(tree, budgets, options)");
static_assert(placement_policy<placement::auto_>,
              "placement::auto_ must satisfy placement_policy: plan(tree, budgets, options)");

namespace detail {

/// Which tensors the overrides pin, and where (tie groups kept together).
inline std::unordered_map<std::string, device> resolve_overrides(
    const module_tree& tree, const std::vector<placement_override>& ovs) {
  std::unordered_map<std::string, device> pinned;
  if (ovs.empty()) return pinned;
  std::vector<std::regex> res;
  for (const auto& o : ovs) {
    try {
      res.emplace_back(o.pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw placement_error("override /" + o.pattern +
                            "/: invalid regular expression: " + e.what());
    }
  }
  auto visit = [&](const std::string& full) {
    for (std::size_t i = 0; i < res.size(); ++i)
      if (std::regex_match(full, res[i])) {
        pinned.emplace(full, ovs[i].target);
        return;
      }
  };
  tree.for_each_parameter([&](std::string full, const tensor_entry&) { visit(full); });
  tree.for_each_buffer([&](std::string full, const tensor_entry&) { visit(full); });
  for (const auto& g : tree.tied_parameters()) {
    std::optional<device> d;
    for (const auto& p : g)
      if (auto it = pinned.find(p); it != pinned.end()) {
        if (d && *d != it->second)
          throw placement_error("overrides put tied parameters of group `" + g.front() +
                                "` on different devices (" + d->to_string() + " and " +
                                it->second.to_string() + ")");
        d = it->second;
      }
    if (d)
      for (const auto& p : g) pinned.insert_or_assign(p, *d);
  }
  return pinned;
}

/// A copy of the tree without the pinned tensors; modules left without tensors by that are
/// dropped (tensor-free modules of the original stay, as accelerate places them).
inline module_tree tree_without(const module_tree& tree,
                                const std::unordered_map<std::string, device>& pinned,
                                std::unordered_set<std::string>& touched) {
  // Modules whose subtree holds a pinned tensor, and whether anything unpinned remains there.
  std::vector<char> has_pinned(tree.size(), 0), has_free(tree.size(), 0);
  for (std::size_t i : tree.preorder()) {
    const auto& n = tree.node(i);
    bool p = false, f = false;
    for (const auto* list : {&n.parameters, &n.buffers})
      for (const auto& t : *list) (pinned.count(join_name(n.path, t.name)) ? p : f) = true;
    for (std::size_t a = i; a != module_tree::npos; a = tree.node(a).parent) {
      if (p) has_pinned[a] = 1;
      if (f) has_free[a] = 1;
    }
  }
  for (std::size_t i = 0; i < tree.size(); ++i)
    if (has_pinned[i]) touched.insert(tree.node(i).path);
  module_tree out(tree.root().class_name);
  std::vector<std::size_t> map(tree.size(), module_tree::npos);
  map[0] = 0;
  for (std::size_t i : tree.preorder()) {
    const auto& n = tree.node(i);
    if (i != 0) {
      if (map[n.parent] == module_tree::npos) continue;
      if (has_pinned[i] && !has_free[i]) continue;  // emptied by the overrides
      map[i] = out.add_child(map[n.parent], n.name, n.class_name);
    }
    for (const auto& p : n.parameters)
      if (!pinned.count(join_name(n.path, p.name))) out.add_parameter(map[i], p);
    for (const auto& b : n.buffers)
      if (!pinned.count(join_name(n.path, b.name))) out.add_buffer(map[i], b);
  }
  for (const auto& g : tree.tied_parameters()) {
    std::vector<std::string> rest;
    for (const auto& p : g)
      if (!pinned.count(p)) rest.push_back(p);
    if (rest.size() > 1) out.tie(std::move(rest));
  }
  return out;
}

/// Replaces map keys that cover pinned tensors by keys for what they cover minus those tensors.
inline void expand_around(const module_tree& tree, device_map& map,
                          const std::unordered_map<std::string, device>& pinned,
                          const std::unordered_set<std::string>& touched) {
  std::vector<std::pair<std::string, device>> todo;
  for (const auto& [k, d] : map)
    if (touched.count(k)) todo.emplace_back(k, d);
  std::function<void(std::size_t, device)> expand = [&](std::size_t m, device d) {
    const auto& n = tree.node(m);
    for (const auto* list : {&n.parameters, &n.buffers})
      for (const auto& t : *list) {
        const std::string full = join_name(n.path, t.name);
        if (!pinned.count(full)) map.set(full, d);
      }
    for (std::size_t c : n.children) {
      const auto& cp = tree.node(c).path;
      if (touched.count(cp))
        expand(c, d);
      else
        map.set(cp, d);
    }
  };
  for (const auto& [k, d] : todo) {
    map.erase(k);
    if (auto m = tree.find_module(k)) expand(*m, d);
  }
  for (const auto& [name, d] : pinned) map.set(name, d);
}

/// KV-cache bytes per token of one layer: the outputs of its k_proj and v_proj.
inline std::int64_t derived_kv_bytes(const module_tree& tree, std::size_t layer,
                                     std::optional<dtype> target) {
  std::int64_t bytes = 0;
  std::vector<std::size_t> stack{layer};
  while (!stack.empty()) {
    const auto& n = tree.node(stack.back());
    stack.pop_back();
    if (n.name == "k_proj" || n.name == "v_proj")
      for (const auto& p : n.parameters)
        if (p.name == "weight" && p.shape.rank() >= 1) {
          const dtype d = target ? *target : p.dtype;
          bytes += p.shape[0] * std::max<std::int64_t>(1, accelerate_size_eighths(d) / 8);
        }
    for (std::size_t c : n.children) stack.push_back(c);
  }
  return bytes;
}

/// Weights per device of any map, for policies that return a bare device_map.
inline fit_report make_fit_report(const module_tree& tree, const device_map& map,
                                  const max_memory& budgets, const plan_options& o) {
  fit_report r;
  const auto sizes = compute_module_sizes(tree, o.dtype, o.special_dtypes);
  std::unordered_map<device, byte_size, device_hash> per;
  for (const auto& [name, s] : sizes.entries()) {
    if (!tree.find_tensor(name)) continue;
    if (auto d = map.device_for(name)) per[*d] += s;
  }
  for (const auto& [k, d] : map) r.placements.push_back({k, d, sizes[k], "policy"});
  for (const auto& [d, b] : budgets)
    r.devices.push_back(
        {d, d.is_disk() ? std::nullopt : std::optional<byte_size>(b), per[d], {}, {}});
  for (const auto& [d, w] : per)
    if (!budgets.contains(d)) r.devices.push_back({d, std::nullopt, w, {}, {}});
  return r;
}

}  // namespace detail

/// Plans a device map with policy `Policy`: overrides are pinned first (their bytes taken from
/// the budgets), runtime memory is reserved (activation workspace off every accelerator's
/// budget, KV cache added to every no-split layer), then the policy places the rest.
template <placement_policy Policy>
plan_result infer_device_map(plan_context& ctx, const max_memory& budgets,
                             const plan_options& options = {}, const Policy& policy = {}) {
  const module_tree& tree = ctx.tree();
  // The common case: nothing to pin or reserve; a built-in policy plans on the context.
  if constexpr (context_policy<Policy>)
    if (options.overrides.empty() && !options.runtime.active()) {
      plan_result r = policy.plan(ctx, budgets, options);
      r.budgets = budgets;
      return r;
    }
  max_memory b = budgets;
  const module_tree* work = &tree;
  std::optional<module_tree> reduced;
  std::unordered_map<std::string, device> pinned;
  std::unordered_set<std::string> touched;
  std::vector<std::string> runtime_notes;

  if (!options.overrides.empty()) {
    pinned = detail::resolve_overrides(tree, options.overrides);
    if (!pinned.empty()) {
      const auto sizes = compute_module_sizes(tree, options.dtype, options.special_dtypes);
      std::unordered_map<device, byte_size, device_hash> taken;
      for (const auto& [name, d] : pinned) taken[d] += sizes[name];
      for (const auto& [d, bytes] : taken) {
        if (d.is_disk()) continue;
        auto have = b.find(d);
        if (!have)
          throw placement_error("an override puts tensors on device " + d.to_string() +
                                ", which has no budget in max_memory");
        if (bytes > *have)
          throw placement_error("overrides put " + bytes.to_python_string() + " bytes on device " +
                                d.to_string() + " whose budget is " + have->to_python_string() +
                                ": " + (bytes - *have).to_python_string() + " more bytes needed");
        b.set(d, *have - bytes);
      }
      reduced = detail::tree_without(tree, pinned, touched);
      work = &*reduced;
    }
  }

  const auto& rt = options.runtime;
  if (rt.active()) {
    if (rt.activation_workspace > 0)
      for (const auto& [d, have] : max_memory(b)) {
        if (!d.is_accelerator() || have.eighths() == 0) continue;
        if (byte_size(rt.activation_workspace) > have)
          throw placement_error("device " + d.to_string() + ": the activation workspace of " +
                                std::to_string(rt.activation_workspace) +
                                " bytes exceeds its budget of " + have.to_python_string() + "; " +
                                (byte_size(rt.activation_workspace) - have).to_python_string() +
                                " more bytes needed");
        b.set(d, have - byte_size(rt.activation_workspace));
      }
    if (rt.batch_size > 0 && rt.context_length > 0) {
      if (options.no_split.empty())
        throw placement_error(
            "runtime memory: the KV cache is reserved per layer, so plan_options"
            "::no_split must name the layer class");
      if (!reduced) reduced = tree;
      work = &*reduced;
      std::vector<std::size_t> layers;
      for (std::size_t i : reduced->preorder())
        if (is_no_split(*reduced, i, options.no_split)) layers.push_back(i);
      for (std::size_t l : layers) {
        const std::int64_t per_token =
            rt.kv_bytes_per_token_per_layer > 0
                ? rt.kv_bytes_per_token_per_layer
                : 2 * detail::derived_kv_bytes(*reduced, l, options.dtype);
        const std::int64_t bytes = per_token * rt.batch_size * rt.context_length;
        if (bytes > 0)
          reduced->add_buffer(l,
                              tensor_entry{"stowage_kv_cache", shape{bytes}, dtype::uint8, false});
      }
      runtime_notes.push_back("runtime: KV cache for batch " + std::to_string(rt.batch_size) +
                              " x context " + std::to_string(rt.context_length) +
                              " added to each of " + std::to_string(layers.size()) + " layers");
    }
  }

  plan_result r;
  if constexpr (context_policy<Policy>) {
    if (work == &tree) {
      r = policy.plan(ctx, b, options);
    } else {
      plan_context reduced_ctx(*work);
      r = policy.plan(reduced_ctx, b, options);
    }
  } else if constexpr (std::same_as<std::remove_cvref_t<decltype(policy.plan(*work, b, options))>,
                                    plan_result>) {
    r = policy.plan(*work, b, options);
  } else {
    r.map = policy.plan(*work, b, options);
    r.budgets = b;
    r.report = detail::make_fit_report(*work, r.map, b, options);
  }
  // The synthetic KV buffers never appear as keys (layers are not split).
  if (rt.batch_size > 0 && rt.context_length > 0) {
    std::vector<std::string> synthetic;
    for (const auto& [k, d] : r.map)
      if (k.ends_with("stowage_kv_cache")) synthetic.push_back(k);
    for (const auto& k : synthetic) r.map.erase(k);
  }
  if (!pinned.empty()) {
    detail::expand_around(tree, r.map, pinned, touched);
    if (options.clean_result) r.map = clean_device_map(r.map);
    for (const auto& o : options.overrides)
      for (const auto& [name, d] : pinned)
        if (std::regex_match(name, std::regex(o.pattern)))
          r.report.placements.push_back({name, d, {}, "override /" + o.pattern + "/"});
  }
  for (auto& n : runtime_notes) r.report.info.push_back(std::move(n));
  if (rt.activation_workspace > 0)
    for (auto& du : r.report.devices)
      if (du.target.is_accelerator()) du.reserved_runtime = byte_size(rt.activation_workspace);
  r.budgets = budgets;
  if (!std::same_as<Policy, placement::sequential> && !std::same_as<Policy, placement::balanced> &&
      !std::same_as<Policy, placement::balanced_low_0> && !std::same_as<Policy, placement::auto_>)
    validate_device_map(tree, r.map);  // a user's policy: check it covers the model
  else if (!pinned.empty())
    validate_device_map(tree, r.map);
  return r;
}

/// Plans a tree once (see the plan_context overload to plan the same tree repeatedly).
template <placement_policy Policy>
plan_result infer_device_map(const module_tree& tree, const max_memory& budgets,
                             const plan_options& options = {}, const Policy& policy = {}) {
  plan_context ctx(tree);
  return infer_device_map<Policy>(ctx, budgets, options, policy);
}

/// Typed models: planned through their module tree.
template <placement_policy Policy, module_type Model>
plan_result infer_device_map(const Model& model, const max_memory& budgets,
                             const plan_options& options = {}, const Policy& policy = {}) {
  return infer_device_map<Policy>(to_module_tree(model), budgets, options, policy);
}

/// The run-time form on a plan_context, for planning one tree repeatedly.
inline plan_result infer_device_map(std::string_view strategy, plan_context& ctx,
                                    const max_memory& budgets, const plan_options& options = {}) {
  switch (placement::parse_strategy(strategy)) {
    case placement::strategy::auto_:
      return infer_device_map<placement::auto_>(ctx, budgets, options);
    case placement::strategy::balanced:
      return infer_device_map<placement::balanced>(ctx, budgets, options);
    case placement::strategy::balanced_low_0:
      return infer_device_map<placement::balanced_low_0>(ctx, budgets, options);
    case placement::strategy::sequential:
      return infer_device_map<placement::sequential>(ctx, budgets, options);
  }
  throw placement_error("unknown placement strategy");
}

/// The run-time form, for command lines: "auto", "balanced", "balanced_low_0", "sequential".
inline plan_result infer_device_map(std::string_view strategy, const module_tree& tree,
                                    const max_memory& budgets, const plan_options& options = {}) {
  switch (placement::parse_strategy(strategy)) {
    case placement::strategy::auto_:
      return infer_device_map<placement::auto_>(tree, budgets, options);
    case placement::strategy::balanced:
      return infer_device_map<placement::balanced>(tree, budgets, options);
    case placement::strategy::balanced_low_0:
      return infer_device_map<placement::balanced_low_0>(tree, budgets, options);
    case placement::strategy::sequential:
      return infer_device_map<placement::sequential>(tree, budgets, options);
  }
  throw placement_error("unknown placement strategy");
}

}  // namespace stowage
