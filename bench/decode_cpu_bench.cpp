// decode_cpu_bench: CPU decode speed (tokens/s, batch 1, KV cache) of the Llama forward for the
// bundled tiny-llama and a synthetic larger model (hidden 2048, 8 layers, random weights) in
// fp32 and bf16, against this machine's memory bandwidth measured in the same run: decode reads
// every weight once a token, so bytes_per_token / bandwidth is the speed limit, and the
// counter `bw_fraction` says how close the run comes to it.
// Run: build-rel/bench/decode_cpu_bench [--benchmark_min_time=2]
#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/exec/llama_forward.hpp>
#include <stowage/precision/convert.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace ex = stowage::exec;
namespace sw = stowage;

namespace {

double g_bandwidth = 0;  // bytes/s, read-only streaming, all threads

/// Best of several multi-threaded passes summing a 512 MiB buffer (far beyond the caches).
double measure_read_bandwidth(ex::thread_pool& pool) {
  const std::size_t n = (512u << 20) / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<double> partial(pool.size() * 16, 0.0);
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(n, n / pool.size(), [&](std::size_t b, std::size_t e) {
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
      std::size_t i = b;
      for (; i + 8 <= e; i += 8) {
        s0 += buf[i];
        s1 += buf[i + 1];
        s2 += buf[i + 2];
        s3 += buf[i + 3];
        s4 += buf[i + 4];
        s5 += buf[i + 5];
        s6 += buf[i + 6];
        s7 += buf[i + 7];
      }
      partial[(b * pool.size() / n) * 16] =
          static_cast<double>(s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7);
    });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    benchmark::DoNotOptimize(partial.data());
    best = std::max(best, static_cast<double>(n * sizeof(float)) / dt);
  }
  return best;
}

/// Owned synthetic weights (random, small magnitude) in fp32 or bf16.
struct synthetic_model {
  ex::llama_dims d;
  std::vector<std::unique_ptr<std::vector<float>>> f32;
  std::vector<std::unique_ptr<std::vector<std::uint16_t>>> b16;
  std::unordered_map<std::string, ex::weight_ref> refs;
  double weight_bytes_per_token = 0;

  synthetic_model(ex::llama_dims dims, sw::dtype t) : d(std::move(dims)) {
    std::mt19937 rng(42);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    auto add = [&](const std::string& name, std::int64_t r, std::int64_t c, bool per_token) {
      auto v = std::make_unique<std::vector<float>>(static_cast<std::size_t>(r * c));
      for (auto& x : *v) x = name.find("norm") != std::string::npos ? 1.0f : nd(rng);
      if (t == sw::dtype::bfloat16 && r > 1) {
        auto h = std::make_unique<std::vector<std::uint16_t>>(v->size());
        sw::precision::fp32_to_bf16(*v, *h);
        refs[name] = ex::weight_ref::from_bits16(h->data(), t, r, c, name);
        b16.push_back(std::move(h));
        if (per_token) weight_bytes_per_token += static_cast<double>(r * c * 2);
      } else {
        refs[name] = ex::weight_ref::from_f32(v->data(), r, c, name);
        f32.push_back(std::move(v));
        if (per_token) weight_bytes_per_token += static_cast<double>(r * c * 4);
      }
    };
    const auto H = d.hidden_size, I = d.intermediate_size, q = d.num_heads * d.head_dim,
               kv = d.num_kv_heads * d.head_dim;
    add("model.embed_tokens.weight", d.vocab_size, H, false);
    add("lm_head.weight", d.vocab_size, H, true);
    add("model.norm.weight", 1, H, true);
    for (std::int64_t i = 0; i < d.num_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      add(p + "input_layernorm.weight", 1, H, true);
      add(p + "post_attention_layernorm.weight", 1, H, true);
      add(p + "self_attn.q_proj.weight", q, H, true);
      add(p + "self_attn.k_proj.weight", kv, H, true);
      add(p + "self_attn.v_proj.weight", kv, H, true);
      add(p + "self_attn.o_proj.weight", H, q, true);
      add(p + "mlp.gate_proj.weight", I, H, true);
      add(p + "mlp.up_proj.weight", I, H, true);
      add(p + "mlp.down_proj.weight", H, I, true);
    }
  }
  std::optional<ex::weight_ref> get(std::string_view n) const {
    auto it = refs.find(std::string(n));
    return it == refs.end() ? std::nullopt : std::optional(it->second);
  }
};

