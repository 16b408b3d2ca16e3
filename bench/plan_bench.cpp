// Planning speed: infer_device_map on Llama-2-70B and Llama-3.1-405B module trees (built from
// the bundled configs as meta descriptors), with the budgets of the side-by-side comparison
// (bench/plan_side_by_side.py times accelerate on the same structures and budgets).
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <benchmark/benchmark.h>

#include <string>

namespace sw = stowage;

namespace {
sw::module_tree llama(const std::string& name) {
  auto cfg = sw::models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" +
                                                 name + "/config.json");
  return sw::to_module_tree(
      sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::bf16>>(cfg));
}

template <class Policy>
void plan(benchmark::State& state, const char* model, sw::max_memory budgets) {
  const auto tree = llama(model);
  sw::plan_options o;
  o.no_split = {"LlamaDecoderLayer"};
  o.dtype = sw::dtype::bfloat16;
  for (auto _ : state) {
    auto r = sw::infer_device_map<Policy>(tree, budgets, o);
    benchmark::DoNotOptimize(r);
  }
}
void plan_balanced(benchmark::State& s, const char* m, sw::max_memory b) {
  plan<sw::placement::balanced>(s, m, std::move(b));
}
void plan_sequential(benchmark::State& s, const char* m, sw::max_memory b) {
  plan<sw::placement::sequential>(s, m, std::move(b));
}
}  // namespace

// Same budgets as plan_side_by_side.py: 4 x 40GB GPUs + 400GB CPU (70B); 8 x 80GB + 1TB (405B).
BENCHMARK_CAPTURE(plan_balanced, llama2_70b_balanced, "Llama-2-70b-hf",
                  sw::max_memory{
                      {0, "40GB"}, {1, "40GB"}, {2, "40GB"}, {3, "40GB"}, {"cpu", "400GB"}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(plan_sequential, llama2_70b_sequential, "Llama-2-70b-hf",
                  sw::max_memory{
                      {0, "40GB"}, {1, "40GB"}, {2, "40GB"}, {3, "40GB"}, {"cpu", "400GB"}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(plan_balanced, llama31_405b_balanced, "Llama-3.1-405B",
                  sw::max_memory{{0, "80GB"},
                                 {1, "80GB"},
                                 {2, "80GB"},
                                 {3, "80GB"},
                                 {4, "80GB"},
                                 {5, "80GB"},
                                 {6, "80GB"},
                                 {7, "80GB"},
                                 {"cpu", "1000GB"}})
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
