// offload_decode_bench: batch-1 greedy decode on one GPU with the decoder layers offloaded to
// pinned host memory and streamed in through exec::cuda::layer_streamer (two device slots,
// the next layer's host-to-device copy overlapping this layer's compute), against the same
// model all-resident and against streaming without prefetch (copy, then compute). Offloaded
// decode moves every layer across PCIe each token, so its speed limit is
// pinned_bandwidth / streamed_bytes_per_token; the bench measures the pinned bandwidth in the
// same run (cudaMemcpyAsync of a 1 GiB pinned buffer, best of 5) and reports
// `h2d_fraction` = achieved streamed bytes/s over it. Target: >= 0.8.
// Model: a Llama-3-8B-shaped decoder (hidden 4096, MLP 14336, 32 heads, 8 KV heads), 8 layers
// of random bf16 weights (436 MiB a layer, 3.4 GiB streamed per token), vocab 32000 resident.
// Run: build-cuda/bench/cuda/offload_decode_bench [--benchmark_filter=streamed]
#include <stowage/exec/cuda/llama_forward.cuh>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace ex = stowage::exec;
namespace gpu = stowage::exec::cuda;
namespace sw = stowage;

namespace {

double g_pinned_bw = 0;  // bytes/s, pinned host -> device, measured at start-up

double measure_pinned_h2d(const gpu::context& ctx) {
  const std::size_t bytes = std::size_t{1} << 30;
  gpu::pinned_buffer host(bytes);
  std::memset(host.data(), 1, bytes);
  gpu::device_buffer<std::byte> dev(bytes);
  gpu::event start(true), stop(true);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    start.record(ctx.copy());
    gpu::upload(dev.data(), host.data(), bytes, ctx.copy());
    stop.record(ctx.copy());
    stop.synchronize();
    const double s = gpu::event::elapsed_ms(start, stop) / 1e3;
    best = std::max(best, static_cast<double>(bytes) / s);
  }
  return best;
}

ex::llama_dims bench_dims() {
  ex::llama_dims d;
  d.vocab_size = 32000;
  d.hidden_size = 4096;
  d.intermediate_size = 14336;
  d.num_layers = 8;
  d.num_heads = 32;
  d.num_kv_heads = 8;
  d.head_dim = 128;
  d.rms_norm_eps = 1e-5f;
  d.rope.theta = 500000.0;
  d.rope.dim = 128;
  return d;
}

