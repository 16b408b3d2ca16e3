// stowage/placement/planner.hpp: accelerate's infer_auto_device_map (with its fallback
// allocation) and get_balanced_memory, re-implemented on module_tree. Same maps, same verbose
// lines, same warnings and info logs as accelerate on the same inputs, except where accelerate
// has a bug listed in §9 of the spec: there the planner does the right thing and records a
// `deviation` naming the §9 item, so a caller (and the conformance tests) can tell.
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

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
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

using work_queue = std::deque<tree_entry>;

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

/// Entries a split module is replaced by: its direct parameters, its children and (unlike
/// accelerate, §9.3) its direct buffers, so they get a device too.
inline std::vector<tree_entry> split_entries(const module_tree& tree, const tree_entry& e,
                                             bool* had_buffers = nullptr) {
  std::vector<tree_entry> kids;
  const auto& n = tree.node(e.module);
  for (const auto& p : n.parameters) kids.push_back({join_name(e.name, p.name), module_tree::npos});
  for (std::size_t c : n.children) kids.push_back({join_name(e.name, tree.node(c).name), c});
  for (const auto& b : n.buffers) kids.push_back({join_name(e.name, b.name), module_tree::npos});
  if (had_buffers) *had_buffers = !n.buffers.empty();
  return kids;
}

inline std::vector<tree_entry> module_entries(const work_queue& q) {
  std::vector<tree_entry> out;
  for (const auto& e : q)
    if (e.is_module()) out.push_back(e);
  return out;
}

/// Tie groups relevant to an entry: some member inside it, not all. Membership is a dotted
/// prefix test; accelerate tests a substring (§9.1), recorded when that would differ.
struct tie_view {
  std::vector<const std::vector<std::string>*> groups;
  std::vector<std::string> params;  ///< members outside the entry, in group order
};

inline tie_view relevant_ties(std::string_view name,
                              const std::vector<std::vector<std::string>>& tied,
                              fit_report* report) {
  tie_view v;
  if (tied.empty()) return v;
  const std::string dotted = std::string(name) + ".";
  auto inside = [&](const std::string& p) { return covers(name, p) && p.size() > name.size(); };
  auto inside_substr = [&](const std::string& p) {
    return (p + ".").find(dotted) != std::string::npos;
  };
  for (const auto& g : tied) {
    bool any = false, all = true, any_s = false, all_s = true;
    for (const auto& p : g) {
      const bool in = name.empty() ? true : inside(p);
      any = any || in;
      all = all && in;
      const bool ins = inside_substr(p);
      any_s = any_s || ins;
      all_s = all_s && ins;
    }
    const bool rel = any && !all;
    const bool rel_s = any_s && !all_s;
    bool same_members = rel == rel_s;
    if (rel && rel_s)
      for (const auto& p : g) same_members = same_members && (inside(p) == inside_substr(p));
    if (!same_members && report)
      report->deviate("§9.1", "tie membership of `" + std::string(name) +
                                  "` uses a dotted prefix; accelerate's substring test would "
                                  "have matched other names");
    if (!rel) continue;
    v.groups.push_back(&g);
    for (const auto& p : g)
      if (!inside(p)) v.params.push_back(p);
  }
  return v;
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
};

