// GPU tests: from_pretrained with device maps that have a GPU entry runs the CUDA forward with
// accelerate's execution rules (main device = first GPU; GPU blocks in place, "cpu" blocks
// streamed from pinned memory, "disk" blocks read into pinned staging and streamed), and gives
// Transformers' logits (the committed fixtures of tools/gen_tiny_models.py) and the CPU path's
// logits (the same model through from_pretrained with an all-"cpu" map). Without a CUDA device
// the program says so and exits with 4.
//
// Tolerances are exec_llama.cu's: float32 weights run SGEMM in float32 everywhere, 5e-4 on
// logits of magnitude up to ~50 (summation order only); bfloat16 weights with
// gpu_fp32_activations run the CPU's arithmetic on the rounded weights, the same 5e-4.
// Streaming and residency never change the bytes a kernel reads, so every map of a model gives
// the all-GPU logits to 1e-6 (a cuBLAS algorithm choice may depend on pointer alignment).
#include "cuda_test_main.hpp"
#include "support/pretrained_options.hpp"
#include "support/temp_dir.hpp"
#include "support/tiny_fixture.hpp"

#include <stowage/dispatch/from_pretrained.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sw = stowage;
namespace fs = std::filesystem;
namespace ex = stowage::exec;
using stowage_test::b64_floats;
using stowage_test::ids_of;
using stowage_test::max_abs_diff;
using stowage_test::pretrained_options_for;
using stowage_test::read_json;
using stowage_test::temp_dir;
using fp32_model = sw::models::llama_for_causal_lm<sw::precision::fp32>;

namespace {

const std::string fixtures = stowage_test::tiny_fixtures_dir();
constexpr float f32_tol = 5e-4f;

struct placement {
  std::string label;
  sw::device_map map;
  std::int64_t resident, streamed, disk;  ///< decoder layers of each kind on the GPU forward
};

/// The maps every model runs under (`n` decoder layers).
std::vector<placement> placements(std::int64_t n) {
  const auto gpu = sw::device::gpu(0), cpu = sw::device::cpu(), disk = sw::device::disk();
  std::vector<placement> out;
  out.push_back({"all GPU", sw::device_map{{"", gpu}}, n, 0, 0});
  // GPU + cpu: odd layers resident, even layers streamed from pinned host memory; lm_head on
  // the host (copied to the GPU once).
  {
    sw::device_map m{{"model.embed_tokens", gpu}};
    std::int64_t streamed = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      m.set("model.layers." + std::to_string(i), i % 2 == 0 ? cpu : gpu);
      streamed += i % 2 == 0;
    }
    m.set("model.norm", gpu);
    m.set("model.rotary_emb", gpu);
    m.set("lm_head", cpu);
    out.push_back({"GPU + cpu", m, n - streamed, streamed, 0});
  }
  // GPU + cpu + disk: counted from the last layer, layers cycle disk / cpu / GPU (two layers:
  // cpu, disk; three: GPU, cpu, disk); embeddings on the host, norm and lm_head on disk.
  {
    sw::device_map m{{"model.embed_tokens", cpu}};
    std::int64_t resident = 0, disk_layers = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const auto c = (n - 1 - i) % 3;
      m.set("model.layers." + std::to_string(i), c == 0 ? disk : c == 1 ? cpu : gpu);
      resident += c == 2;
      disk_layers += c == 0;
    }
    m.set("model.norm", disk);
    m.set("model.rotary_emb", gpu);
    m.set("lm_head", disk);
    out.push_back({"GPU + cpu + disk", m, resident, n - resident, disk_layers});
  }
  // Every layer on disk, the ends on the GPU: consecutive disk layers share the staging
  // buffers (an odd count uses the third), wrapping from the last layer to the first.
  {
    sw::device_map m{{"model.embed_tokens", gpu}};
    for (std::int64_t i = 0; i < n; ++i) m.set("model.layers." + std::to_string(i), disk);
    m.set("model.norm", gpu);
    m.set("model.rotary_emb", gpu);
    m.set("lm_head", gpu);
    out.push_back({"GPU ends, layers on disk", m, 0, n, n});
  }
  return out;
}

}  // namespace

