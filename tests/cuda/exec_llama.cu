// GPU tests: the CUDA Llama / Mistral / Qwen2 forward (exec/cuda/llama_forward.cuh) on the tiny
// random models of tools/gen_tiny_models.py gives the CPU forward's logits and Transformers'
// (the committed fixtures), all weights resident and layers streamed through the double-
// buffered layer_streamer. Without a CUDA device the program says so and exits with 4.
//
// Tolerances, and why:
// - float32 weights (SGEMM, float32 everywhere): 5e-4 absolute on logits of magnitude up to ~50.
//   The CPU forward matches Transformers to 1e-4; the GPU does the same float32 operations with
//   sums in other orders (cuBLAS tiles, tree reductions, a streaming softmax), a relative error
//   of a few 1e-6 per value that three layers and the lm_head grow to well under 5e-4.
// - bfloat16 weights with linear_mode::fp32_activations (weights widened, SGEMM): the CPU's
//   arithmetic, so the same 5e-4 against Transformers run on the same rounded weights.
// - bfloat16 weights with linear_mode::weight_type (activations rounded to bf16 for
//   cublasGemmEx, float32 accumulation): each matmul input carries bf16's 2^-9 relative
//   rounding, which the CPU (float32 activations) does not. A float64 emulation of exactly
//   this arithmetic (tests/cuda/emulate_cuda_forward.py --bf16-activations, which also checks
//   every kernel's index formulas against the fixtures) on these four models lands 0.6% to
//   1.2% of the largest logit away from the reference, so the bound is 3% of it: a wrong
//   transpose, head mapping or position is off by 100%.
// - streamed vs resident: the same kernels on the same bytes, so identical logits (1e-6 only
//   to allow cuBLAS another algorithm for another pointer alignment).
#include "cuda_test_main.hpp"
#include "support/forward_contract.hpp"
#include "support/tiny_fixture.hpp"

#include <stowage/exec/cuda/llama_forward.cuh>
#include <stowage/exec/llama_forward.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace sw = stowage;
namespace ex = stowage::exec;
namespace gpu = stowage::exec::cuda;
using stowage_test::b64_floats;
using stowage_test::greedy_options;
using stowage_test::ids_of;
using stowage_test::loaded_model;
using stowage_test::max_abs;
using stowage_test::max_abs_diff;
using stowage_test::read_json;

namespace {

const std::string fixtures = stowage_test::tiny_fixtures_dir();

/// A device weights source of either kind over the same host model.
std::unique_ptr<gpu::llama_device_weights_source> make_source(const std::string& kind,
                                                              const gpu::context& ctx,
                                                              loaded_model& m) {
  if (kind == "resident")
    return std::make_unique<gpu::resident_llama_weights>(ctx, m.dims, *m.weights);
  gpu::stream_options o;
  o.prefetch_next = kind != "streamed-on-demand";
  return std::make_unique<gpu::streamed_llama_weights>(ctx, m.dims, *m.weights, o);
}

constexpr float f32_tol = 5e-4f;

}  // namespace

