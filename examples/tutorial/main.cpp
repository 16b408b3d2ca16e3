// stowage-tutorial: the complete example of docs/tutorial.md (and of the README): a
// Llama-family model folder loaded with a device map from budgets, offloaded where the budgets
// say, and run. The region between the [doc:complete] markers is shown verbatim in the docs
// (tests/docs checks that it is the same text).
//
//   stowage-tutorial MODEL_DIR [BUDGETS_JSON]   e.g. examples/models/tiny-llama '{"cpu": "1MB"}'
#include <cstdio>
#include <exception>
#include <string>

// [doc:complete]
#include <stowage/models/llama.hpp>
#include <stowage/stowage.hpp>
namespace sw = stowage;

int main(int argc, char** argv) try {
  const std::string dir = argc > 1 ? argv[1] : "Llama-2-70b-hf";
  const auto budgets = sw::max_memory::from_json(
      nlohmann::json::parse(argc > 2 ? argv[2] : R"({"0": "20GB", "1": "20GB", "cpu": "100GB"})"));
  using model_t = sw::models::llama_for_causal_lm<sw::precision::bf16>;

  // 1. The structure, no weights.  2. A device map from the budgets.
  const auto model =
      sw::init_empty<model_t>(sw::models::llama_config::from_file(dir + "/config.json"));
  const auto plan = sw::infer_device_map<sw::placement::balanced>(
      model, budgets, {.no_split = sw::no_split<sw::models::llama_decoder_layer>});
  for (const auto& d : plan.report.devices)
    std::printf("%-5s %s bytes\n", d.target.to_string().c_str(),
                d.weights.to_python_string().c_str());

  // 3. Weights stream from the checkpoint into each entry's storage (disk: an offload folder).
  auto llm =
      sw::from_pretrained<model_t>(dir, {.offload_folder = "offload", .device_map = plan.map});

  // 4. Generate.
  const auto& tok = *llm.tokenizer();
  const auto ids = llm.generate(tok.encode("Once upon a time"), {.max_new_tokens = 20});
  std::printf("%s\n", tok.decode(ids).c_str());
} catch (const std::exception& e) {  // sw::error and its subclasses name the file / tensor
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
// [/doc:complete]