TEST_CASE("from_pretrained on the GPU: every map gives Transformers' and the CPU's logits",
          "[cuda][dispatch]") {
  const auto name = GENERATE(as<std::string>{}, "llama_gqa", "llama3_tied", "mistral", "qwen2");
  INFO("model " << name);
  const auto fx = read_json(fixtures + name + ".json");
  const auto dir = fixtures + fx["model_dir"].get<std::string>();
  const auto prompt = ids_of(fx["prompt"]);
  const auto expect = b64_floats(fx["logits_all"]["f32le_b64"]);
  const auto cfg = sw::models::llama_config::from_file(dir + "/config.json");
  const auto V = static_cast<std::size_t>(cfg.vocab_size);

  // The CPU path of the same call (an all-"cpu" map runs on the CPU forward).
  temp_dir cpu_tmp("cuda-dispatch");
  auto cpu_model = sw::from_pretrained<fp32_model>(
      dir,
      pretrained_options_for(sw::device_map{{"", sw::device::cpu()}}, cpu_tmp.path / "offload"));
  REQUIRE_FALSE(cpu_model.on_gpu());
  const auto cpu_logits = cpu_model.forward(prompt, ex::logits_mode::all);
  REQUIRE(max_abs_diff(cpu_logits, expect) <= 1e-4f);

  std::optional<std::vector<float>> all_gpu;
  for (const auto& p : placements(cfg.num_hidden_layers)) {
    INFO("placement " << p.label);
    temp_dir tmp("cuda-dispatch");
    auto m =
        sw::from_pretrained<fp32_model>(dir, pretrained_options_for(p.map, tmp.path / "offload"));
    REQUIRE(m.on_gpu());
    CHECK(m.execution_device() == sw::device::gpu(0));
    CHECK(m.hf_device_map() == p.map);
    const auto* w = m.gpu_weights();
    REQUIRE(w != nullptr);
    CHECK(w->resident_layers() == p.resident);
    CHECK(w->streamed_layers() == p.streamed);
    CHECK(w->disk_layers() == p.disk);
    // Where the loader put the weights: GPU memory, pinned host memory, the offload folder.
    const auto& store = m.weights().weights();
    CHECK(store.bytes_in(sw::storage::storage_kind::device) > 0);
    bool any_disk = false;
    for (const auto& [k, d] : p.map) any_disk = any_disk || d.is_disk();
    CHECK((store.bytes_in(sw::storage::storage_kind::file) > 0) == any_disk);
    // The ends are copied to the GPU exactly when one of them lives elsewhere (a tied lm_head
    // shares the embeddings' storage, wherever the map put the name).
    auto on_gpu = [&](const char* n) {
      const auto* s = store.find(n);
      return s == nullptr || s->kind() == sw::storage::storage_kind::device;
    };
    const bool ends_on_gpu = on_gpu("model.embed_tokens.weight") && on_gpu("model.norm.weight") &&
                             (cfg.tie_word_embeddings || on_gpu("lm_head.weight"));
    CHECK((w->uploaded_bytes() == 0) == ends_on_gpu);
    if (p.label == "all GPU" || p.label == "GPU ends, layers on disk") CHECK(ends_on_gpu);
    if (p.label == "GPU + cpu + disk") CHECK_FALSE(ends_on_gpu);
    if (p.streamed > p.disk) CHECK(store.bytes_in(sw::storage::storage_kind::pinned_host) > 0);

    const auto got = m.forward(prompt, ex::logits_mode::all);
    CHECK(max_abs_diff(got, expect) <= f32_tol);
    CHECK(max_abs_diff(got, cpu_logits) <= f32_tol);
    if (!all_gpu)
      all_gpu = got;
    else
      CHECK(max_abs_diff(got, *all_gpu) <= 1e-6f);

    // Prefill of 3, then one position at a time through the GPU KV cache: every step streams
    // (and re-reads from disk) the non-resident layers.
    auto cache = m.make_gpu_cache(1, 64);
    auto last = m.forward(std::span(prompt).first(3), 1, cache, ex::logits_mode::last);
    CHECK(max_abs_diff(last, std::span(expect).subspan(2 * V, V)) <= f32_tol);
    for (std::size_t t = 3; t < prompt.size(); ++t) {
      INFO("position " << t);
      last = m.forward(std::span(prompt).subspan(t, 1), 1, cache, ex::logits_mode::last);
      CHECK(max_abs_diff(last, std::span(expect).subspan(t * V, V)) <= f32_tol);
    }
    // The CPU-cache overload belongs to the CPU forward.
    auto cpu_cache = cpu_model.make_cache(1, 8);
    CHECK_THROWS_AS(m.forward(prompt, 1, cpu_cache), sw::invalid_config);

    // 32 greedy tokens, EOS ignored: Transformers' continuation.
    sw::pretrained_generate_options g;
    g.max_new_tokens = 32;
    g.eos_token_ids = std::vector<std::int64_t>{};
    std::vector<float> prompt_logits;
    g.on_prompt_logits = [&](std::span<const float> l) {
      prompt_logits.assign(l.begin(), l.end());
    };
    CHECK(m.generate(prompt, g) == ids_of(fx["greedy_32"]));
    CHECK(max_abs_diff(prompt_logits, std::span(expect).subspan((prompt.size() - 1) * V, V)) <=
          f32_tol);
  }
}