/// accelerate's get_balanced_memory: lowers every GPU budget but the last to about
/// total / n + a buffer so the model spreads over the GPUs. Fixed against accelerate: the
/// no-split buffer is the largest instance of each class, not the first (§9.6); balanced_low_0
/// uses the sorted GPU ids, not positions (§9.5); a "disk" key is accepted (§9.10).
inline max_memory get_balanced_memory(const module_tree& tree, const max_memory& mm,
                                      const balanced_options& opt, fit_report* report = nullptr,
                                      const module_sizes* precomputed = nullptr) {
  max_memory out = mm;
  std::vector<int> ids;  // GPUs with a positive budget, sorted
  for (const auto& [d, b] : mm)
    if (d.is_gpu() && b.eighths() > 0) ids.push_back(d.index());
  const bool has_disk = mm.contains(device::disk());
  if (has_disk && report)
    report->deviate("§9.10", "a \"disk\" budget is accepted; accelerate raises RuntimeError");
  const std::size_t n = ids.size();
  if (n == 0) return out;
  bool low_zero = opt.low_zero;
  if (n == 1) {
    low_zero = false;
    if (mm.measured) {
      const device first = device::gpu(ids.front());
      const byte_size b = mm.at(first);
      // Python: budget * 0.9 (a float); kept to the eighth of a byte.
      out.set(first, byte_size::from_eighths(b.eighths() * 9 / 10, true));
      if (report)
        report->info.push_back("We will use 90% of the memory on device " + first.to_string() +
                               " for storing the model, and 10% for the buffer to avoid OOM. "
                               "You can set `max_memory` in to a higher value to use more memory "
                               "(at your own risk).");
    }
  }
  std::optional<module_sizes> own_sizes;
  if (!precomputed) own_sizes = compute_module_sizes(tree, opt.dtype, opt.special_dtypes);
  const module_sizes& sizes = precomputed ? *precomputed : *own_sizes;
  const byte_size total = sizes.total();
  const std::int64_t parts = static_cast<std::int64_t>(low_zero ? n - 1 : n);
  // Python floor division of a (maybe float) size.
  auto floor_div = [](byte_size v, std::int64_t k) {
    const std::int64_t whole = v.floor_bytes();
    std::int64_t q = whole / k;
    if (v.is_float()) {
      const double x = v.bytes() / static_cast<double>(k);
      q = static_cast<std::int64_t>(x >= 0 ? x : x - 1);
      return byte_size::from_eighths(q * 8, true);
    }
    return byte_size(q);
  };
  byte_size per_gpu = floor_div(total, parts);

  byte_size buffer{};
  if (!opt.no_split.empty()) {
    std::map<std::string, byte_size> first_seen, largest;
    for (std::size_t i : tree.preorder()) {
      if (i == 0) continue;
      const auto& node = tree.node(i);
      if (std::find(opt.no_split.begin(), opt.no_split.end(), node.class_name) ==
          opt.no_split.end())
        continue;
      if (!sizes.contains(node.path)) continue;
      const byte_size s = sizes[node.path];
      first_seen.emplace(node.class_name, s);
      auto [it, fresh] = largest.emplace(node.class_name, s);
      if (!fresh && s > it->second) it->second = s;
    }
    byte_size acc_buffer{}, fixed_buffer{};
    for (const auto& [c, s] : first_seen) acc_buffer = std::max(acc_buffer, s);
    for (const auto& [c, s] : largest) fixed_buffer = std::max(fixed_buffer, s);
    if (report && acc_buffer != fixed_buffer)
      report->deviate("§9.6", "no-split buffer uses the largest instance (" +
                                  fixed_buffer.to_python_string() +
                                  " bytes); accelerate takes the "
                                  "first instance (" +
                                  acc_buffer.to_python_string() + ")");
    buffer = fixed_buffer;
  }
  // Mean size of the lowest modules that own tensors: accelerate's leaves after removing the
  // tensor names, i.e. modules with an entry none of whose child modules has one.
  byte_size leaf_sum{};
  std::int64_t leaf_count = 0;
  {
    std::vector<char> has(tree.size(), 0);
    for (std::size_t i = 1; i < tree.size(); ++i) has[i] = sizes.contains(tree.node(i).path);
    for (std::size_t i = 1; i < tree.size(); ++i) {
      if (!has[i]) continue;
      bool leaf = true;
      for (std::size_t c : tree.node(i).children) leaf = leaf && !has[c];
      if (leaf) {
        leaf_sum += sizes[tree.node(i).path];
        ++leaf_count;
      }
    }
  }
  // int(sum / max(count, 1)): true division then truncation.
  const std::int64_t mean = static_cast<std::int64_t>(
      leaf_sum.bytes() / static_cast<double>(std::max<std::int64_t>(leaf_count, 1)));
  const byte_size base = std::max(buffer, byte_size(mean));
  // int(1.25 * x): exact in eighths (x*10/8), truncated toward zero.
  const std::int64_t scaled = base.eighths() * 10 / 64;
  per_gpu += byte_size(scaled);

  for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
    const device d = device::gpu(ids[i]);
    const byte_size cur = out.at(d);
    const byte_size cap = (low_zero && i == 0) ? out.at(device::gpu(ids.front())) : per_gpu;
    out.set(d, std::min(cap, cur));
  }
  if (low_zero) {
    // GPU ids[0] keeps only what the other GPUs cannot hold (§9.5: by id, not by position).
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
      report->deviate("§9.5", "balanced_low_0 sums the budgets of GPUs " +
                                  std::string("after the first by id; accelerate sums positions "
                                              "1..n-1 (wrong budgets or KeyError)"));
    byte_size min_zero = total - others;
    if (min_zero.eighths() < 0) min_zero = byte_size{};
    const device first = device::gpu(ids.front());
    out.set(first, std::min(min_zero, out.at(first)));
  }
  return out;
}

