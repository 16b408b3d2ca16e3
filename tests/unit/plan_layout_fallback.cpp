// Planning reads a module_tree through tree_index, which derives flat arrays from the nodes and
// notices whether the node indices are in pre-order. In pre-order (a tree built depth-first, as
// every model builder does) module sizes are differences of running sums over the tensors
// (detail::size_view::from_index) and subtrees are index ranges; otherwise sizes come from
// compute_item_sizes and subtrees from the pre-order positions. The two paths must agree
// exactly: the same trees rebuilt breadth-first (indices out of pre-order) give the same sizes,
// maps, budgets, reports and messages for every policy. (The expected values of both paths
// against accelerate are in tests/conformance; this checks that neither is a second, drifting
// implementation.) The running sums are checked item by item against compute_item_sizes, and
// no-split classes nested in one another against budgets worked out here from module sizes.
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace sw = stowage;

namespace {

sw::module_tree llama(const std::string& name) {
  auto cfg = sw::models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" +
                                                 name + "/config.json");
  return sw::to_module_tree(
      sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::bf16>>(cfg));
}

// The same modules (same names, classes and child order), tensors and ties, added breadth-first:
// every child of the root, then every grandchild, ..., then the tensors. A module's index then
// no longer equals its pre-order position once some module below the root has children.
sw::module_tree rebuilt_breadth_first(const sw::module_tree& t) {
  sw::module_tree out(t.node(0).class_name);
  std::vector<std::size_t> to_new(t.size(), 0);
  std::deque<std::size_t> queue{0};
  while (!queue.empty()) {
    const std::size_t m = queue.front();
    queue.pop_front();
    for (std::size_t c : t.node(m).children) {
      to_new[c] = out.add_child(to_new[m], t.node(c).name, t.node(c).class_name);
      queue.push_back(c);
    }
  }
  REQUIRE(out.size() == t.size());
  for (std::size_t i = 0; i < t.size(); ++i) {
    for (const auto& p : t.node(i).parameters) out.add_parameter(to_new[i], p);
    for (const auto& b : t.node(i).buffers) out.add_buffer(to_new[i], b);
  }
  for (const auto& g : t.tied_parameters()) out.tie(g);
  return out;
}

void check_same_report(const sw::fit_report& a, const sw::fit_report& b) {
  REQUIRE(a.placements.size() == b.placements.size());
  for (std::size_t i = 0; i < a.placements.size(); ++i) {
    INFO("placement " << i << ": " << a.placements[i].name);
    CHECK(a.placements[i].name == b.placements[i].name);
    CHECK(a.placements[i].target == b.placements[i].target);
    CHECK(a.placements[i].size == b.placements[i].size);
    CHECK(a.placements[i].reason == b.placements[i].reason);
  }
  REQUIRE(a.devices.size() == b.devices.size());
  for (std::size_t i = 0; i < a.devices.size(); ++i) {
    CHECK(a.devices[i].target == b.devices[i].target);
    CHECK(a.devices[i].budget == b.devices[i].budget);
    CHECK(a.devices[i].weights == b.devices[i].weights);
    CHECK(a.devices[i].reserved_layer == b.devices[i].reserved_layer);
  }
  CHECK(a.warnings == b.warnings);
  CHECK(a.info == b.info);
}

template <class Policy>
void check_policy(const sw::module_tree& preorder, const sw::module_tree& shuffled,
                  const sw::max_memory& budgets, const sw::plan_options& o) {
  const auto a = sw::infer_device_map<Policy>(preorder, budgets, o);
  const auto b = sw::infer_device_map<Policy>(shuffled, budgets, o);
  CHECK(a.map == b.map);
  CHECK(a.budgets == b.budgets);
  check_same_report(a.report, b.report);
}

// All four built-in policies.
void check_policies(const sw::module_tree& preorder, const sw::module_tree& shuffled,
                    const sw::max_memory& budgets, const sw::plan_options& o) {
  check_policy<sw::placement::sequential>(preorder, shuffled, budgets, o);
  check_policy<sw::placement::balanced>(preorder, shuffled, budgets, o);
  check_policy<sw::placement::balanced_low_0>(preorder, shuffled, budgets, o);
  check_policy<sw::placement::auto_>(preorder, shuffled, budgets, o);
}

}  // namespace

