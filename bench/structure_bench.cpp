// Building a model's structure (init_empty) must cost almost nothing: every parameter is a
// meta descriptor, names are not stored. This benchmark builds Llama-2-70B and Llama-3.1-405B
// from their bundled config.json (parsed once, outside the timed loop) and counts the heap
// allocations made while building, with global operator new/delete replaced in this TU.
// It also times to_module_tree (the runtime view placement uses, which does own strings).
#include <stowage/models/llama.hpp>
#include <stowage/module/to_module_tree.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <string>

// GCC flags free() on memory from a replaced operator new as mismatched: a false positive here,
// since this TU's new allocates with malloc.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace {
std::atomic<std::size_t> g_alloc_calls{0};
std::atomic<std::size_t> g_alloc_bytes{0};
}  // namespace

void* operator new(std::size_t n) {
  g_alloc_calls.fetch_add(1, std::memory_order_relaxed);
  g_alloc_bytes.fetch_add(n, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace {

namespace sw = stowage;
using model_t = sw::models::llama_for_causal_lm<sw::precision::bf16>;

sw::models::llama_config load(const char* name) {
  return sw::models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" +
                                             name + "/config.json");
}

void report(benchmark::State& state, std::size_t calls, std::size_t bytes) {
  const auto iters = static_cast<double>(state.iterations());
  state.counters["allocs"] = benchmark::Counter(static_cast<double>(calls) / iters);
  state.counters["alloc_bytes"] = benchmark::Counter(static_cast<double>(bytes) / iters);
  state.counters["alloc_KiB"] = benchmark::Counter(static_cast<double>(bytes) / iters / 1024.0);
}

void init_empty_bench(benchmark::State& state, const char* name) {
  const auto cfg = load(name);
  std::size_t calls = 0, bytes = 0;
  for (auto _ : state) {
    const std::size_t c0 = g_alloc_calls.load(), b0 = g_alloc_bytes.load();
    auto model = sw::init_empty<model_t>(cfg);
    calls += g_alloc_calls.load() - c0;
    bytes += g_alloc_bytes.load() - b0;
    benchmark::DoNotOptimize(model);
  }
  report(state, calls, bytes);
}

void to_module_tree_bench(benchmark::State& state, const char* name) {
  const auto model = sw::init_empty<model_t>(load(name));
  std::size_t calls = 0, bytes = 0;
  for (auto _ : state) {
    const std::size_t c0 = g_alloc_calls.load(), b0 = g_alloc_bytes.load();
    auto tree = sw::to_module_tree(model);
    calls += g_alloc_calls.load() - c0;
    bytes += g_alloc_bytes.load() - b0;
    benchmark::DoNotOptimize(tree);
  }
  report(state, calls, bytes);
}

void count_parameters_bench(benchmark::State& state, const char* name) {
  const auto model = sw::init_empty<model_t>(load(name));
  for (auto _ : state) {
    std::int64_t n = 0;
    sw::for_each_parameter(model,
                           [&](std::string_view, const sw::parameter& p) { n += p.numel(); });
    benchmark::DoNotOptimize(n);
  }
}

}  // namespace

BENCHMARK_CAPTURE(init_empty_bench, Llama_2_70b, "Llama-2-70b-hf")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(init_empty_bench, Llama_3_1_405B, "Llama-3.1-405B")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(to_module_tree_bench, Llama_2_70b, "Llama-2-70b-hf")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(to_module_tree_bench, Llama_3_1_405B, "Llama-3.1-405B")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(count_parameters_bench, Llama_2_70b, "Llama-2-70b-hf")
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
