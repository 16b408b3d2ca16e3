// stowage/dispatch/from_pretrained.hpp: Transformers' from_pretrained(dir, device_map=...,
// max_memory=..., offload_folder=...) for the Llama family, in one call:
//   config.json -> init_empty<Model> -> infer_device_map<Placement> (or a given map / a
//   run-time strategy string) -> load_checkpoint_and_dispatch -> hooks + offloaded_llama_weights
//   -> a ready model with forward, generate, hf_device_map, and the tokenizer when the folder
//   has tokenizer.json.
// Precision comes from the model type: fp32 / fp16 / bf16 load in that dtype; int8 / nf4 / fp4
// quantize on load: every Linear weight Transformers would replace is converted to the
// policy's compute dtype and quantized chunk by chunk as it streams in (bitsandbytes' layouts:
// LLM.int8 row-wise SCB, NF4/FP4 block absmax), so the full-precision model is never held;
// the store keeps only the packed weights and their state tensors, wherever the map puts
// them (host memory or the offload folder). The CPU forward runs them straight from the store
// through quantized_weight: the fused gemm_4bit / gemm_int8 kernels for decode-sized batches,
// the row decoder for prefill. A checkpoint that is already quantized (config.json
// quantization_config) runs the same way, whatever the model type.
// GPU execution: a device map with a GPU entry runs on the CUDA forward (exec/cuda) with
// accelerate's rules (main device = first GPU of the map; its blocks run in place, "cpu"
// blocks stream from pinned memory and "disk" blocks from the offload folder through pinned
// staging, see dispatch/cuda/device_llama_weights.cuh). Its kernels need nvcc, so it exists in
// translation units compiled by nvcc with STOWAGE_WITH_CUDA (a .cu file linked to the CMake
// target stowage::cuda); elsewhere a map with a GPU entry is a device_map_error saying so, and
// measured budgets (no max_memory given) leave the GPUs out, so "auto" plans for the CPU. The
// two kinds of translation unit see pretrained_model / from_pretrained in different inline
// namespaces (pretrained_gpu / pretrained_cpu), so a program may contain both without an ODR
// violation.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/dispatch/load.hpp>
#include <stowage/dispatch/offload.hpp>
#include <stowage/dispatch/quantized_weights.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/exec/llama_forward.hpp>
#include <stowage/exec/thread_pool.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/models/llama_config.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/placement/max_memory.hpp>
#include <stowage/placement/policies.hpp>
#include <stowage/precision/floating.hpp>
#include <stowage/precision/int8.hpp>
#include <stowage/precision/kernels_cpu.hpp>
#include <stowage/precision/nf4.hpp>
#include <stowage/precision/quant_state.hpp>
#include <stowage/text/bpe_tokenizer.hpp>