TEST_CASE("planning reads pre-order and shuffled node indices alike", "[placement][layout]") {
  for (const char* model : {"Llama-2-70b-hf", "Llama-3.1-405B", "Qwen2.5-0.5B"}) {
    INFO(model);
    const auto with = llama(model);
    const auto without = rebuilt_breadth_first(with);
    REQUIRE(sw::tree_index(with).preorder_is_identity());
    REQUIRE_FALSE(sw::tree_index(without).preorder_is_identity());
    REQUIRE(without.preorder() != with.preorder());

    for (const auto target : {std::optional<sw::dtype>{}, std::optional{sw::dtype::float16}}) {
      const auto sa = sw::compute_module_sizes(with, target);
      const auto sb = sw::compute_module_sizes(without, target);
      CHECK(sa.entries() == sb.entries());
    }

    const std::int64_t total = sw::compute_module_sizes(with).total().floor_bytes();
    auto budgets_of = [](std::int64_t gpu0, std::int64_t gpu1, std::int64_t cpu, bool disk) {
      sw::max_memory m;
      m.set(sw::device::gpu(0), gpu0);
      if (gpu1) m.set(sw::device::gpu(1), gpu1);
      m.set(sw::device::cpu(), cpu);
      if (disk) m.set(sw::device::disk(), cpu * 8);
      return m;
    };
    const std::vector<sw::max_memory> budget_sets = {
        budgets_of(total / 3, total / 3, total, false),
        budgets_of(total / 10, 0, total / 4, true),
    };
    for (const bool no_split : {false, true})
      for (const auto dt : {std::optional<sw::dtype>{}, std::optional{sw::dtype::bfloat16}})
        for (const auto& budgets : budget_sets) {
          INFO("no_split " << no_split << ", dtype " << (dt ? sw::name(*dt) : "none"));
          sw::plan_options o;
          if (no_split)
            o.no_split = {with.node(with.find_module("model.layers.0").value()).class_name};
          o.dtype = dt;
          check_policies(with, without, budgets, o);
        }
  }
}

namespace {

// A small tree touching every running-sum rule: tensors on the root, a module owning tensors
// besides its children (it is not one of accelerate's leaves), a zero-element tensor, a bool
// buffer (1/8 byte per element: fractional sizes), a tensor-free module, and four or five
// distinct (dtype, parameter or buffer) keys.
sw::module_tree mixed_tree(bool fifth_key) {
  sw::module_tree t("Root");
  t.add_parameter(0, {"w0", sw::shape{3}, sw::dtype::float32});
  const auto a = t.add_child(0, "a", "Block");
  t.add_parameter(a, {"w", sw::shape{4, 4}, sw::dtype::bfloat16});
  t.add_buffer(a, {"mask", sw::shape{5}, sw::dtype::bool_, false});
  const auto x = t.add_child(a, "x", "Lin");
  t.add_parameter(x, {"weight", sw::shape{2, 3}, sw::dtype::float32});
  const auto y = t.add_child(a, "y", "Lin");
  t.add_parameter(y, {"weight", sw::shape{0, 3}, sw::dtype::float32});
  const auto b = t.add_child(0, "b", "Block");
  t.add_buffer(b, {"inv", sw::shape{7}, sw::dtype::float32});
  const auto z = t.add_child(b, "z", "Norm");
  t.add_parameter(z, {"g", sw::shape{9}, fifth_key ? sw::dtype::int8 : sw::dtype::bfloat16});
  t.add_child(0, "c", "Empty");
  const auto d = t.add_child(0, "d", "Lin");
  t.add_parameter(d, {"weight", sw::shape{2, 3}, sw::dtype::float32});
  return t;
}

// One size key (float32 parameters), or two (and a bool buffer, one of zero elements).
sw::module_tree few_keys_tree(bool bool_buffer) {
  sw::module_tree t("Root");
  t.add_parameter(0, {"w0", sw::shape{3}, sw::dtype::float32});
  const auto a = t.add_child(0, "a", "Block");
  t.add_parameter(a, {"w", sw::shape{4, 4}, sw::dtype::float32});
  if (bool_buffer) t.add_buffer(a, {"mask", sw::shape{5}, sw::dtype::bool_, false});
  const auto x = t.add_child(a, "x", "Lin");
  t.add_parameter(x, {"weight", sw::shape{0, 3}, sw::dtype::float32});
  const auto b = t.add_child(0, "b", "Block");
  if (bool_buffer) t.add_buffer(b, {"empty", sw::shape{0}, sw::dtype::bool_, true});
  t.add_parameter(t.add_child(b, "z", "Norm"), {"g", sw::shape{9}, sw::dtype::float32});
  t.add_child(0, "c", "Empty");
  return t;
}

void check_view(const sw::module_tree& t, std::optional<sw::dtype> target, sw::size_rule rule) {
  const sw::tree_index ix(t);
  REQUIRE(ix.preorder_is_identity());
  const auto v = sw::detail::size_view::from_index(ix, target, {}, rule);
  REQUIRE(v.has_value());
  const auto full = sw::compute_item_sizes(ix, target, {}, false, rule);
  for (sw::tree_index::id x = 0; x < ix.items(); ++x) {
    INFO("item " << ix.name(x));
    CHECK(v->size(x) == full.size[x]);
    CHECK(v->size(x).is_float() == full.size[x].is_float());
    CHECK(v->counted(x) == (full.counted[x] != 0));
    if (ix.is_module(x)) {
      CHECK(v->buffers(x) == full.buffers[x]);
      CHECK(v->buffers(x).is_float() == full.buffers[x].is_float());
    }
  }
  CHECK(v->any_buffers() == full.any_buffers);
  CHECK(v->leaf_sum() == full.leaf_sum);
  CHECK(v->leaf_sum().is_float() == full.leaf_sum.is_float());
  CHECK(v->leaf_count() == full.leaf_count);
  CHECK(v->biggest_direct() == full.biggest_direct);
}

}  // namespace