/// Random bf16 weights; every layer points at the same host bytes (the device sources copy
/// each layer separately, so the bytes moved per token are those of distinct layers).
class synthetic_source final : public ex::llama_weights_source {
 public:
  explicit synthetic_source(const ex::llama_dims& d) {
    const auto H = d.hidden_size, I = d.intermediate_size, q = d.num_heads * d.head_dim,
               kv = d.num_kv_heads * d.head_dim;
    std::uint64_t state = 0x9e3779b97f4a7c15ULL;
    auto make = [&](std::int64_t r, std::int64_t c, bool norm) {
      auto& v = store_.emplace_back(static_cast<std::size_t>(r * c));
      for (auto& x : v) {
        if (norm) {
          x = 0x3f80;  // bf16 1.0
          continue;
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // |w| < 2^-6: a bf16 with exponent 2^-7 or 2^-8 and a random sign and mantissa.
        x = static_cast<std::uint16_t>(((state >> 20) & 0x8000U) | (0x3c00U + (state & 0xff)));
      }
      return ex::weight_ref::from_bits16(v.data(), sw::dtype::bfloat16, r, c);
    };
    store_.reserve(16);
    embed_ = make(d.vocab_size, H, false);
    norm_ = make(1, H, true);
    layer_.input_layernorm = make(1, H, true);
    layer_.post_attention_layernorm = make(1, H, true);
    layer_.q_proj = make(q, H, false);
    layer_.k_proj = make(kv, H, false);
    layer_.v_proj = make(kv, H, false);
    layer_.o_proj = make(H, q, false);
    layer_.gate_proj = make(I, H, false);
    layer_.up_proj = make(I, H, false);
    layer_.down_proj = make(H, I, false);
  }
  ex::weight_ref embed_tokens() override { return embed_; }
  ex::llama_layer_weights layer(std::int64_t) override { return layer_; }
  ex::weight_ref final_norm() override { return norm_; }
  ex::weight_ref lm_head() override { return embed_; }  // tied: one resident vocab matrix

 private:
  std::vector<std::vector<std::uint16_t>> store_;
  ex::weight_ref embed_, norm_;
  ex::llama_layer_weights layer_;
};

struct fixture {
  ex::llama_dims d = bench_dims();
  gpu::context ctx;
  synthetic_source host{d};
};
fixture& shared() {
  static fixture f;
  return f;
}

/// Timed decode steps after a 16-token prefill; returns seconds per token.
double run_decode(benchmark::State& state, gpu::llama_cuda_forward& fwd) {
  const std::int64_t prompt_len = 16;
  std::vector<std::int64_t> prompt(static_cast<std::size_t>(prompt_len));
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<std::int64_t>(3 + i);
  auto cache = fwd.make_cache(1, prompt_len + static_cast<std::int64_t>(state.max_iterations) + 1);
  auto logits = fwd.forward(prompt, 1, cache);
  std::int64_t next = ex::cpu::argmax(logits);
  std::int64_t tokens = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    logits = fwd.forward(std::span<const std::int64_t>(&next, 1), 1, cache);
    next = ex::cpu::argmax(logits);
    ++tokens;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  benchmark::DoNotOptimize(next);
  state.counters["tok_per_s"] = static_cast<double>(tokens) / s;
  return s / static_cast<double>(tokens);
}

void BM_resident(benchmark::State& state) {
  auto& f = shared();
  gpu::resident_llama_weights w(f.ctx, f.d, f.host);
  gpu::llama_cuda_forward fwd(f.d, w, f.ctx);
  run_decode(state, fwd);
  state.counters["device_GB"] = static_cast<double>(w.device_bytes()) / 1e9;
}

void BM_streamed(benchmark::State& state, bool prefetch) {
  auto& f = shared();
  gpu::stream_options o;
  o.prefetch_next = prefetch;
  gpu::streamed_llama_weights w(f.ctx, f.d, f.host, o);
  gpu::llama_cuda_forward fwd(f.d, w, f.ctx);
  const std::size_t before = w.streamer().bytes_copied();
  const auto copies_before = w.streamer().copies();
  const double s_per_tok = run_decode(state, fwd);
  // Bytes per token: one pass over the layers (the prefill's copies are excluded).
  const double copied = static_cast<double>(w.streamer().bytes_copied() - before);
  const double per_tok = copied / static_cast<double>(w.streamer().copies() - copies_before) *
                         static_cast<double>(f.d.num_layers);
  const double achieved = per_tok / s_per_tok;
  state.counters["streamed_GB_per_tok"] = per_tok / 1e9;
  state.counters["h2d_GBps"] = achieved / 1e9;
  state.counters["pinned_GBps"] = g_pinned_bw / 1e9;
  state.counters["h2d_fraction"] = achieved / g_pinned_bw;
  state.counters["bound_tok_per_s"] = g_pinned_bw / per_tok;
}

}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("offload_decode_bench: no CUDA device; nothing to measure\n");
    return 0;
  }
  g_pinned_bw = measure_pinned_h2d(shared().ctx);
  cudaDeviceProp prop{};
  gpu::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, pinned host->device: %.2f GB/s (1 GiB cudaMemcpyAsync, best of 5)\n",
              prop.name, g_pinned_bw / 1e9);
  benchmark::RegisterBenchmark("offload_decode/llama3-8b-shape-8L/bf16/resident", BM_resident)
      ->Unit(benchmark::kMillisecond)
      ->Iterations(32);
  benchmark::RegisterBenchmark("offload_decode/llama3-8b-shape-8L/bf16/streamed", BM_streamed, true)
      ->Unit(benchmark::kMillisecond)
      ->Iterations(32);
  benchmark::RegisterBenchmark("offload_decode/llama3-8b-shape-8L/bf16/streamed-no-prefetch",
                               BM_streamed, false)
      ->Unit(benchmark::kMillisecond)
      ->Iterations(32);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