#if defined(STOWAGE_WITH_CUDA) && defined(__CUDACC__)
#define STOWAGE_PRETRAINED_GPU 1
#include <stowage/dispatch/cuda/device_llama_weights.cuh>
#include <stowage/exec/cuda/context.cuh>
#include <stowage/exec/cuda/llama_forward.cuh>
#else
#define STOWAGE_PRETRAINED_GPU 0
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stowage {

/// Options of from_pretrained (Transformers' keyword arguments, as fields).
struct pretrained_options {
  /// Budgets per device; empty: what the machine offers now (measure_max_memory()).
  stowage::max_memory max_memory;
  /// Where "disk" entries go (required when the plan puts anything on disk).
  std::optional<std::filesystem::path> offload_folder;
  /// Module classes never split; empty: the model's no_split_modules() (LlamaDecoderLayer).
  std::vector<std::string> no_split;
  /// Target dtype of floating tensors for a floating-point model type (else the model's).
  std::optional<stowage::dtype> dtype;
  /// A device map to use as is (planning skipped).
  std::optional<stowage::device_map> device_map;
  /// A run-time placement strategy ("auto", "balanced", "balanced_low_0", "sequential")
  /// used instead of the Placement template argument (command-line tools).
  std::optional<std::string> placement;
  /// How offloaded blocks are brought in (blocks in flight, background reader).
  offload_options offload;
  /// Worker threads of the forward (0: the default thread pool).
  unsigned threads = 0;
  /// GPU execution of float16 / bfloat16 weights: widen them and multiply in float32 (the CPU
  /// forward's arithmetic) instead of rounding activations to the weight type for cuBLAS's
  /// 16-bit GEMM with float32 accumulation (the default, faster). No effect on float32.
  bool gpu_fp32_activations = false;
  /// The rest of the loader's options (progress, staging window, test hooks...). Its dtype
  /// and offload_folder are overridden by the fields above.
  load_options load;
};

/// Streaming generation options: exec's options plus a callback per new token.
struct pretrained_generate_options {
  std::int64_t max_new_tokens = 32;
  /// EOS ids; empty: the config's eos_token_id (and generation_config.json's) when known.
  std::optional<std::vector<std::int64_t>> eos_token_ids;
  exec::cpu::sampling_options sampling;
  /// Called with each new token as soon as it is sampled (streaming output).
  std::function<void(std::int64_t token)> on_token;
  /// Receives the float32 logits of the last prompt position (before the first sample).
  std::function<void(std::span<const float> logits)> on_prompt_logits;
};

namespace detail {

/// Bytes the quantized weights of a store occupy (packed weights + every state tensor, in
/// host memory and offload files alike; a tie counted once).
inline std::uint64_t quantized_store_bytes(const weight_store& s) {
  std::vector<const storage::tensor_storage*> seen;
  std::uint64_t total = 0;
  auto count = [&](std::string_view n) {
    const auto* st = s.find(n);
    if (!st || std::find(seen.begin(), seen.end(), st) != seen.end()) return;
    seen.push_back(st);
    total += st->size();
  };
  for (const auto& n : s.names()) {
    const auto layout = quantized_layout_of(s, n);
    if (layout == quantized_layout::none) continue;
    count(n);
    if (layout == quantized_layout::bnb_4bit) {
      const std::string prefix = n + ".";
      for (const auto& o : s.names())
        if (o.starts_with(prefix)) count(o);
    } else {
      const std::string module = n.substr(0, n.size() - 6);  // "<module>."
      count(module + "SCB");
      count(module + "weight_format");
    }
  }
  return total;
}

}  // namespace detail

namespace detail {
inline void add_eos(std::vector<std::int64_t>& out, const nlohmann::json& v) {
  if (v.is_number_integer())
    out.push_back(v.get<std::int64_t>());
  else if (v.is_array())
    for (const auto& x : v)
      if (x.is_number_integer()) out.push_back(x.get<std::int64_t>());
}
inline std::vector<std::int64_t> eos_ids_of(const std::filesystem::path& dir) {
  std::vector<std::int64_t> out;
  for (const char* f : {"generation_config.json", "config.json"}) {
    std::ifstream in(dir / f);
    if (!in) continue;
    const auto j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_object() && j.contains("eos_token_id")) {
      add_eos(out, j["eos_token_id"]);
      if (!out.empty()) break;
    }
  }
  return out;
}
}  // namespace detail

namespace detail {
/// Why a map with a GPU entry cannot run here (the end of from_pretrained's device_map_error).
inline constexpr const char* no_gpu_execution_reason =
#if defined(STOWAGE_WITH_CUDA)
    " but this call was compiled without GPU execution: call from_pretrained from a .cu file "
    "compiled by nvcc and linked to the CMake target stowage::cuda, or give a map / budgets "
    "without GPUs";
#else
    " but stowage was built without CUDA (GPU execution needs the CUDA toolkit: from_pretrained "
    "called from a .cu file compiled by nvcc and linked to the CMake target stowage::cuda)";
#endif
}  // namespace detail