TEST_CASE("the running sums give the computed sizes of every item", "[placement][layout]") {
  const std::vector<std::optional<sw::dtype>> targets = {std::nullopt, sw::dtype::float16,
                                                         sw::dtype::bfloat16, sw::dtype::float32,
                                                         sw::dtype::float8_e4m3fn};
  for (const auto rule : {sw::size_rule::accelerate, sw::size_rule::transformers})
    for (const auto& target : targets) {
      INFO("rule " << static_cast<int>(rule) << ", dtype "
                   << (target ? sw::name(*target) : "none"));
      // Any number of size keys (one, two, four, five), with bool buffers (fractional under
      // accelerate's rule, a whole byte under Transformers') and zero-element tensors.
      check_view(mixed_tree(false), target, rule);
      check_view(mixed_tree(true), target, rule);
      check_view(few_keys_tree(false), target, rule);
      check_view(few_keys_tree(true), target, rule);
      for (const char* model : {"Llama-2-70b-hf", "Llama-3.1-405B"}) {
        INFO(model);
        check_view(llama(model), target, rule);
      }
    }
  // Where the running sums do not apply, planning sizes every tensor: ties (Qwen2.5-0.5B ties
  // its embeddings), special dtypes, a tree whose indices are not in pre-order.
  const sw::module_tree tied = llama("Qwen2.5-0.5B");
  REQUIRE_FALSE(tied.tied_parameters().empty());
  CHECK_FALSE(sw::detail::size_view::from_index(sw::tree_index(tied), std::nullopt, {},
                                                sw::size_rule::accelerate));
  for (const bool fifth : {false, true}) {
    const sw::module_tree t = mixed_tree(fifth);
    CHECK_FALSE(sw::detail::size_view::from_index(
        sw::tree_index(t), std::nullopt, {{"a.w", sw::dtype::float16}}, sw::size_rule::accelerate));
    const sw::module_tree shuffled = rebuilt_breadth_first(t);
    const sw::tree_index six(shuffled);
    REQUIRE_FALSE(six.preorder_is_identity());
    for (const auto rule : {sw::size_rule::accelerate, sw::size_rule::transformers})
      CHECK_FALSE(sw::detail::size_view::from_index(six, std::nullopt, {}, rule));
  }
}

TEST_CASE("shuffled small trees plan like pre-order ones", "[placement][layout]") {
  // The small tree with four and with five size keys, against its breadth-first rebuild.
  for (const bool fifth : {false, true}) {
    const auto with = mixed_tree(fifth);
    const auto without = rebuilt_breadth_first(with);
    REQUIRE(sw::tree_index(with).preorder_is_identity());
    REQUIRE_FALSE(sw::tree_index(without).preorder_is_identity());
    for (const auto target : {std::optional<sw::dtype>{}, std::optional{sw::dtype::float16}})
      CHECK(sw::compute_module_sizes(with, target).entries() ==
            sw::compute_module_sizes(without, target).entries());
    for (const auto& budgets :
         {sw::max_memory{{0, 40}, {1, 60}, {"cpu", 200}}, sw::max_memory{{0, 24}, {"cpu", 30}}})
      for (const bool no_split : {false, true})
        for (const auto dt : {std::optional<sw::dtype>{}, std::optional{sw::dtype::float16}}) {
          sw::plan_options o;
          if (no_split) o.no_split = {"Block"};
          o.dtype = dt;
          o.fallback_allocation = true;
          check_policies(with, without, budgets, o);
        }
  }
}

