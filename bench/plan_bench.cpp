// Planning speed: infer_device_map on Llama-2-70B and Llama-3.1-405B module trees (built from
// the bundled configs as meta descriptors), with the budgets of the side-by-side comparison
// (bench/plan_side_by_side.py times accelerate on the same structures and budgets).
// Three forms: from the tree (infer_device_map(tree, ...) called again on the same tree: the
// tree keeps its index and size tables from the first call, module_tree::derived), the first
// plan of a tree (a fresh copy of the tree each iteration, made outside the timed region: the
// tree keeps nothing for planning, so the index, the sizes and the no-split instances are all
// built in the timed call, as accelerate redoes compute_module_sizes on every call), and
// through an explicit reused plan_context.
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>

namespace sw = stowage;

namespace {
sw::module_tree llama(const std::string& name) {
  auto cfg = sw::models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" +
                                                 name + "/config.json");
  return sw::to_module_tree(
      sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::bf16>>(cfg));
}

sw::plan_options options() {
  sw::plan_options o;
  o.no_split = {"LlamaDecoderLayer"};
  o.dtype = sw::dtype::bfloat16;
  return o;
}

template <class Policy>
void plan(benchmark::State& state, const char* model, sw::max_memory budgets) {
  const auto tree = llama(model);
  const auto o = options();
  for (auto _ : state) {
    auto r = sw::infer_device_map<Policy>(tree, budgets, o);
    benchmark::DoNotOptimize(r);
  }
}

template <class Policy>
void plan_first(benchmark::State& state, const char* model, sw::max_memory budgets) {
  const auto tree = llama(model);
  const auto o = options();
  for (auto _ : state) {
    // A copy starts with nothing derived; made, and freed with the result, outside the timed
    // region (timed by hand: pausing Google Benchmark's timer costs about a microsecond).
    auto fresh = std::make_unique<sw::module_tree>(tree);
    const auto t0 = std::chrono::steady_clock::now();
    auto r = sw::infer_device_map<Policy>(*fresh, budgets, o);
    const auto t1 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(r);
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
}

template <class Policy>
void plan_ctx(benchmark::State& state, const char* model, sw::max_memory budgets) {
  const auto tree = llama(model);
  const auto o = options();
  sw::plan_context ctx(tree);
  for (auto _ : state) {
    auto r = sw::infer_device_map<Policy>(ctx, budgets, o);
    benchmark::DoNotOptimize(r);
  }
}

void balanced(benchmark::State& s, const char* m, sw::max_memory b) {
  plan<sw::placement::balanced>(s, m, std::move(b));
}
void sequential(benchmark::State& s, const char* m, sw::max_memory b) {
  plan<sw::placement::sequential>(s, m, std::move(b));
}
void auto_(benchmark::State& s, const char* m, sw::max_memory b) {
  plan<sw::placement::auto_>(s, m, std::move(b));
}
void balanced_first(benchmark::State& s, const char* m, sw::max_memory b) {
  plan_first<sw::placement::balanced>(s, m, std::move(b));
}
void sequential_first(benchmark::State& s, const char* m, sw::max_memory b) {
  plan_first<sw::placement::sequential>(s, m, std::move(b));
}
void auto_first(benchmark::State& s, const char* m, sw::max_memory b) {
  plan_first<sw::placement::auto_>(s, m, std::move(b));
}
void balanced_ctx(benchmark::State& s, const char* m, sw::max_memory b) {
  plan_ctx<sw::placement::balanced>(s, m, std::move(b));
}
void sequential_ctx(benchmark::State& s, const char* m, sw::max_memory b) {
  plan_ctx<sw::placement::sequential>(s, m, std::move(b));
}
void auto_ctx(benchmark::State& s, const char* m, sw::max_memory b) {
  plan_ctx<sw::placement::auto_>(s, m, std::move(b));
}

const sw::max_memory budgets_70b{
    {0, "40GB"}, {1, "40GB"}, {2, "40GB"}, {3, "40GB"}, {"cpu", "400GB"}};
const sw::max_memory budgets_405b{{0, "80GB"}, {1, "80GB"}, {2, "80GB"},
                                  {3, "80GB"}, {4, "80GB"}, {5, "80GB"},
                                  {6, "80GB"}, {7, "80GB"}, {"cpu", "1000GB"}};
}  // namespace

// Same budgets as plan_side_by_side.py: 4 x 40GB GPUs + 400GB CPU (70B); 8 x 80GB + 1TB (405B).
BENCHMARK_CAPTURE(balanced, llama2_70b_balanced, "Llama-2-70b-hf", budgets_70b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(sequential, llama2_70b_sequential, "Llama-2-70b-hf", budgets_70b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(balanced, llama31_405b_balanced, "Llama-3.1-405B", budgets_405b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(auto_, llama2_70b_auto, "Llama-2-70b-hf", budgets_70b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(balanced_ctx, llama2_70b_balanced_ctx, "Llama-2-70b-hf", budgets_70b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(sequential_ctx, llama2_70b_sequential_ctx, "Llama-2-70b-hf", budgets_70b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(balanced_ctx, llama31_405b_balanced_ctx, "Llama-3.1-405B", budgets_405b)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(auto_ctx, llama2_70b_auto_ctx, "Llama-2-70b-hf", budgets_70b)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_CAPTURE(balanced_first, llama2_70b_balanced_first, "Llama-2-70b-hf", budgets_70b)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(sequential_first, llama2_70b_sequential_first, "Llama-2-70b-hf", budgets_70b)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(balanced_first, llama31_405b_balanced_first, "Llama-3.1-405B", budgets_405b)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(auto_first, llama2_70b_auto_first, "Llama-2-70b-hf", budgets_70b)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
