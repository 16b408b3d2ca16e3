// Conformance: the CPU Llama/Mistral/Qwen2 forward against Transformers 5.24 in float32 on the
// tiny random models of tools/gen_tiny_models.py (logits of every position, batched last
// logits, 32 greedy tokens), the bf16-weight path against Transformers run on the same
// bf16-rounded weights, and the bundled demo model's greedy continuation.
#include "support/forward_contract.hpp"
#include "support/tiny_fixture.hpp"

#include <stowage/exec/llama_forward.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace sw = stowage;
namespace ex = stowage::exec;
using stowage_test::b64_floats;
using stowage_test::greedy_options;
using stowage_test::ids_of;
using stowage_test::loaded_model;
using stowage_test::max_abs_diff;
using stowage_test::read_json;

namespace {

const std::string fixtures = stowage_test::tiny_fixtures_dir();

}  // namespace

TEST_CASE("tiny models: fp32 logits and greedy tokens match Transformers", "[exec][llama]") {
  const auto name = GENERATE(as<std::string>{}, "llama_gqa", "llama3_tied", "mistral", "qwen2");
  INFO("model " << name);
  const auto fx = read_json(fixtures + name + ".json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::float32);
  ex::thread_pool pool(2);
  ex::llama_cpu_forward fwd(m.dims, *m.weights, pool);
  const auto prompt = ids_of(fx["prompt"]);
  const auto expect_all = b64_floats(fx["logits_all"]["f32le_b64"]);
  const auto V = static_cast<std::size_t>(m.dims.vocab_size);
  REQUIRE(expect_all.size() == prompt.size() * V);

  SECTION("all positions in one prefill") {
    auto cache = fwd.make_cache(1, 64);
    const auto got = fwd.forward(prompt, 1, cache, ex::logits_mode::all);
    CHECK(max_abs_diff(got, expect_all) <= 1e-4f);
  }
  stowage_test::check_forward_contract(fwd, fx, V, 1e-4f);
}

TEST_CASE(
    "tiny models: bf16 weights with fp32 compute match Transformers on the same rounded weights",
    "[exec][llama][bf16]") {
  const auto name = GENERATE(as<std::string>{}, "llama_gqa", "llama3_tied", "mistral", "qwen2");
  INFO("model " << name);
  const auto fx = read_json(fixtures + name + ".json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::bfloat16);
  ex::thread_pool pool(2);
  ex::llama_cpu_forward fwd(m.dims, *m.weights, pool);
  const auto prompt = ids_of(fx["prompt"]);
  auto cache = fwd.make_cache(1, 64);
  const auto got = fwd.forward(prompt, 1, cache, ex::logits_mode::all);
  // Transformers ran the bf16-rounded weights in float32: same inputs, only summation order
  // differs, so the fp32 tolerance holds.
  CHECK(max_abs_diff(got, b64_floats(fx["logits_all_bf16_weights"]["f32le_b64"])) <= 1e-4f);
  const auto out = fwd.generate(prompt, 1, greedy_options(32));
  CHECK(out.at(0) == ids_of(fx["greedy_32_bf16_weights"]));
}

TEST_CASE("tiny models: fp16 weights stay close to the fp32 logits", "[exec][llama][fp16]") {
  const auto fx = read_json(fixtures + "llama_gqa.json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::float16);
  ex::thread_pool pool(1);
  ex::llama_cpu_forward fwd(m.dims, *m.weights, pool);
  auto cache = fwd.make_cache(1, 64);
  const auto got = fwd.forward(ids_of(fx["prompt"]), 1, cache, ex::logits_mode::all);
  // float16 keeps 11 significant bits: the rounding of every weight moves logits of order 1-10
  // by a few 1e-3 (bf16's 8 bits move them ~10x more, hence its own fixture above).
  CHECK(max_abs_diff(got, b64_floats(fx["logits_all"]["f32le_b64"])) <= 2e-2f);
}

TEST_CASE("the bundled tiny-llama demo continues its prompt as Transformers does",
          "[exec][llama][demo]") {
  const auto fx = read_json(fixtures + "tiny_llama_demo.json");
  const std::string dir = std::string(STOWAGE_EXAMPLES_DIR) + "/models/tiny-llama";
  loaded_model m(dir, sw::dtype::float32);
  ex::llama_cpu_forward fwd(m.dims, *m.weights);
  const auto gen = read_json(dir + "/generation_config.json");
  ex::generate_options o;
  o.max_new_tokens = gen["max_new_tokens"].get<std::int64_t>();
  o.eos_token_ids = {gen["eos_token_id"].get<std::int64_t>()};
  const auto out = fwd.generate(ids_of(fx["prompt_ids"]), 1, o);
  CHECK(out.at(0) == ids_of(fx["greedy_ids"]));
}

TEST_CASE("bad inputs are typed errors", "[exec][llama]") {
  const auto fx = read_json(fixtures + "qwen2.json");
  loaded_model m(fixtures + fx["model_dir"].get<std::string>(), sw::dtype::float32);
  ex::llama_cpu_forward fwd(m.dims, *m.weights);
  auto cache = fwd.make_cache(1, 4);
  const std::vector<std::int64_t> bad{1, m.dims.vocab_size};
  CHECK_THROWS_AS(fwd.forward(bad, 1, cache), sw::invalid_size);
  const std::vector<std::int64_t> too_long{1, 2, 3, 4, 5};
  CHECK_THROWS_AS(fwd.forward(too_long, 1, cache), sw::invalid_size);
  CHECK_THROWS_AS(fwd.forward(too_long, 2, cache), sw::invalid_size);
  auto d = m.dims;
  d.hidden_size += 1;
  auto lookup = [&](std::string_view n) -> std::optional<ex::weight_ref> {
    const auto v = m.file.view(n);
    const auto& s = v.desc.shape;
    return ex::weight_ref::from_f32(reinterpret_cast<const float*>(v.data()),
                                    s.rank() == 2 ? s[0] : 1, s[s.rank() - 1]);
  };
  CHECK_THROWS_AS(ex::named_llama_weights(d, lookup), sw::model_error);
}