namespace {

// No-split classes nested in one another: every "Outer" holds an "Inner" (which has children of
// its own), and one more "Inner" stands outside any Outer. All tensors float32 (whole bytes):
//   embed.weight 160 | blocks.0 = attn.proj 32 + mlp (64 or 160) | blocks.1 = attn.proj 48 +
//   mlp 80 + its buffer scale 8 = 136 | extra (Inner) = proj 16 or 240 | head.weight 160.
// The first Outer is the largest one or not; the lone Inner is smaller than every Outer or the
// largest instance of all. Optionally the root itself is an Outer (never a block: it is always
// descended into, and left out of the buffer).
struct nested_case {
  bool first_outer_largest;
  bool lone_inner_largest;
  bool root_is_outer;
};

sw::module_tree nested_tree(const nested_case& c) {
  sw::module_tree t(c.root_is_outer ? "Outer" : "Model");
  const auto f32 = sw::dtype::float32;
  const auto embed = t.add_child(0, "embed", "Embedding");
  t.add_parameter(embed, {"weight", sw::shape{10, 4}, f32});
  const auto blocks = t.add_child(0, "blocks", "ModuleList");
  auto block = [&](const std::string& name, std::int64_t proj, std::int64_t mlp, bool scale) {
    const auto o = t.add_child(blocks, name, "Outer");
    const auto attn = t.add_child(o, "attn", "Inner");
    const auto p = t.add_child(attn, "proj", "Linear");
    t.add_parameter(p, {"weight", sw::shape{proj}, f32});
    const auto m = t.add_child(o, "mlp", "Linear");
    t.add_parameter(m, {"weight", sw::shape{mlp}, f32});
    if (scale) t.add_buffer(o, {"scale", sw::shape{2}, f32});
  };
  block("0", 8, c.first_outer_largest ? 40 : 16, false);
  block("1", 12, 20, true);
  const auto extra = t.add_child(0, "extra", "Inner");
  const auto p = t.add_child(extra, "proj", "Linear");
  t.add_parameter(p, {"weight", sw::shape{c.lone_inner_largest ? 60 : 4}, f32});
  const auto head = t.add_child(0, "head", "Linear");
  t.add_parameter(head, {"weight", sw::shape{10, 4}, f32});
  return t;
}

bool in_list(const std::vector<std::string>& list, const std::string& c) {
  return std::find(list.begin(), list.end(), c) != list.end();
}

// accelerate's get_balanced_memory on two GPUs, worked out from the module sizes
// (compute_module_sizes, checked against accelerate in tests/conformance), with the no-split
// buffer given: per_gpu = total // 2 + int(1.25 * max(buffer, mean of the lowest modules owning
// tensors)); the first GPU is capped at that, the last keeps its budget.
std::int64_t balanced_first_gpu(const sw::module_sizes& sizes, std::int64_t buffer,
                                std::int64_t budget0) {
  // Leaves by accelerate's rule: keys that are nobody's rsplit(".", 1) parent; once with the
  // tensor names, then again without them.
  auto leaves_of = [](const std::vector<std::string>& keys) {
    std::vector<std::string> out;
    for (const auto& k : keys) {
      if (k.empty()) continue;
      bool parent = false;
      for (const auto& p : keys) {
        const auto dot = p.rfind('.');
        parent = parent || (dot != std::string::npos && p.substr(0, dot) == k);
      }
      if (!parent) out.push_back(k);
    }
    return out;
  };
  std::vector<std::string> keys;
  for (const auto& [k, s] : sizes.entries()) {
    REQUIRE_FALSE(s.is_float());
    keys.push_back(k);
  }
  const auto first = leaves_of(keys);
  std::vector<std::string> rest;
  for (const auto& k : keys)
    if (std::find(first.begin(), first.end(), k) == first.end()) rest.push_back(k);
  const auto leaves = leaves_of(rest);
  std::int64_t sum = 0;
  for (const auto& l : leaves) sum += sizes[l].floor_bytes();
  const std::int64_t mean =
      sum / std::max<std::int64_t>(static_cast<std::int64_t>(leaves.size()), 1);
  const std::int64_t per_gpu = sizes.total().floor_bytes() / 2 + std::max(buffer, mean) * 5 / 4;
  return std::min(per_gpu, budget0);
}

}  // namespace