namespace detail {

/// accelerate's fallback_allocate: the first entry (depth-first through splittable modules)
/// that fits `limit` with its tied partners, made a direct entry of the queue.
inline std::optional<tree_entry> fallback_allocate(
    const module_tree& tree, work_queue& queue, const module_sizes& sizes, byte_size limit,
    const std::vector<std::string>& no_split, const std::vector<std::vector<std::string>>& tied,
    const tree_entry& current, fit_report* report) {
  if (limit.eighths() < 0) return std::nullopt;  // accelerate: ValueError -> no fallback
  if (limit.is_float() && report)
    report->deviate("§9.9",
                    "fallback allocation with a fractional limit works; accelerate "
                    "raises AttributeError");
  work_queue search = queue;
  std::optional<tree_entry> found;
  while (!search.empty()) {
    tree_entry e = std::move(search.front());
    search.pop_front();
    auto ties = relevant_ties(e.name, tied, report);
    // Partners are looked up in what is still to place, the entry being retried included
    // (accelerate omits it and raises IndexError when it is a partner, §9.2).
    tied_size ts;
    if (ties.params.empty()) {
      ts.total = sizes[e.name];
    } else {
      std::vector<tree_entry> pool(search.begin(), search.end());
      pool.push_back(current);
      ts = get_module_size_with_ties(ties.params, sizes[e.name], sizes, pool);
    }
    if (ts.total <= limit) {
      found = std::move(e);
      break;
    }
    if (!e.is_module() || tree.node(e.module).children.empty() ||
        is_no_split(tree, e.module, no_split))
      continue;
    auto kids = split_entries(tree, e);
    search.insert(search.begin(), kids.begin(), kids.end());
  }
  if (!found) return std::nullopt;
  // Expand every ancestor of the found entry that is a queue entry, shortest first.
  const std::string& n = found->name;
  for (std::size_t pos = n.find('.'); pos != std::string::npos; pos = n.find('.', pos + 1)) {
    const std::string anc = n.substr(0, pos);
    for (auto it = queue.begin(); it != queue.end(); ++it)
      if (it->name == anc && it->is_module()) {
        const tree_entry a = *it;
        auto kids = split_entries(tree, a);
        it = queue.erase(it);
        queue.insert(it, kids.begin(), kids.end());
        break;
      }
  }
  for (auto it = queue.begin(); it != queue.end(); ++it)
    if (it->name == n) {
      queue.erase(it);
      break;
    }
  return found;
}

/// Bytes of the buffers below a module (accelerate's compute_module_total_buffer_size of a
/// submodule), by walking its subtree: only placed modules need it.
inline byte_size subtree_buffer_bytes(const module_tree& tree, std::size_t m,
                                      const plan_options& o) {
  byte_size total{};
  std::vector<std::size_t> stack{m};
  while (!stack.empty()) {
    const auto& n = tree.node(stack.back());
    stack.pop_back();
    for (const auto& b : n.buffers)
      total += planned_tensor_size(join_name(n.path, b.name), b, o.dtype, o.special_dtypes);
    for (std::size_t c : n.children) stack.push_back(c);
  }
  return total;
}

}  // namespace detail