TEST_CASE("from_pretrained on the GPU: bf16 weights with fp32 activations",
          "[cuda][dispatch][bf16]") {
  const auto name = GENERATE(as<std::string>{}, "llama_gqa", "llama3_tied");
  INFO("model " << name);
  const auto fx = read_json(fixtures + name + ".json");
  const auto dir = fixtures + fx["model_dir"].get<std::string>();
  const auto prompt = ids_of(fx["prompt"]);
  const auto expect = b64_floats(fx["logits_all_bf16_weights"]["f32le_b64"]);
  const auto cfg = sw::models::llama_config::from_file(dir + "/config.json");
  for (const auto& p : placements(cfg.num_hidden_layers)) {
    INFO("placement " << p.label);
    temp_dir tmp("cuda-dispatch");
    auto o = pretrained_options_for(p.map, tmp.path / "offload");
    o.dtype = sw::dtype::bfloat16;
    o.gpu_fp32_activations = true;
    auto m = sw::from_pretrained<fp32_model>(dir, o);
    REQUIRE(m.on_gpu());
    CHECK(max_abs_diff(m.forward(prompt, ex::logits_mode::all), expect) <= f32_tol);
    CHECK(m.generate(prompt, {.max_new_tokens = 32,
                              .eos_token_ids = std::vector<std::int64_t>{},
                              .sampling = {},
                              .on_token = {},
                              .on_prompt_logits = {}}) == ids_of(fx["greedy_32_bf16_weights"]));
  }
}

TEST_CASE("from_pretrained on the GPU: maps the CUDA forward cannot run are refused before loading",
          "[cuda][dispatch]") {
  const auto fx = read_json(fixtures + "llama_gqa.json");
  const auto dir = fixtures + fx["model_dir"].get<std::string>();
  temp_dir tmp("cuda-dispatch");
  SECTION("two GPUs") {
    sw::device_map m{{"model.embed_tokens", sw::device::gpu(0)},
                     {"model.layers", sw::device::gpu(1)},
                     {"model.norm", sw::device::gpu(0)},
                     {"model.rotary_emb", sw::device::gpu(0)},
                     {"lm_head", sw::device::gpu(0)}};
    CHECK_THROWS_AS(
        sw::from_pretrained<fp32_model>(dir, pretrained_options_for(m, tmp.path / "offload")),
        sw::device_map_error);
  }
  SECTION("a quantized model type") {
    using nf4_model = sw::models::llama_for_causal_lm<sw::precision::nf4<sw::precision::fp32>>;
    CHECK_THROWS_WITH(sw::from_pretrained<nf4_model>(
                          dir, pretrained_options_for(sw::device_map{{"", sw::device::gpu(0)}},
                                                      tmp.path / "offload")),
                      Catch::Contains("CPU forward only"));
  }
  CHECK_FALSE(fs::exists(tmp.path / "offload"));
}

TEST_CASE("from_pretrained on the GPU: auto placement with measured budgets uses the GPU",
          "[cuda][dispatch]") {
  const auto fx = read_json(fixtures + "qwen2.json");
  const auto dir = fixtures + fx["model_dir"].get<std::string>();
  temp_dir tmp("cuda-dispatch");
  sw::pretrained_options o;
  o.offload_folder = tmp.path / "offload";
  o.load.progress = sw::progress_mode::never;
  auto m = sw::from_pretrained<fp32_model>(dir, o);  // placement::auto_, measure_max_memory()
  CHECK(m.on_gpu());
  // The CUDA forward runs on one GPU: measured budgets offer it the first one only.
  for (const auto& [k, d] : m.hf_device_map()) CHECK(d == sw::device::gpu(0));
  CHECK(max_abs_diff(m.forward(ids_of(fx["prompt"]), ex::logits_mode::all),
                     b64_floats(fx["logits_all"]["f32le_b64"])) <= f32_tol);
}
