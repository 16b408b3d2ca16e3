// A module_tree keeps a flat layout of its modules and tensors while it is built in pre-order
// (each tensor added to the newest module, parameters before buffers); sizes and planning read
// it when present and walk the nodes otherwise. The two paths must agree exactly: the same
// trees rebuilt in an order that drops the layout give the same sizes, maps, budgets, reports
// and messages for every policy. (The expected values of both paths against accelerate are in
// tests/conformance; this checks that the fallback is not a second, drifting implementation.)
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <catch2/catch.hpp>

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
