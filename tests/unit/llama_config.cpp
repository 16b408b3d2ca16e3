// llama_config from config.json: values and defaults of the bundled real configs, the
// variants (int/list token ids, rope_scaling, head_dim, v5 rope_parameters), and every way a
// config can be wrong, each an invalid_config naming the file and the key.
#include <stowage/models/llama_config.hpp>

#include <catch2/catch.hpp>

#include <string>

namespace sw = stowage;
using nlohmann::json;
using sw::models::llama_config;

namespace {
std::string example(const std::string& name) {
  return std::string(STOWAGE_EXAMPLES_DIR) + "/configs/" + name + "/config.json";
}
json minimal() {
  return json{{"model_type", "llama"},    {"vocab_size", 100},      {"hidden_size", 64},
              {"intermediate_size", 128}, {"num_hidden_layers", 2}, {"num_attention_heads", 4}};
}
}  // namespace

TEST_CASE("Llama-2-70b-hf config.json") {
  const auto c = llama_config::from_file(example("Llama-2-70b-hf"));
  CHECK(c.family == sw::models::llama_family::llama);
  CHECK(c.vocab_size == 32000);
  CHECK(c.hidden_size == 8192);
  CHECK(c.intermediate_size == 28672);
  CHECK(c.num_hidden_layers == 80);
  CHECK(c.num_attention_heads == 64);
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.num_key_value_groups() == 8);
  CHECK(c.head_dim == 128);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK_FALSE(c.attention_bias);
  CHECK(c.rope_theta == 10000.0);  // absent: Transformers' default
  CHECK_FALSE(c.rope_scaling);     // null
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.max_position_embeddings == 4096);
  CHECK(c.torch_dtype == sw::dtype::float16);
  CHECK(c.bos_token_id == std::vector<std::int64_t>{1});
  CHECK(c.eos_token_id == std::vector<std::int64_t>{2});
  CHECK(c.hidden_act == "silu");
  CHECK(c.source == example("Llama-2-70b-hf"));
}

TEST_CASE("Llama-3.1-405B config.json keeps the llama3 rope_scaling object") {
  const auto c = llama_config::from_file(example("Llama-3.1-405B"));
  CHECK(c.num_hidden_layers == 126);
  CHECK(c.rope_theta == 500000.0);
  REQUIRE(c.rope_scaling);
  CHECK((*c.rope_scaling)["rope_type"] == "llama3");
  REQUIRE(c.rope_scaling_parsed);
  CHECK(c.rope_scaling_parsed->rope_type == "llama3");
  CHECK(c.rope_scaling_parsed->factor == 8.0);
  CHECK(c.rope_scaling_parsed->low_freq_factor == 1.0);
  CHECK(c.rope_scaling_parsed->high_freq_factor == 4.0);
  CHECK(c.rope_scaling_parsed->original_max_position_embeddings == 8192);
  CHECK(c.torch_dtype == sw::dtype::bfloat16);
}

TEST_CASE("Mistral and Qwen2 configs") {
  const auto m = llama_config::from_file(example("Mistral-7B-v0.1"));
  CHECK(m.family == sw::models::llama_family::mistral);
  CHECK(m.model_type == "mistral");
  CHECK(m.num_key_value_heads == 8);
  const auto q = llama_config::from_file(example("Qwen2.5-0.5B"));
  CHECK(q.family == sw::models::llama_family::qwen2);
  CHECK(q.tie_word_embeddings);
  CHECK(q.head_dim == 64);
  CHECK(q.rms_norm_eps == 1e-6);
  CHECK(q.rope_theta == 1000000.0);
}

TEST_CASE("defaults, head_dim, token-id lists and v5 rope_parameters") {
  auto j = minimal();
  auto c = llama_config::from_json(j, "mini.json");
  CHECK(c.num_key_value_heads == 4);  // defaults to num_attention_heads
  CHECK(c.head_dim == 16);
  CHECK(c.max_position_embeddings == 2048);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.bos_token_id.empty());
  CHECK_FALSE(c.torch_dtype);

  j["head_dim"] = 24;  // explicit head_dim need not be hidden / heads
  j["hidden_size"] = 70;
  j["eos_token_id"] = {128001, 128008, 128009};
  j["num_key_value_heads"] = nullptr;  // null means "default"
  j["dtype"] = "bfloat16";             // Transformers 5 writes "dtype"
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 250000.0}};
  c = llama_config::from_json(j);
  CHECK(c.head_dim == 24);
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.eos_token_id == std::vector<std::int64_t>{128001, 128008, 128009});
  CHECK(c.torch_dtype == sw::dtype::bfloat16);
  CHECK(c.rope_theta == 250000.0);
  CHECK_FALSE(c.rope_scaling);
}

TEST_CASE("bad configs are invalid_config naming the file and the key") {
  auto expect = [](json j, const std::string& key) {
    INFO(j.dump());
    CHECK_THROWS_AS(llama_config::from_json(j, "cfg.json"), sw::invalid_config);
    CHECK_THROWS_WITH(llama_config::from_json(j, "cfg.json"),
                      Catch::StartsWith("cfg.json: key `" + key + "`"));
  };
  auto j = minimal();
  j["model_type"] = "gpt2";
  expect(j, "model_type");
  j = minimal();
  j.erase("model_type");
  expect(j, "model_type");
  j = minimal();
  j["hidden_size"] = 66;  // 66 % 4 != 0 and no head_dim
  expect(j, "hidden_size");
  j = minimal();
  j["num_key_value_heads"] = 3;
  expect(j, "num_key_value_heads");
  for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads"}) {
    j = minimal();
    j.erase(k);
    expect(j, k);
  }
  j = minimal();
  j["vocab_size"] = "32000";
  expect(j, "vocab_size");
  j = minimal();
  j["hidden_size"] = 64.5;
  expect(j, "hidden_size");
  j = minimal();
  j["num_attention_heads"] = 0;
  expect(j, "num_attention_heads");
  j = minimal();
  j["tie_word_embeddings"] = 1;
  expect(j, "tie_word_embeddings");
  j = minimal();
  j["rms_norm_eps"] = "1e-5";
  expect(j, "rms_norm_eps");
  j = minimal();
  j["eos_token_id"] = {1, "x"};
  expect(j, "eos_token_id");
  j = minimal();
  j["torch_dtype"] = "float99";
  expect(j, "torch_dtype");
  j = minimal();
  j["hidden_act"] = "prelu";
  expect(j, "hidden_act");
  j = minimal();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  expect(j, "rope_scaling.low_freq_factor");
  j = minimal();
  j["rope_scaling"] = "llama3";
  expect(j, "rope_scaling");
  CHECK_THROWS_AS(llama_config::from_json(json::array(), "cfg.json"), sw::invalid_config);
}

TEST_CASE("config files that cannot be read") {
  CHECK_THROWS_AS(llama_config::from_file("/nonexistent/config.json"), sw::io_error);
  const std::string bad = std::string(STOWAGE_BINARY_DIR) + "/llama_config_bad.json";
  { std::ofstream(bad) << "{\"model_type\": \"llama\","; }
  CHECK_THROWS_AS(llama_config::from_file(bad), sw::invalid_config);
  CHECK_THROWS_WITH(llama_config::from_file(bad), Catch::StartsWith(bad + ": not valid JSON"));
}