ex::llama_dims synthetic_dims() {
  ex::llama_dims d;
  d.vocab_size = 8192;
  d.hidden_size = 2048;
  d.intermediate_size = 5632;
  d.num_layers = 8;
  d.num_heads = 16;
  d.num_kv_heads = 4;
  d.head_dim = 128;
  d.rms_norm_eps = 1e-5f;
  d.rope.dim = 128;
  return d;
}

void run_decode(benchmark::State& state, ex::llama_cpu_forward& fwd, double bytes_per_token) {
  const std::int64_t prompt_len = 16, steps = 64;
  std::vector<std::int64_t> prompt(static_cast<std::size_t>(prompt_len));
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<std::int64_t>(3 + i);
  std::int64_t tokens = 0;
  double decode_seconds = 0;
  for (auto _ : state) {
    auto cache = fwd.make_cache(1, prompt_len + steps + 1);
    auto logits = fwd.forward(prompt, 1, cache);
    std::int64_t next = ex::cpu::argmax(logits);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t s = 0; s < steps; ++s) {
      logits = fwd.forward(std::span<const std::int64_t>(&next, 1), 1, cache);
      next = ex::cpu::argmax(logits);
    }
    decode_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens += steps;
    benchmark::DoNotOptimize(next);
  }
  const double tps = static_cast<double>(tokens) / decode_seconds;
  state.counters["decode_tok_per_s"] = tps;
  state.counters["weight_MB_per_tok"] = bytes_per_token / 1e6;
  state.counters["bound_tok_per_s"] = g_bandwidth / bytes_per_token;
  state.counters["bw_fraction"] = tps * bytes_per_token / g_bandwidth;
}

void BM_decode_synthetic(benchmark::State& state, sw::dtype t) {
  static std::map<int, std::unique_ptr<synthetic_model>> models;
  auto& m = models[static_cast<int>(t)];
  if (!m) m = std::make_unique<synthetic_model>(synthetic_dims(), t);
  ex::named_llama_weights w(m->d, [&](std::string_view n) { return m->get(n); });
  ex::llama_cpu_forward fwd(m->d, w);
  run_decode(state, fwd, m->weight_bytes_per_token);
}

void BM_decode_tiny_llama(benchmark::State& state) {
  const std::string dir = std::string(STOWAGE_EXAMPLES_DIR) + "/models/tiny-llama";
  const auto d = ex::llama_dims::from_file(dir + "/config.json");
  const auto f = sw::checkpoint::safetensors_file::open(dir + "/model.safetensors");
  double bytes = 0;
  ex::named_llama_weights w(d, [&](std::string_view n) -> std::optional<ex::weight_ref> {
    const auto* e = f.find(n);
    if (!e) return std::nullopt;
    const auto v = f.view(*e);
    const auto& s = v.desc.shape;
    if (n.find("embed_tokens") == std::string_view::npos || d.tie_word_embeddings)
      bytes += static_cast<double>(v.size());
    return ex::weight_ref::from_f32(reinterpret_cast<const float*>(v.data()),
                                    s.rank() == 2 ? s[0] : 1, s[s.rank() - 1], std::string(n));
  });
  ex::llama_cpu_forward fwd(d, w);
  run_decode(state, fwd, bytes);
}

}  // namespace

int main(int argc, char** argv) {
  g_bandwidth = measure_read_bandwidth(ex::default_thread_pool());
  std::printf("threads: %zu, measured read bandwidth: %.2f GB/s\n",
              ex::default_thread_pool().size(), g_bandwidth / 1e9);
  benchmark::RegisterBenchmark("decode/tiny-llama/fp32", BM_decode_tiny_llama)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("decode/synthetic-2048x8/fp32", BM_decode_synthetic,
                               sw::dtype::float32)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("decode/synthetic-2048x8/bf16", BM_decode_synthetic,
                               sw::dtype::bfloat16)
      ->Unit(benchmark::kMillisecond);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