TEST_CASE("cuda forward: fp32 tiny models give the CPU's and Transformers' logits",
          "[cuda][llama]") {
  const auto name = GENERATE(as<std::string>{}, "llama_gqa", "llama3_tied", "mistral", "qwen2");
  const auto kind = GENERATE(as<std::string>{}, "resident", "streamed", "streamed-on-demand");
  INFO("model " << name << ", weights " << kind);
  const auto fx = read_json(fixtures + name + ".json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::float32);
  ex::thread_pool pool(1);
  ex::llama_cpu_forward cpu_fwd(m.dims, *m.weights, pool);
  gpu::context ctx;
  auto src = make_source(kind, ctx, m);
  gpu::llama_cuda_forward fwd(m.dims, *src, ctx);
  const auto prompt = ids_of(fx["prompt"]);
  const auto expect_all = b64_floats(fx["logits_all"]["f32le_b64"]);
  const auto V = static_cast<std::size_t>(m.dims.vocab_size);
  REQUIRE(expect_all.size() == prompt.size() * V);

  SECTION("all positions in one prefill") {
    auto cache = fwd.make_cache(1, 64);
    const auto got = fwd.forward(prompt, 1, cache, ex::logits_mode::all);
    CHECK(max_abs_diff(got, expect_all) <= f32_tol);
    auto ccache = cpu_fwd.make_cache(1, 64);
    CHECK(max_abs_diff(got, cpu_fwd.forward(prompt, 1, ccache, ex::logits_mode::all)) <= f32_tol);
    CHECK(cache.length() == static_cast<std::int64_t>(prompt.size()));
  }
  stowage_test::check_forward_contract(fwd, fx, V, f32_tol);
  SECTION("seeded sampling draws the CPU's tokens from the same logits") {
    auto o = greedy_options(8);
    o.sampling.do_sample = true;
    o.sampling.temperature = 0.7f;
    o.sampling.top_k = 20;
    o.sampling.seed = 1234;
    // Tokens agree unless a draw lands within ~1e-4 of a cumulative-probability edge.
    CHECK(fwd.generate(prompt, 1, o) == cpu_fwd.generate(prompt, 1, o));
  }
}

TEST_CASE("cuda forward: streamed layers give exactly the resident logits", "[cuda][llama]") {
  // llama_gqa has 3 layers: an odd count makes the wrap from the last layer to layer 0 of the
  // next step land in the slot that just ran, exercising the slot choice.
  const auto fx = read_json(fixtures + "llama_gqa.json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::bfloat16);
  gpu::context ctx;
  gpu::resident_llama_weights resident(ctx, m.dims, *m.weights);
  gpu::streamed_llama_weights streamed(ctx, m.dims, *m.weights);
  gpu::llama_cuda_forward a(m.dims, resident, ctx), b(m.dims, streamed, ctx);
  const auto prompt = ids_of(fx["prompt"]);
  auto ca = a.make_cache(1, 32), cb = b.make_cache(1, 32);
  CHECK(max_abs_diff(a.forward(prompt, 1, ca, ex::logits_mode::all),
                     b.forward(prompt, 1, cb, ex::logits_mode::all)) <= 1e-6f);
  for (std::int64_t t = 0; t < 10; ++t) {
    const std::vector<std::int64_t> id{(7 * t + 3) % m.dims.vocab_size};
    CHECK(max_abs_diff(a.forward(id, 1, ca), b.forward(id, 1, cb)) <= 1e-6f);
  }
  const auto& s = streamed.streamer();
  CHECK(s.num_layers() == 3);
  // Every layer of every step crossed the bus: 11 forwards x 3 layers, plus the prefetch of
  // layer 0 for a step that never came.
  CHECK(s.copies() == 11 * 3 + 1);
  const auto& d = m.dims;
  const std::int64_t q_out = d.num_heads * d.head_dim, kv_out = d.num_kv_heads * d.head_dim;
  const std::int64_t layer_bytes =
      2 * (2 * d.hidden_size + 2 * q_out * d.hidden_size + 2 * kv_out * d.hidden_size +
           3 * d.intermediate_size * d.hidden_size);  // bf16: two norms, q/o, k/v, the MLP
  CHECK(s.bytes_copied() == static_cast<std::size_t>((11 * 3 + 1) * layer_bytes));
}

TEST_CASE("cuda forward: bf16 weights", "[cuda][llama][bf16]") {
  const auto name = GENERATE(as<std::string>{}, "llama_gqa", "llama3_tied", "mistral", "qwen2");
  const auto kind = GENERATE(as<std::string>{}, "resident", "streamed");
  INFO("model " << name << ", weights " << kind);
  const auto fx = read_json(fixtures + name + ".json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::bfloat16);
  gpu::context ctx;
  auto src = make_source(kind, ctx, m);
  const auto prompt = ids_of(fx["prompt"]);
  const auto expect = b64_floats(fx["logits_all_bf16_weights"]["f32le_b64"]);

  SECTION("fp32 activations: Transformers' fp32 compute on the rounded weights") {
    gpu::llama_cuda_forward fwd(m.dims, *src, ctx, {gpu::linear_mode::fp32_activations});
    auto cache = fwd.make_cache(1, 64);
    CHECK(max_abs_diff(fwd.forward(prompt, 1, cache, ex::logits_mode::all), expect) <= f32_tol);
    CHECK(fwd.generate(prompt, 1, greedy_options(32)).at(0) ==
          ids_of(fx["greedy_32_bf16_weights"]));
  }
  SECTION("bf16 activations into cublasGemmEx: close to the fp32-activation logits") {
    gpu::llama_cuda_forward fwd(m.dims, *src, ctx, {gpu::linear_mode::weight_type});
    auto cache = fwd.make_cache(1, 64);
    const auto got = fwd.forward(prompt, 1, cache, ex::logits_mode::all);
    CHECK(max_abs_diff(got, expect) <= 0.03f * max_abs(expect));
  }
}

TEST_CASE("cuda forward: bad inputs are typed errors", "[cuda][llama]") {
  const auto fx = read_json(fixtures + "qwen2.json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::float32);
  gpu::context ctx;
  gpu::streamed_llama_weights w(ctx, m.dims, *m.weights);
  gpu::llama_cuda_forward fwd(m.dims, w, ctx);
  auto cache = fwd.make_cache(1, 4);
  const std::vector<std::int64_t> bad{1, m.dims.vocab_size};
  CHECK_THROWS_AS(fwd.forward(bad, 1, cache), sw::invalid_size);
  const std::vector<std::int64_t> too_long{1, 2, 3, 4, 5};
  CHECK_THROWS_AS(fwd.forward(too_long, 1, cache), sw::invalid_size);
  CHECK_THROWS_AS(fwd.forward(too_long, 2, cache), sw::invalid_size);
  // After the errors the streamer is consistent: a good call still works.
  const std::vector<std::int64_t> ok{1, 2};
  CHECK(fwd.forward(ok, 1, cache).size() == static_cast<std::size_t>(m.dims.vocab_size));
  CHECK(cache.length() == 2);
}

TEST_CASE("layer_streamer: double buffering, wrap-around and misuse", "[cuda][streamer]") {
  gpu::context ctx;
  // Four layers of different sizes, each filled with its index.
  std::vector<gpu::pinned_buffer> host;
  std::vector<std::vector<gpu::host_tensor>> layers;
  const std::size_t sizes[4][2] = {{1000, 24}, {300, 4096}, {8, 8}, {5000, 1}};
  for (int i = 0; i < 4; ++i) {
    auto& hb = host.emplace_back(sizes[i][0] + sizes[i][1]);
    std::memset(hb.data(), i + 1, hb.size());
    layers.push_back({{hb.data(), sizes[i][0]}, {hb.data() + sizes[i][0], sizes[i][1]}});
  }
  gpu::layer_streamer s(ctx, layers);
  // Largest layer once each tensor starts 256-aligned: 5000 -> 5120, then 1 -> 256.
  CHECK(s.slot_bytes() == 5120 + 256);
  for (int round = 0; round < 3; ++round)
    for (std::int64_t i = 0; i < 4; ++i) {
      const auto ptrs = s.acquire(i);
      REQUIRE(ptrs.size() == 2);
      for (std::size_t k = 0; k < 2; ++k) {
        CHECK(reinterpret_cast<std::uintptr_t>(ptrs[k]) % 256 == 0);
        std::vector<unsigned char> back(sizes[i][k]);
        gpu::check(cudaMemcpyAsync(back.data(), ptrs[k], back.size(), cudaMemcpyDeviceToHost,
                                   ctx.compute()),
                   "test download");
        ctx.sync_compute();
        CHECK(std::all_of(back.begin(), back.end(),
                          [&](unsigned char c) { return c == static_cast<unsigned char>(i + 1); }));
      }
      s.release(i);
    }
  CHECK(s.copies() == 3 * 4 + 1);  // each acquire found its layer prefetched
  CHECK_THROWS_AS(s.acquire(4), sw::invalid_size);
  CHECK_THROWS_AS(s.release(2), sw::error);  // not acquired
  (void)s.acquire(1);
  (void)s.acquire(2);                        // the prefetched one
  CHECK_THROWS_AS(s.acquire(3), sw::error);  // both slots hold acquired layers
  s.release(1);
  s.release(2);
}