// Translation units compiled by nvcc with CUDA and the others see different pretrained_model
// layouts and from_pretrained bodies: each kind in its own inline namespace (no ODR clash).
#if STOWAGE_PRETRAINED_GPU
inline namespace pretrained_gpu {
#else
inline namespace pretrained_cpu {
#endif

/// A loaded, dispatched Llama-family model ready to run: on the CPU forward, or (in a .cu
/// translation unit of a CUDA build, for a map with a GPU entry) on the CUDA forward of the
/// main device. Move-only.
template <module_type Model>
class pretrained_model {
 public:
  using model_type = Model;
  using precision_type = typename Model::precision_type;

  const Model& model() const noexcept { return *model_; }
  const models::llama_config& config() const noexcept { return model_->config; }
  const exec::llama_dims& dims() const noexcept { return dims_; }
  /// The device map the model was dispatched with (Transformers' model.hf_device_map).
  const device_map& hf_device_map() const noexcept { return weights_->map(); }
  const dispatched_weights& weights() const noexcept { return *weights_; }
  const hook_table& hooks() const noexcept { return hooks_; }
  /// The planner's fit report (empty when a map was given).
  const fit_report& plan_report() const noexcept { return plan_report_; }
  /// The tokenizer of the folder's tokenizer.json, if it has one.
  const std::optional<text::bpe_tokenizer>& tokenizer() const noexcept { return *tokenizer_; }
  /// Seconds from config.json to a runnable model (planning + loading + quantizing).
  double load_seconds() const noexcept { return load_seconds_; }
  const load_report& report() const noexcept { return weights_->report(); }
  /// Bytes the quantized weights occupy in the store (packed weights + state tensors, host
  /// memory and offload files together; 0 for a floating-point model). Nothing else holds
  /// them: the forward reads these bytes in place.
  std::uint64_t quantized_bytes() const noexcept { return quantized_bytes_; }
  /// Linear weights the forward runs quantized (quantized on load or stored quantized).
  std::size_t quantized_linear_count() const noexcept { return quant_->size(); }
  /// The reader of the CPU forward's file-backed blocks (an idle one on the GPU forward).
  const block_prefetcher& prefetcher() const noexcept {
#if STOWAGE_PRETRAINED_GPU
    if (gpu_src_) return *no_blocks_;  // GPU disk layers are read by the streaming source
#endif
    return source_->prefetcher();
  }
  /// EOS ids from config.json / generation_config.json.
  const std::vector<std::int64_t>& eos_token_ids() const noexcept { return eos_; }
  /// Where the blocks compute: the main device (first GPU of the map) on the CUDA forward,
  /// else "cpu".
  device execution_device() const noexcept {
    return on_gpu() ? weights_->main_device() : device::cpu();
  }
  /// Whether the model runs on the CUDA forward.
  bool on_gpu() const noexcept {
#if STOWAGE_PRETRAINED_GPU
    return gpu_fwd_ != nullptr;
#else
    return false;
#endif
  }

  /// A KV cache of the CPU forward (invalid_config on a model that runs on the GPU).
  exec::cpu::kv_cache make_cache(std::int64_t batch, std::int64_t capacity) const {
    return cpu_forward().make_cache(batch, capacity);
  }
  /// Logits ([batch, vocab] for the last position, or [batch, seq, vocab]) on the CPU forward.
  std::vector<float> forward(std::span<const std::int64_t> ids, std::int64_t batch,
                             exec::cpu::kv_cache& cache,
                             exec::logits_mode mode = exec::logits_mode::last) {
    return cpu_forward().forward(ids, batch, cache, mode);
  }
#if STOWAGE_PRETRAINED_GPU
  /// The CUDA forward's twins of make_cache / forward (invalid_config on a CPU model).
  exec::cuda::kv_cache make_gpu_cache(std::int64_t batch, std::int64_t capacity) const {
    return gpu_forward().make_cache(batch, capacity);
  }
  std::vector<float> forward(std::span<const std::int64_t> ids, std::int64_t batch,
                             exec::cuda::kv_cache& cache,
                             exec::logits_mode mode = exec::logits_mode::last) {
    return gpu_forward().forward(ids, batch, cache, mode);
  }
  /// The GPU weights source (nullptr on a CPU model): what is resident, streamed, from disk.
  const dispatched_llama_device_weights* gpu_weights() const noexcept { return gpu_src_.get(); }
#endif
  /// One prompt, fresh cache, on whichever forward the model runs.
  std::vector<float> forward(std::span<const std::int64_t> ids,
                             exec::logits_mode mode = exec::logits_mode::last) {
#if STOWAGE_PRETRAINED_GPU
    if (on_gpu()) {
      auto cache = make_gpu_cache(1, static_cast<std::int64_t>(ids.size()));
      return gpu_fwd_->forward(ids, 1, cache, mode);
    }
#endif
    auto cache = make_cache(1, static_cast<std::int64_t>(ids.size()));
    return fwd_->forward(ids, 1, cache, mode);
  }

  /// Greedy or sampled continuation of one prompt; new tokens only (ending with EOS when one
  /// was produced). on_token streams them as they come.
  std::vector<std::int64_t> generate(std::span<const std::int64_t> prompt,
                                     const pretrained_generate_options& o = {}) {
    if (o.max_new_tokens < 0) throw invalid_config("generate: max_new_tokens must be >= 0");
    if (prompt.empty()) throw invalid_size("generate: the prompt is empty");
    if (o.max_new_tokens == 0) return {};
    const auto capacity = static_cast<std::int64_t>(prompt.size()) + o.max_new_tokens;
#if STOWAGE_PRETRAINED_GPU
    if (on_gpu()) {
      auto cache = make_gpu_cache(1, capacity);
      return generate_with(prompt, o, [&](std::span<const std::int64_t> ids) {
        return gpu_fwd_->forward(ids, 1, cache, exec::logits_mode::last);
      });
    }
#endif
    auto cache = make_cache(1, capacity);
    return generate_with(prompt, o, [&](std::span<const std::int64_t> ids) {
      return fwd_->forward(ids, 1, cache, exec::logits_mode::last);
    });
  }

  template <module_type M, placement_policy P>
  friend pretrained_model<M> from_pretrained(const std::filesystem::path&,
                                             const pretrained_options&);

 private:
  pretrained_model() = default;

  exec::llama_cpu_forward& cpu_forward() const {
    if (!fwd_)
      throw invalid_config(
          "pretrained_model: the model runs on the CUDA forward of " +
          weights_->main_device().to_string() +
          "; use make_gpu_cache and forward with an exec::cuda::kv_cache (or forward(ids) / "
          "generate)");
    return *fwd_;
  }
#if STOWAGE_PRETRAINED_GPU
  exec::cuda::llama_cuda_forward& gpu_forward() const {
    if (!gpu_fwd_)
      throw invalid_config(
          "pretrained_model: the model runs on the CPU forward; use make_cache and forward with "
          "an exec::cpu::kv_cache");
    return *gpu_fwd_;
  }
#endif

  /// The sampling loop of generate over one forward step (ids -> last-position logits).
  template <class Step>
  std::vector<std::int64_t> generate_with(std::span<const std::int64_t> prompt,
                                          const pretrained_generate_options& o, Step&& step) {
    const auto& eos = o.eos_token_ids ? *o.eos_token_ids : eos_;
    std::vector<std::int64_t> out;
    exec::cpu::sampler sampler(o.sampling);
    auto logits = step(prompt);
    if (o.on_prompt_logits) o.on_prompt_logits(logits);
    for (std::int64_t i = 0; i < o.max_new_tokens; ++i) {
      const std::int64_t t = sampler.next(logits);
      out.push_back(t);
      if (o.on_token) o.on_token(t);
      if (std::find(eos.begin(), eos.end(), t) != eos.end() || i + 1 == o.max_new_tokens) break;
      const std::int64_t one[1] = {t};
      logits = step(std::span<const std::int64_t>(one));
    }
    return out;
  }

  std::unique_ptr<Model> model_;
  exec::llama_dims dims_;
  std::unique_ptr<dispatched_weights> weights_;
  hook_table hooks_;
  fit_report plan_report_;
  // One per quantized weight the forward reads (a deque: refs point at the elements).
  std::unique_ptr<std::deque<quantized_weight>> quant_ =
      std::make_unique<std::deque<quantized_weight>>();
  std::uint64_t quantized_bytes_ = 0;
  std::unique_ptr<offloaded_llama_weights> source_;
  std::unique_ptr<exec::thread_pool> pool_;
  std::unique_ptr<exec::llama_cpu_forward> fwd_;
#if STOWAGE_PRETRAINED_GPU
  // Declared after weights_ (destroyed before it), the context first (destroyed last).
  std::unique_ptr<exec::cuda::context> gpu_ctx_;
  std::unique_ptr<dispatched_llama_device_weights> gpu_src_;
  std::unique_ptr<exec::cuda::llama_cuda_forward> gpu_fwd_;
  // What prefetcher() reports on the GPU forward (no blocks).
  std::unique_ptr<block_prefetcher> no_blocks_;
#endif
  std::unique_ptr<std::optional<text::bpe_tokenizer>> tokenizer_ =
      std::make_unique<std::optional<text::bpe_tokenizer>>();
  std::vector<std::int64_t> eos_;
  double load_seconds_ = 0;
};

/// Transformers' from_pretrained for the Llama family (llama_for_causal_lm<Precision>).
/// Throws invalid_config / json_error for a bad config.json (named), checkpoint_error when the
/// folder has no weights, placement_error when nothing fits, device_map_error for a map naming
/// a device this build or machine lacks (or a GPU where this translation unit has no GPU
/// execution, two GPUs, or a GPU for a quantized model type; all before anything is loaded),
/// io_error for offload-folder failures (the folder is then left complete or absent).
template <module_type Model, placement_policy Placement = placement::auto_>
pretrained_model<Model> from_pretrained(const std::filesystem::path& dir,
                                        const pretrained_options& o = {}) {
  namespace fs = std::filesystem;
  using P = typename Model::precision_type;
  using compute_model = models::llama_for_causal_lm<precision::compute_t<P>>;
  const auto t0 = std::chrono::steady_clock::now();
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw io_error(dir.string(), "model folder does not exist or is not a folder");
  if (!fs::is_regular_file(dir / "config.json", ec))
    throw io_error((dir / "config.json").string(), "the model folder has no config.json");
  // The checkpoint: an index first (sharded), then one file.
  fs::path ckpt;
  for (const char* f : {"model.safetensors.index.json", "model.safetensors",
                        "pytorch_model.bin.index.json", "pytorch_model.bin"})
    if (fs::is_regular_file(dir / f, ec)) {
      ckpt = dir / f;
      break;
    }
  if (ckpt.empty())
    throw checkpoint_error(dir.string(), "", std::nullopt,
                           "the model folder has no weights (model.safetensors, "
                           "model.safetensors.index.json, pytorch_model.bin or its index)");

  pretrained_model<Model> m;
  const auto config = models::llama_config::from_file((dir / "config.json").string());
  const auto dims = exec::llama_dims::from_file((dir / "config.json").string());
  m.dims_ = dims;
  m.model_ = std::make_unique<Model>(init_empty<Model>(config));
  // The CUDA forward runs float32 / float16 / bfloat16 weights, in nvcc-compiled code only.
  constexpr bool gpu_execution = STOWAGE_PRETRAINED_GPU && !is_quantized_v<P>;
  if (o.dtype && is_quantized_v<P>)
    throw invalid_config("from_pretrained: `dtype` applies to floating-point model types; " +
                         std::string(P::name) + " computes in " +
                         std::string(name(P::compute_dtype)));
  if (o.dtype && !is_floating_point(*o.dtype))
    throw invalid_dtype("from_pretrained: dtype " + std::string(name(*o.dtype)) +
                        " is not a floating-point dtype");

  // The tree the checkpoint is loaded into: the model's own, or its compute-precision twin
  // for quantized types (the loader quantizes its Linear weights as they stream in).
  const module_tree tree = [&] {
    if constexpr (is_quantized_v<P>)
      return to_module_tree(init_empty<compute_model>(config));
    else
      return to_module_tree(*m.model_);
  }();

  // 1. The device map.
  device_map map;
  if (o.device_map) {
    map = *o.device_map;
  } else {
    plan_options po;
    if (o.no_split.empty())
      for (auto s : m.model_->no_split_modules()) po.no_split.emplace_back(s);
    else
      po.no_split = o.no_split;
    if (o.dtype) po.dtype = *o.dtype;
    max_memory budgets = o.max_memory;
    if (budgets.empty()) {
      budgets = measure_max_memory();
      // What this code can run on: the CUDA forward runs on one GPU, so the first measured
      // one; without GPU execution, none ("auto" plans for the CPU and disk).
      // (Entries are in device order: the first GPU seen has the lowest index.)
      std::vector<device> unused;
      bool kept = false;
      for (const auto& [d, b] : budgets) {
        if (!d.is_gpu()) continue;
        if (gpu_execution && !kept)
          kept = true;
        else
          unused.push_back(d);
      }
      for (const auto d : unused) budgets.erase(d);
    }
    // Quantized types plan on their own (smaller) sizes.
    const module_tree plan_tree = is_quantized_v<P> ? to_module_tree(*m.model_) : tree;
    plan_result r = o.placement ? infer_device_map(*o.placement, plan_tree, budgets, po)
                                : infer_device_map<Placement>(plan_tree, budgets, po);
    map = std::move(r.map);
    m.plan_report_ = std::move(r.report);
  }

  // Refused before anything is loaded (or written to the offload folder).
  bool gpu_map = false;
  for (const auto& [k, d] : map) {
    if (!d.is_gpu()) continue;
    gpu_map = true;
    const std::string who = k.empty() ? std::string("the whole model") : "`" + k + "`";
    if constexpr (is_quantized_v<P>)
      throw device_map_error("from_pretrained: the device map puts " + who + " on GPU " +
                             std::to_string(d.index()) + " but " + std::string(P::name) +
                             " models run on the CPU forward only (the CUDA forward runs float32, "
                             "float16 and bfloat16 weights)");
    else if constexpr (!gpu_execution)
      throw device_map_error("from_pretrained: the device map puts " + who + " on GPU " +
                             std::to_string(d.index()) + detail::no_gpu_execution_reason);
  }
#if STOWAGE_PRETRAINED_GPU
  if (gpu_map) check_single_gpu_map(map);
#endif

  // 2. Load and dispatch.
  load_options lo = o.load;
  if constexpr (is_quantized_v<P>) {
    // Quantize on load with the policy's bitsandbytes config, floating tensors in its
    // compute dtype (unless o.load says otherwise; a checkpoint's own quantization_config
    // still wins, as in Transformers).
    lo = detail::typed_load_options<Model>(lo);
  } else {
    if (o.dtype) lo.dtype = *o.dtype;
  }
  if (o.offload_folder) lo.offload_folder = o.offload_folder;
  m.weights_ =
      std::make_unique<dispatched_weights>(load_checkpoint_and_dispatch(tree, ckpt, map, lo));
  m.hooks_ = make_hooks(*m.weights_);

  // 3. The forward. Quantized weights (whatever made them so) run from the store in place.
  const weight_store& store = m.weights_->weights();
  auto* quant = m.quant_.get();
  const weight_transform transform =
      [quant, &store](std::string_view n,
                      const exec::weight_ref&) -> std::optional<exec::weight_ref> {
    if (quantized_layout_of(store, n) == quantized_layout::none) return std::nullopt;
    return quant->emplace_back(quantized_weight::from_store(store, n)).weight_ref();
  };
  m.quantized_bytes_ = detail::quantized_store_bytes(store);
#if STOWAGE_PRETRAINED_GPU
  if (gpu_map) {
    // accelerate §7.1: every block computes on the main device (the first GPU of the map).
    m.gpu_ctx_ = std::make_unique<exec::cuda::context>(m.weights_->main_device().index());
    m.gpu_src_ = std::make_unique<dispatched_llama_device_weights>(*m.gpu_ctx_, *m.weights_, dims);
    exec::cuda::forward_options fo;
    fo.mode = o.gpu_fp32_activations ? exec::cuda::linear_mode::fp32_activations
                                     : exec::cuda::linear_mode::weight_type;
    m.gpu_fwd_ =
        std::make_unique<exec::cuda::llama_cuda_forward>(dims, *m.gpu_src_, *m.gpu_ctx_, fo);
    m.no_blocks_ = std::make_unique<block_prefetcher>(
        std::vector<std::vector<const storage::file_region*>>{}, o.offload);
  }
#endif
  if (!gpu_map) {
    m.source_ = std::make_unique<offloaded_llama_weights>(*m.weights_, dims, o.offload, transform);
    m.pool_ = o.threads ? std::make_unique<exec::thread_pool>(o.threads) : nullptr;
    m.fwd_ = std::make_unique<exec::llama_cpu_forward>(
        dims, *m.source_, m.pool_ ? *m.pool_ : exec::default_thread_pool());
  }
  if (fs::is_regular_file(dir / "tokenizer.json", ec))
    *m.tokenizer_ = text::bpe_tokenizer::from_file((dir / "tokenizer.json").string());
  m.eos_ = detail::eos_ids_of(dir);
  m.load_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return m;
}

}  // namespace pretrained_gpu / pretrained_cpu

}  // namespace stowage
