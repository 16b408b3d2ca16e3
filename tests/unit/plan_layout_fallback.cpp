// A module_tree keeps a flat layout of its modules and tensors while it is built in pre-order
// (each tensor added to the newest module, parameters before buffers); sizes and planning read
// it when present and walk the nodes otherwise. The two paths must agree exactly: the same
// trees rebuilt in an order that drops the layout give the same sizes, maps, budgets, reports
// and messages for every policy. (The expected values of both paths against accelerate are in
// tests/conformance; this checks that the fallback is not a second, drifting implementation.)
// The size aggregates the layout keeps (detail::size_view) are checked item by item against
// compute_item_sizes.
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <catch2/catch.hpp>

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

// The same modules, tensors and ties, but every module first and the tensors afterwards: a
// tensor added to a module other than the newest drops the layout.
sw::module_tree rebuilt_without_layout(const sw::module_tree& t) {
  sw::module_tree out(t.node(0).class_name);
  for (std::size_t i = 1; i < t.size(); ++i) {
    const auto& n = t.node(i);
    REQUIRE(out.add_child(n.parent, n.name, n.class_name) == i);
  }
  for (std::size_t i = 0; i < t.size(); ++i) {
    for (const auto& p : t.node(i).parameters) out.add_parameter(i, p);
    for (const auto& b : t.node(i).buffers) out.add_buffer(i, b);
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
void check_policy(const sw::module_tree& with, const sw::module_tree& without,
                  const sw::max_memory& budgets, const sw::plan_options& o) {
  const auto a = sw::infer_device_map<Policy>(with, budgets, o);
  const auto b = sw::infer_device_map<Policy>(without, budgets, o);
  CHECK(a.map == b.map);
  CHECK(a.budgets == b.budgets);
  check_same_report(a.report, b.report);
}

}  // namespace

TEST_CASE("planning reads the tree layout and the nodes alike", "[placement][layout]") {
  for (const char* model : {"Llama-2-70b-hf", "Llama-3.1-405B", "Qwen2.5-0.5B"}) {
    INFO(model);
    const auto with = llama(model);
    const auto without = rebuilt_without_layout(with);
    REQUIRE(with.layout() != nullptr);
    REQUIRE(without.layout() == nullptr);

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
          check_policy<sw::placement::sequential>(with, without, budgets, o);
          check_policy<sw::placement::balanced>(with, without, budgets, o);
          check_policy<sw::placement::balanced_low_0>(with, without, budgets, o);
          check_policy<sw::placement::auto_>(with, without, budgets, o);
        }
  }
}

namespace {

// A small tree touching every aggregate rule: tensors on the root, a module owning tensors
// before its children get some (it stops being one of accelerate's leaves), a zero-element
// tensor, a bool buffer (1/8 byte per element), a tensor-free module, four size keys.
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

void check_view(const sw::module_tree& t, std::optional<sw::dtype> target, sw::size_rule rule) {
  const sw::tree_index ix(t);
  const auto v = sw::detail::size_view::from_aggregates(ix, target, {}, rule);
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
  CHECK(v->leaf_count() == full.leaf_count);
  CHECK(v->biggest_direct() == full.biggest_direct);
}

}  // namespace

TEST_CASE("the tree's size aggregates give the computed sizes of every item",
          "[placement][layout]") {
  const std::vector<std::optional<sw::dtype>> targets = {std::nullopt, sw::dtype::float16,
                                                         sw::dtype::bfloat16, sw::dtype::float32,
                                                         sw::dtype::float8_e4m3fn};
  for (const auto rule : {sw::size_rule::accelerate, sw::size_rule::transformers})
    for (const auto& target : targets) {
      INFO("rule " << static_cast<int>(rule) << ", dtype "
                   << (target ? sw::name(*target) : "none"));
      check_view(mixed_tree(false), target, rule);
      for (const char* model : {"Llama-2-70b-hf", "Llama-3.1-405B"}) {
        INFO(model);
        check_view(llama(model), target, rule);
      }
    }
  // Where the aggregates do not apply, planning sizes every tensor: more size keys than the
  // tree keeps, ties (Qwen2.5-0.5B ties its embeddings), special dtypes.
  const sw::module_tree five = mixed_tree(true);
  CHECK_FALSE(sw::detail::size_view::from_aggregates(sw::tree_index(five), std::nullopt, {},
                                                     sw::size_rule::accelerate));
  const sw::module_tree tied = llama("Qwen2.5-0.5B");
  REQUIRE_FALSE(tied.tied_parameters().empty());
  CHECK_FALSE(sw::detail::size_view::from_aggregates(sw::tree_index(tied), std::nullopt, {},
                                                     sw::size_rule::accelerate));
  const sw::module_tree four = mixed_tree(false);
  CHECK_FALSE(sw::detail::size_view::from_aggregates(sw::tree_index(four), std::nullopt,
                                                     {{"a.w", sw::dtype::float16}},
                                                     sw::size_rule::accelerate));
}

TEST_CASE("trees without aggregates plan like trees with them", "[placement][layout]") {
  // The small tree with four and with five size keys, against its rebuild without a layout.
  for (const bool fifth : {false, true}) {
    const auto with = mixed_tree(fifth);
    const auto without = rebuilt_without_layout(with);
    REQUIRE(without.layout() == nullptr);
    for (const auto& budgets :
         {sw::max_memory{{0, 40}, {1, 60}, {"cpu", 200}}, sw::max_memory{{0, 24}, {"cpu", 30}}})
      for (const bool no_split : {false, true})
        for (const auto dt : {std::optional<sw::dtype>{}, std::optional{sw::dtype::float16}}) {
          sw::plan_options o;
          if (no_split) o.no_split = {"Block"};
          o.dtype = dt;
          o.fallback_allocation = true;
          check_policy<sw::placement::sequential>(with, without, budgets, o);
          check_policy<sw::placement::balanced>(with, without, budgets, o);
          check_policy<sw::placement::auto_>(with, without, budgets, o);
        }
  }
}
