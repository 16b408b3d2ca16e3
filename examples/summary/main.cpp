// stowage-summary: builds a Llama-family model's structure from its config.json without
// allocating any weight and prints what it would take: parameter count, bytes per dtype, the
// size of the embedding, one decoder layer, the final norm and lm_head, and the total.
//
//   stowage-summary [CONFIG.json] [--dtype float32|float16|bfloat16]
//
// Sizes count each tensor once (a tied lm_head shares the embedding's bytes) and include
// buffers (the rotary frequencies, which accelerate counts too).
#include <stowage/models/llama.hpp>
#include <stowage/module/to_module_tree.hpp>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>

namespace sw = stowage;
namespace models = sw::models;

namespace {

struct totals {
  std::int64_t params = 0;
  std::map<std::string, std::uint64_t> bytes_by_dtype;  // sorted by dtype name
  std::uint64_t bytes = 0;
};

std::string human(std::uint64_t b) {
  char buf[64];
  const double g = static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0);
  if (g >= 1.0)
    std::snprintf(buf, sizeof buf, "%.2f GiB", g);
  else
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1024.0 * 1024.0));
  return buf;
}

template <class Model>
int summarize(const models::llama_config& cfg) {
  const auto model = sw::init_empty<Model>(cfg);
  const auto tree = sw::to_module_tree(model);
  const auto canon = tree.tie_canonical_names();

  totals all;
  std::unordered_map<std::string, std::uint64_t> per_top;  // bytes under each part
  auto part_of = [](std::string_view n) -> std::string {
    // "model.layers.0.mlp.up_proj.weight" -> "model.layers.0"; others -> their module.
    if (n.starts_with("model.layers.")) {
      const auto dot = n.find('.', 13);
      return std::string(n.substr(0, dot));
    }
    return std::string(n.substr(0, n.rfind('.')));
  };
  auto count = [&](std::string_view full, const sw::parameter& p, bool is_param) {
    if (auto it = canon.find(std::string(full)); it != canon.end() && it->second != full) return;
    if (is_param) all.params += p.numel();
    all.bytes_by_dtype[std::string(sw::name(p.dtype()))] += p.nbytes();
    all.bytes += p.nbytes();
    per_top[part_of(full)] += p.nbytes();
  };
  sw::for_each_parameter(model,
                         [&](std::string_view n, const sw::parameter& p) { count(n, p, true); });
  sw::for_each_buffer(model, [&](std::string_view n, const sw::buffer& b) { count(n, b, false); });

  std::printf("model       %s (%s), %s weights\n", std::string(model.runtime_class_name()).c_str(),
              cfg.source.c_str(), std::string(Model::precision_type::name).c_str());
  std::printf(
      "layers      %lld x %s, hidden %lld, intermediate %lld, heads %lld/%lld kv, vocab %lld\n",
      static_cast<long long>(cfg.num_hidden_layers),
      std::string(model.no_split_modules()[0]).c_str(), static_cast<long long>(cfg.hidden_size),
      static_cast<long long>(cfg.intermediate_size),
      static_cast<long long>(cfg.num_attention_heads),
      static_cast<long long>(cfg.num_key_value_heads), static_cast<long long>(cfg.vocab_size));
  std::printf("modules     %zu, tied groups %zu\n", tree.size(), tree.tied_parameters().size());
  std::printf("parameters  %lld\n\n", static_cast<long long>(all.params));

  std::printf("%-28s %18s %12s\n", "part", "bytes", "");
  auto row = [&](const std::string& label, std::uint64_t b) {
    std::printf("%-28s %18llu %12s\n", label.c_str(), static_cast<unsigned long long>(b),
                human(b).c_str());
  };
  row("model.embed_tokens", per_top["model.embed_tokens"]);
  if (cfg.num_hidden_layers > 0)
    row("model.layers.0 (each of " + std::to_string(cfg.num_hidden_layers) + ")",
        per_top["model.layers.0"]);
  row("model.norm", per_top["model.norm"]);
  row("model.rotary_emb (buffers)", per_top["model.rotary_emb"]);
  row(cfg.tie_word_embeddings ? "lm_head (tied: 0)" : "lm_head", per_top["lm_head"]);
  row("total", all.bytes);
  std::printf("\nbytes per dtype\n");
  for (const auto& [dt, b] : all.bytes_by_dtype) row("  " + dt, b);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path = STOWAGE_DEFAULT_CONFIG;
  std::string dtype = "bfloat16";
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--dtype" && i + 1 < argc) {
      dtype = argv[++i];
    } else if (a.starts_with("--dtype=")) {
      dtype = std::string(a.substr(8));
    } else if (a == "-h" || a == "--help") {
      std::printf("usage: stowage-summary [CONFIG.json] [--dtype float32|float16|bfloat16]\n");
      return 0;
    } else if (a.starts_with("-")) {
      std::fprintf(stderr, "stowage-summary: unknown option %s\n", argv[i]);
      return 2;
    } else {
      config_path = std::string(a);
    }
  }
  try {
    const auto cfg = models::llama_config::from_file(config_path);
    const auto dt = sw::parse_dtype(dtype);
    if (dt == sw::dtype::float32)
      return summarize<models::llama_for_causal_lm<sw::precision::fp32>>(cfg);
    if (dt == sw::dtype::float16)
      return summarize<models::llama_for_causal_lm<sw::precision::fp16>>(cfg);
    if (dt == sw::dtype::bfloat16)
      return summarize<models::llama_for_causal_lm<sw::precision::bf16>>(cfg);
    std::fprintf(stderr, "stowage-summary: --dtype must be float32, float16 or bfloat16, not %s\n",
                 dtype.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "stowage-summary: %s\n", e.what());
    return 1;
  }
}