TEST_CASE("nested no-split classes budget the largest instance of all",
          "[placement][layout][no_split]") {
  const std::vector<std::vector<std::string>> lists = {
      {"Outer", "Inner"}, {"Inner", "Outer"}, {"Outer"}, {"Inner"}};
  const std::int64_t budget0 = 4000, budget1 = 3000, cpu = 10000;
  for (const bool first_largest : {false, true})
    for (const bool lone_largest : {false, true})
      for (const bool root_outer : {false, true}) {
        const nested_case c{first_largest, lone_largest, root_outer};
        const auto tree = nested_tree(c);
        const auto shuffled = rebuilt_breadth_first(tree);
        REQUIRE(sw::tree_index(tree).preorder_is_identity());
        REQUIRE_FALSE(sw::tree_index(shuffled).preorder_is_identity());
        const auto sizes = sw::compute_module_sizes(tree);
        for (const auto& list : lists) {
          INFO("first Outer largest " << first_largest << ", lone Inner largest " << lone_largest
                                      << ", root an Outer " << root_outer << ", no_split "
                                      << list.front() << (list.size() > 1 ? ", " + list[1] : ""));
          // The largest instance over every module of a listed class, however nested (the root
          // left out); and accelerate's buffer: per class its first module with a size entry in
          // the order of the size entries, the largest of those.
          std::int64_t largest = 0;
          const auto order = tree.preorder();
          for (std::size_t m : order)
            if (m != 0 && in_list(list, tree.node(m).class_name) &&
                sizes.contains(tree.node(m).path))
              largest = std::max(largest, sizes[tree.node(m).path].floor_bytes());
          std::map<std::string, std::int64_t> first_of;
          for (const auto& [name, s] : sizes.entries()) {
            const auto m = tree.find_module(name);
            if (name.empty() || !m) continue;
            const auto& cls = tree.node(*m).class_name;
            if (in_list(list, cls) && !first_of.count(cls)) first_of[cls] = s.floor_bytes();
          }
          // Every instance here owns parameters, so the entries list the modules in pre-order:
          // the first with an entry in pre-order is the same module.
          for (const auto& [cls, s] : first_of) {
            const auto m = std::find_if(order.begin(), order.end(), [&](std::size_t i) {
              return i != 0 && tree.node(i).class_name == cls && sizes.contains(tree.node(i).path);
            });
            REQUIRE(m != order.end());
            CHECK(sizes[tree.node(*m).path].floor_bytes() == s);
          }
          std::int64_t accelerate_buffer = 0;
          for (const auto& [cls, s] : first_of) accelerate_buffer = std::max(accelerate_buffer, s);
          REQUIRE(largest > 0);

          const sw::max_memory budgets{{0, budget0}, {1, budget1}, {"cpu", cpu}};
          sw::balanced_options bo;
          bo.no_split = list;
          for (const auto* t : {&tree, &shuffled}) {
            INFO((t == &tree ? "pre-order indices" : "breadth-first indices"));
            sw::fit_report report;
            const auto out = sw::get_balanced_memory(*t, budgets, bo, &report);
            CHECK(out.at(sw::device::gpu(0)) ==
                  sw::byte_size(balanced_first_gpu(sizes, largest, budget0)));
            CHECK(out.at(sw::device::gpu(1)) == sw::byte_size(budget1));
            CHECK(out.at(sw::device::cpu()) == sw::byte_size(cpu));
            CHECK(report.deviates("§9.6") == (accelerate_buffer != largest));
            for (const auto& d : report.deviations)
              if (d.item == "§9.6") {
                CHECK(d.message.find("(" + std::to_string(largest) + " bytes)") !=
                      std::string::npos);
                CHECK(d.message.find("first instance (" + std::to_string(accelerate_buffer) +
                                     ")") != std::string::npos);
              }
            // Without a report the budgets are the same.
            CHECK(sw::get_balanced_memory(*t, budgets, bo) == out);
          }

          // Full plans: the same on both index orders, and no instance of a listed class is
          // split (each one, root aside, lies in or is one entry of the map).
          sw::plan_options o;
          o.no_split = list;
          for (const auto& small : {sw::max_memory{{0, 250}, {1, 300}, {"cpu", 2000}},
                                    sw::max_memory{{0, 200}, {"cpu", 300}, {"disk", 5000}}}) {
            check_policies(tree, shuffled, small, o);
            const auto r = sw::infer_device_map<sw::placement::sequential>(tree, small, o);
            for (std::size_t m = 1; m < tree.size(); ++m) {
              if (!in_list(list, tree.node(m).class_name)) continue;
              const auto& path = tree.node(m).path;
              bool whole = false;
              for (const auto& [k, d] : r.map.entries()) whole = whole || sw::covers(k, path);
              INFO(path);
              CHECK(whole);
            }
          }
        }
      }
}