/// accelerate's infer_auto_device_map on explicit budgets (no measuring). Sequential over the
/// devices in budget order, then "disk". Departures from accelerate (§9), each recorded in
/// report.deviations when it changes anything: tie membership by dotted prefix (§9.1), shared
/// or already-placed partners do not crash (§9.2), a split module's own buffers are placed
/// (§9.3), tied partners counted once (§9.4), a main device that cannot hold the largest layer
/// reserves nothing for it (§9.7), zero-budget GPUs are not used (§9.8), fractional limits work
/// in the fallback (§9.9).
inline plan_result infer_auto_device_map(const module_tree& tree, const max_memory& budgets,
                                         const plan_options& opt,
                                         const module_sizes* precomputed = nullptr) {
  plan_result res;
  res.budgets = budgets;
  fit_report& rep = res.report;
  auto say = [&](std::string_view line) {
    if (opt.verbose) opt.verbose(line);
  };
  const bool verbose = static_cast<bool>(opt.verbose);

  // Devices: budget order, zero-budget accelerators left out (§9.8), then disk.
  std::vector<device> devices;
  for (const auto& [d, b] : budgets) {
    if (d.is_accelerator() && b.eighths() == 0) {
      rep.deviate("§9.8", "device " + d.to_string() +
                              " has a zero budget and is not used; accelerate still visits it "
                              "(and keeps it as the main device)");
      continue;
    }
    devices.push_back(d);
  }
  if (std::find(devices.begin(), devices.end(), device::disk()) == devices.end())
    devices.push_back(device::disk());
  std::vector<device> gpus;
  for (auto d : devices)
    if (!d.is_cpu() && !d.is_disk()) gpus.push_back(d);
  std::vector<device> main_devices;
  if (std::find(gpus.begin(), gpus.end(), device::mps()) != gpus.end())
    main_devices = {device::mps()};
  else if (!gpus.empty())
    main_devices = {gpus.front(), device::cpu()};
  else
    main_devices = {device::cpu()};
  auto is_main = [&](device d) {
    return std::find(main_devices.begin(), main_devices.end(), d) != main_devices.end();
  };

  std::optional<module_sizes> own_sizes;
  if (!precomputed) own_sizes = compute_module_sizes(tree, opt.dtype, opt.special_dtypes);
  const module_sizes& sizes = precomputed ? *precomputed : *own_sizes;
  bool any_buffers = false;
  for (const auto& n : tree.nodes()) any_buffers = any_buffers || !n.buffers.empty();
  const auto tied = find_tied_parameters(tree);
  const auto& no_split = opt.no_split;

  detail::work_queue queue;
  for (auto& e : root_queue(tree)) queue.push_back(std::move(e));
  device_map map;
  std::size_t cur = 0;
  std::unordered_map<device, byte_size, device_hash> used, buffer_bytes;
  std::vector<std::pair<device, byte_size>> min_needed;
  std::unordered_map<device, byte_size, device_hash> layer_reserved;

  auto [max_layer, max_names] = get_max_layer_size(
      tree, std::vector<tree_entry>(queue.begin(), queue.end()), sizes, no_split);
  auto recompute = [&] {
    auto r = get_max_layer_size(tree, detail::module_entries(queue), sizes, no_split);
    max_layer = r.first;
    max_names = std::move(r.second);
  };

  // Every step places an entry, splits one, or moves to the next device; the bound only
  // guards against a bug turning into an endless loop.
  const std::size_t step_limit = 64 * (tree.size() + 16) * (devices.size() + 1);
  std::size_t steps = 0;
  while (!queue.empty()) {
    if (++steps > step_limit)
      throw placement_error("infer_auto_device_map did not converge (internal error) at `" +
                            queue.front().name + "`");
    tree_entry e = std::move(queue.front());
    queue.pop_front();
    const std::string& name = e.name;
    if (verbose) {
      say("");
      say("Treating module " + name + ".");
    }
    std::erase_if(max_names, [&](const std::string& n) {
      return n == name || (n.size() > name.size() && covers(name, n));
    });
    if (max_names.empty()) recompute();
    const byte_size size = sizes[name];

    auto ties = detail::relevant_ties(name, tied, &rep);
    if (verbose && !ties.params.empty()) {
      say("  Found the relevant tied param groups " + detail::py_groups(ties.groups));
      say("  So those parameters need to be taken into account " + detail::py_list(ties.params));
    }

    const device dev = devices[cur];
    const bool unlimited = dev.is_disk();
    byte_size limit = unlimited ? byte_size{} : budgets.at(dev);
    byte_size reserved{};
    if (!unlimited && is_main(dev)) {
      if (max_layer > budgets.at(dev)) {
        if (max_layer.eighths() > 0)
          rep.deviate("§9.7", "device " + dev.to_string() + " cannot hold the largest layer (" +
                                  max_layer.to_python_string() +
                                  " bytes) and reserves nothing for it; accelerate reserves it "
                                  "anyway and leaves the device unused");
      } else {
        limit -= max_layer;
        reserved = max_layer;
      }
    }
    auto ts = get_module_size_with_ties(ties.params, size, sizes, queue);
    if (ts.accelerate_total != ts.total)
      rep.deviate("§9.4", "`" + name + "` with its tied partners needs " +
                              ts.total.to_python_string() + " bytes; accelerate counts " +
                              ts.accelerate_total.to_python_string());
    if (ts.names.size() != ties.params.size())
      rep.deviate("§9.2", "a tied partner of `" + name +
                              "` is not in the queue (shared or already placed); accelerate "
                              "raises IndexError");
    byte_size& u = used[dev];

    // (A) it fits with its tied partners.
    if (unlimited || u + ts.total <= limit) {
      if (verbose) {
        std::string line = "Putting " + name;
        line += ts.names.empty() ? " (size=" + size.to_python_string() + ")"
                                 : " and " + detail::py_list(ts.names);
        if (!unlimited) line += " (available=" + (limit - u).to_python_string() + ")";
        say(line + " on " + dev.to_string() + ".");
      }
      u += ts.total;
      map.set(name, dev);
      rep.placements.push_back(
          {name, dev, ts.total, ts.names.empty() ? "fits" : "fits with its tied partners"});
      for (const auto& tn : ts.names) {
        for (auto it = queue.begin(); it != queue.end(); ++it)
          if (it->name == tn) {
            queue.erase(it);
            break;
          }
        map.set(tn, dev);
        rep.placements.push_back({tn, dev, byte_size{}, "tied to " + name + " (counted there)"});
      }
      if (!opt.offload_buffers && e.is_module() && any_buffers)
        buffer_bytes[dev] += detail::subtree_buffer_bytes(tree, e.module, opt);
      continue;
    }

    // (B) alone it fits, not with its partners: split a partner.
    if (!ties.params.empty() && u + size <= limit) {
      if (verbose)
        say("Not enough space on " + dev.to_string() + " to put " + name + " and " +
            detail::py_list(ts.names) + " (space available " + (limit - u).to_python_string() +
            ", needed size " + ts.total.to_python_string() + ").");
      bool split = false;
      for (const auto& te : ts.entries) {
        if (!te.is_module() || tree.node(te.module).children.empty() ||
            is_no_split(tree, te.module, no_split))
          continue;
        if (verbose) say("Splitting " + te.name + ".");
        bool had_buffers = false;
        auto kids = detail::split_entries(tree, te, &had_buffers);
        if (had_buffers)
          rep.deviate("§9.3", "split module `" + te.name +
                                  "` keeps its direct buffers in the queue; accelerate drops them");
        auto it = std::find_if(queue.begin(), queue.end(),
                               [&](const tree_entry& q) { return q.name == te.name; });
        it = queue.erase(it);
        queue.insert(it, kids.begin(), kids.end());
        queue.push_front(e);
        recompute();
        split = true;
        break;
      }
      if (split) continue;
      if (verbose) say("None of the tied module can be split, going to the next device.");
    }

    // (C) the entry itself does not fit (an exact fit lands here too, as in accelerate).
    if (u + size >= limit) {
      const bool leaf = !e.is_module() || tree.node(e.module).children.empty() ||
                        is_no_split(tree, e.module, no_split);
      if (verbose)
        say("Not enough space on " + dev.to_string() + " to put " + name + " (space available " +
            (limit - u).to_python_string() + ", module size " + size.to_python_string() + ").");
      if (leaf) {
        if (verbose) say("This module cannot be split, going to the next device.");
      } else {
        if (verbose) say("Splitting " + name + ".");
        bool had_buffers = false;
        auto kids = detail::split_entries(tree, e, &had_buffers);
        if (had_buffers)
          rep.deviate("§9.3", "split module `" + name +
                                  "` keeps its direct buffers in the queue; accelerate drops them");
        queue.insert(queue.begin(), kids.begin(), kids.end());
        recompute();
        continue;
      }
    }

    // (D) fallback: the device is still empty, try any smaller entry.
    if (u.eighths() == 0 && opt.fallback_allocation && !unlimited) {
      const byte_size limit2 = budgets.at(dev) - std::max(max_layer, ts.total);
      if (auto f = detail::fallback_allocate(tree, queue, sizes, limit2, no_split, tied, e, &rep)) {
        queue.push_front(e);
        queue.push_front(*f);
        continue;
      }
    }

    // (E) give up on this device.
    if (u.eighths() == 0) min_needed.emplace_back(dev, ts.total + reserved);
    u += reserved;
    layer_reserved[dev] = reserved;
    ++cur;
    queue.push_front(std::move(e));
  }

  if (opt.clean_result) map = clean_device_map(map);
  res.map = std::move(map);

  // Buffer check: buffers of CPU/disk-placed modules stay resident on the execution device.
  if (!opt.offload_buffers) {
    byte_size need = buffer_bytes[device::cpu()] + buffer_bytes[device::disk()];
    if (need.eighths() > 0) {
      bool fits_any = false;
      for (const auto& [d, b] : budgets) {
        if (d.is_cpu() || d.is_disk()) continue;
        auto it = used.find(d);
        const byte_size ud = it == used.end() ? byte_size{} : it->second;
        if (b >= need + ud) fits_any = true;
      }
      if (!gpus.empty() && !fits_any)
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
  for (const auto& d : devices) {
    device_usage du{d, std::nullopt, {}, {}, {}};
    if (auto b = budgets.find(d); b && !d.is_disk()) du.budget = *b;
    for (const auto& p : rep.placements)
      if (p.target == d) du.weights += p.size;
    if (auto it = layer_reserved.find(d); it != layer_reserved.end())
      du.reserved_layer = it->second;
    if (du.weights.eighths() > 0 || du.budget) rep.devices.push_back(du);
  }
  if (!opt.allow_disk_offload) {
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
                 b.to_python_string() + " bytes (budget " + budgets.at(d).to_python_string() + ")";
      throw placement_error(
          "the model does not fit without disk offload: " + on_disk.to_python_string() +
          " more bytes (starting with `" + first + "`) need room on a GPU or the CPU" +
          (where.empty() ? std::string() : "; " + where));
    }
  }
  return res;
}

}  // namespace stowage
