// Conformance: device maps and budgets for the bundled Llama-family configs
// (tests/fixtures/llama/device_maps.json). balanced / balanced_low_0 / sequential against real
// accelerate (get_balanced_memory / get_max_memory + infer_auto_device_map on a meta-device
// Transformers model; accelerate's "auto" is its "balanced"), and placement::auto_ against
// Transformers v5's from_pretrained resolver (transformers.integrations.accelerate.
// _get_device_map, the fixture's "transformers" block).
#include "accelerate_fixture_support.hpp"

#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <catch2/catch.hpp>

#include <memory>

namespace sw = stowage;

namespace {
struct llama_model {
  sw::module_tree tree;
  std::unique_ptr<sw::plan_context> ctx;
};
llama_model& llama(const std::string& name) {
  static std::map<std::string, llama_model> cache;
  auto it = cache.find(name);
  if (it == cache.end()) {
    auto cfg = sw::models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" +
                                                   name + "/config.json");
    auto model = sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::bf16>>(cfg);
    it = cache.emplace(name, llama_model{sw::to_module_tree(model), nullptr}).first;
    it->second.ctx = std::make_unique<sw::plan_context>(it->second.tree);
  }
  return it->second;
}
sw::plan_options options(const nlohmann::json& c) {
  sw::plan_options o;
  o.no_split = fixture::strings(c["no_split"]);
  o.dtype = sw::dtype_from_name(c["dtype"].get<std::string>());
  return o;
}
}  // namespace

TEST_CASE("Llama-family: balanced, balanced_low_0, sequential equal accelerate's") {
  std::size_t exact = 0;
  for (const auto& c : fixture::load("llama/device_maps.json")) {
    INFO(c["id"].get<std::string>());
    auto& m = llama(c["config"]);
    const auto o = options(c);
    std::string strategy = c["strategy"];
    if (strategy == "auto") strategy = "balanced";  // accelerate: "auto" is "balanced"
    const auto mm = fixture::budgets(c["max_memory_pairs"]);
    if (strategy != "sequential") {
      sw::fit_report rep;
      const auto b = sw::get_balanced_memory(
          *m.ctx, mm, {o.no_split, o.dtype, {}, strategy == "balanced_low_0"}, &rep);
      if (rep.deviations.empty()) CHECK(b == fixture::budgets(c["budgets"]));
    }
    const auto r = sw::infer_device_map(strategy, *m.ctx, mm, o);
    // The same plan without a reused context.
    CHECK(r.map == sw::infer_device_map(strategy, m.tree, mm, o).map);
    if (r.report.deviations.empty()) {
      ++exact;
      CHECK(r.map == fixture::map(c["map"]));
      CHECK(r.report.warnings == fixture::strings(c["warnings"]));
    } else {
      REQUIRE_NOTHROW(sw::validate_device_map(m.tree, r.map));
    }
  }
  CHECK(exact > 100);
}

TEST_CASE("Llama-family: placement::auto_ equals Transformers' device_map=\"auto\"") {
  std::size_t budgets_compared = 0, maps_compared = 0;
  for (const auto& c : fixture::load("llama/device_maps.json")) {
    if (!c.contains("transformers")) continue;  // recorded for bfloat16 only
    INFO(c["id"].get<std::string>());
    const auto& tf = c["transformers"];
    auto& m = llama(c["config"]);
    const auto o = options(c);
    const std::string strategy = c["strategy"];
    const auto mm = fixture::budgets(c["max_memory_pairs"]);
    const auto want_map = fixture::map(tf["map"]);
    if (strategy == "sequential") {
      // Transformers' sequential: get_max_memory (the budgets as given), its planner.
      CHECK(fixture::budgets(tf["budgets"]) == mm);
      CHECK(sw::infer_auto_device_map(*m.ctx, mm, o, sw::size_rule::transformers).map == want_map);
      ++maps_compared;
      continue;
    }
    sw::fit_report rep;
    const bool low_zero = strategy == "balanced_low_0";
    const auto b =
        sw::transformers_balanced_memory(*m.ctx, mm, {o.no_split, o.dtype, {}, low_zero}, &rep);
    CHECK(rep.deviations.empty());
    CHECK(b == fixture::budgets(tf["budgets"]));
    ++budgets_compared;
    if (low_zero) {
      CHECK(sw::infer_auto_device_map(*m.ctx, b, o, sw::size_rule::transformers).map == want_map);
    } else {
      // Transformers' "auto" and "balanced" are the same resolver: placement::auto_.
      const auto r = sw::infer_device_map<sw::placement::auto_>(*m.ctx, mm, o);
      CHECK(r.map == want_map);
      CHECK(r.map == sw::infer_device_map("auto", m.tree, mm, o).map);
    }
    ++maps_compared;
  }
  CHECK(budgets_compared == 108);
  CHECK(maps_compared == 144);
}
