// The typed Llama family against Transformers itself: for every bundled config.json
// (examples/configs/<name>), llama_for_causal_lm<P> must have exactly the state-dict keys,
// parameters, buffers (persistence), shapes, dtypes, order, ties, class names and no-split
// classes that Transformers' model built from the same config has (tests/fixtures/llama/<name>
// .json and tests/fixtures/module_trees/<name>.json, made by tools/gen_llama_fixtures.py), and
// the same total sizes. tests/fixtures/configs/ adds hand-written variants (biases, explicit
// head_dim, llama3 rope, tied, Mistral ignoring attention_bias) in bf16 and fp16.
#include <stowage/models/llama.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/module/to_module_tree.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <tuple>
#include <vector>

namespace sw = stowage;
namespace models = sw::models;
using nlohmann::json;

namespace {

using entry = std::tuple<std::string, std::vector<std::int64_t>, std::string>;
using buffer_entry = std::tuple<std::string, std::vector<std::int64_t>, std::string, bool>;

std::vector<std::int64_t> dims(const sw::shape& s) { return {s.begin(), s.end()}; }

json read_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in);
  return json::parse(in);
}

template <class Model>
void check_against_fixture(const std::string& name) {
  INFO("config " << name);
  const auto cfg = models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" +
                                                   name + "/config.json");
  const auto fx = read_json(std::string(STOWAGE_FIXTURES_DIR) + "/llama/" + name + ".json");
  const auto model = sw::init_empty<Model>(cfg);
  const auto tree = sw::to_module_tree(model);

  CHECK(model.runtime_class_name() == fx.at("class").get<std::string>());
  CHECK(tree.root().class_name == fx.at("class").get<std::string>());
  CHECK(cfg.model_type == fx.at("model_type").get<std::string>());
  std::vector<std::string> no_split(model.no_split_modules().begin(),
                                    model.no_split_modules().end());
  CHECK(no_split == fx.at("no_split").get<std::vector<std::string>>());

  // The whole module tree: names, classes, tensors, persistence, order, ties.
  const auto torch_tree =
      sw::load_module_tree(std::string(STOWAGE_FIXTURES_DIR) + "/module_trees/" + name + ".json");
  CHECK(sw::to_json(tree) == sw::to_json(torch_tree));

  // state_dict(): module pre-order, per module its parameters then its persistent buffers,
  // every alias of a tied tensor included.
  std::vector<entry> state_dict;
  for (std::size_t i : tree.preorder()) {
    const auto& n = tree.node(i);
    for (const auto& p : n.parameters)
      state_dict.emplace_back(sw::join_name(n.path, p.name), dims(p.shape),
                              std::string(sw::name(p.dtype)));
    for (const auto& b : n.buffers)
      if (b.persistent)
        state_dict.emplace_back(sw::join_name(n.path, b.name), dims(b.shape),
                                std::string(sw::name(b.dtype)));
  }
  CHECK(state_dict == fx.at("state_dict").get<std::vector<entry>>());

  // named_parameters(): the typed visitor, without the tied aliases torch de-duplicates.
  const auto canon = tree.tie_canonical_names();
  std::vector<entry> named;
  std::uint64_t param_bytes = 0;
  sw::for_each_parameter(model, [&](std::string_view full, const sw::parameter& p) {
    const std::string n(full);
    if (auto it = canon.find(n); it != canon.end() && it->second != n) return;
    named.emplace_back(n, dims(p.shape()), std::string(sw::name(p.dtype())));
    param_bytes += p.nbytes();
  });
  CHECK(named == fx.at("named_parameters").get<std::vector<entry>>());

  std::vector<buffer_entry> buffers;
  std::uint64_t buffer_bytes = 0;
  sw::for_each_buffer(model, [&](std::string_view full, const sw::buffer& b) {
    buffers.emplace_back(std::string(full), dims(b.shape()), std::string(sw::name(b.dtype())),
                         b.persistent());
    buffer_bytes += b.nbytes();
  });
  CHECK(buffers == fx.at("buffers").get<std::vector<buffer_entry>>());

  std::vector<std::vector<std::string>> tied = tree.tied_parameters();
  CHECK(tied == fx.at("tied").get<std::vector<std::vector<std::string>>>());

  // Total size of the model in its precision (tensors counted once, buffers included).
  const std::string dt(sw::name(Model::precision_type::compute_dtype));
  if (fx.at("total_size").contains(dt))
    CHECK(param_bytes + buffer_bytes == fx.at("total_size").at(dt).get<std::uint64_t>());
}

template <class Model>
void check_against_tree(const std::string& name, const std::string& tree_file) {
  INFO("config " << name << ", tree " << tree_file);
  const std::string dir = std::string(STOWAGE_FIXTURES_DIR) + "/configs/" + name + "/";
  const auto model = sw::init_empty<Model>(models::llama_config::from_file(dir + "config.json"));
  CHECK(sw::to_json(sw::to_module_tree(model)) ==
        sw::to_json(sw::load_module_tree(dir + tree_file)));
}

const char* const bundled[] = {"Llama-2-7b-hf",  "Llama-2-70b-hf",  "Llama-3.1-8B",
                               "Llama-3.1-405B", "Mistral-7B-v0.1", "Qwen2.5-0.5B"};

}  // namespace

TEST_CASE("bundled configs: bf16 model equals Transformers' structure") {
  for (const char* name : bundled)
    check_against_fixture<models::llama_for_causal_lm<sw::precision::bf16>>(name);
}

TEST_CASE("bundled configs: fp32 model has Transformers' fp32 total size") {
  for (const char* name : bundled) {
    INFO(name);
    const auto cfg = models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) +
                                                     "/configs/" + name + "/config.json");
    const auto fx = read_json(std::string(STOWAGE_FIXTURES_DIR) + "/llama/" + name + ".json");
    const auto model = sw::init_empty<models::llama_for_causal_lm<sw::precision::fp32>>(cfg);
    const auto tree = sw::to_module_tree(model);
    const auto canon = tree.tie_canonical_names();
    std::uint64_t total = 0;
    sw::for_each_parameter(model, [&](std::string_view full, const sw::parameter& p) {
      auto it = canon.find(std::string(full));
      if (it == canon.end() || it->second == full) total += p.nbytes();
    });
    sw::for_each_buffer(model, [&](std::string_view, const sw::buffer& b) { total += b.nbytes(); });
    CHECK(total == fx.at("total_size").at("float32").get<std::uint64_t>());
  }
}

TEST_CASE("hand-written variants equal Transformers' trees in bf16 and fp16") {
  for (const char* name : {"tiny-llama-bias", "tiny-mistral-headdim"}) {
    check_against_tree<models::llama_for_causal_lm<sw::precision::bf16>>(name,
                                                                         "module_tree.bf16.json");
    check_against_tree<models::llama_for_causal_lm<sw::precision::fp16>>(name,
                                                                         "module_tree.fp16.json");
  }
}

TEST_CASE("Qwen2 biases: q/k/v have one, o_proj does not; Llama follows attention_bias") {
  const auto q = sw::init_empty<models::llama_for_causal_lm<sw::precision::bf16>>(
      models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) +
                                      "/configs/Qwen2.5-0.5B/config.json"));
  const auto& attn = q.model.layers[0].self_attn;
  CHECK(attn.q_proj.has_bias());
  CHECK(attn.k_proj.has_bias());
  CHECK(attn.v_proj.has_bias());
  CHECK_FALSE(attn.o_proj.has_bias());
  CHECK(q.lm_head.weight.is_meta());
  CHECK(q.model.rotary_emb.inv_freq.dtype() == sw::dtype::float32);
  CHECK_FALSE(q.model.rotary_emb.inv_freq.persistent());

  const auto l = sw::init_empty<models::llama_for_causal_lm<sw::precision::bf16>>(
      models::llama_config::from_file(std::string(STOWAGE_FIXTURES_DIR) +
                                      "/configs/tiny-llama-bias/config.json"));
  CHECK(l.model.layers[2].self_attn.o_proj.has_bias());
  CHECK(l.model.layers[2].mlp.down_proj.has_bias());
  CHECK(l.model.layers.size() == 3);
  CHECK(l.model.layers[0].self_attn.q_proj.out_features() == 4 * 16);
  CHECK(l.model.layers[0].self_attn.k_proj.out_features() == 2 * 16);
}
