// tests/support/forward_contract.hpp: what every Llama forward (the CPU one, the CUDA one over
// resident or streamed weights) must do on a tiny-model fixture of tools/gen_tiny_models.py,
// as Catch2 sections: decode through the KV cache position by position, a batch of two
// prompts, 32 greedy tokens, and stopping at the first EOS, each against Transformers' values.
// One definition, so the backends are held to the same contract; each test adds its own.
#pragma once

#include "support/tiny_fixture.hpp"

#include <stowage/exec/llama_forward.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace stowage_test {

/// The shared sections for `fwd` (make_cache, forward, generate as llama_cpu_forward has
/// them) on fixture `fx` of a model with `vocab` tokens; logits within `tol` of Transformers'.
template <class Forward>
void check_forward_contract(Forward& fwd, const nlohmann::json& fx, std::size_t vocab, float tol) {
  namespace ex = stowage::exec;
  const auto prompt = ids_of(fx["prompt"]);
  const auto expect_all = b64_floats(fx["logits_all"]["f32le_b64"]);
  REQUIRE(expect_all.size() == prompt.size() * vocab);
  SECTION("prefill of 3, then one position at a time through the KV cache") {
    auto cache = fwd.make_cache(1, 64);
    auto got = fwd.forward(std::span(prompt).first(3), 1, cache, ex::logits_mode::last);
    CHECK(max_abs_diff(got, std::span(expect_all).subspan(2 * vocab, vocab)) <= tol);
    for (std::size_t t = 3; t < prompt.size(); ++t) {
      INFO("position " << t);
      got = fwd.forward(std::span(prompt).subspan(t, 1), 1, cache, ex::logits_mode::last);
      CHECK(max_abs_diff(got, std::span(expect_all).subspan(t * vocab, vocab)) <= tol);
    }
    CHECK(cache.length() == static_cast<std::int64_t>(prompt.size()));
  }
  SECTION("a batch of two equal-length prompts") {
    std::vector<std::int64_t> flat;
    for (const auto& row : fx["batch_prompts"]) {
      const auto r = ids_of(row);
      flat.insert(flat.end(), r.begin(), r.end());
    }
    auto cache = fwd.make_cache(2, 16);
    const auto got = fwd.forward(flat, 2, cache, ex::logits_mode::last);
    CHECK(max_abs_diff(got, b64_floats(fx["batch_last_logits"]["f32le_b64"])) <= tol);
  }
  SECTION("32 greedy tokens") {
    const auto out = fwd.generate(prompt, 1, greedy_options(32));
    CHECK(out.at(0) == ids_of(fx["greedy_32"]));
  }
  SECTION("generation stops after the first EOS token") {
    const auto greedy = ids_of(fx["greedy_32"]);
    const std::int64_t eos = greedy[10];
    const auto first =
        static_cast<std::size_t>(std::find(greedy.begin(), greedy.end(), eos) - greedy.begin());
    const auto out = fwd.generate(prompt, 1, greedy_options(32, {eos}));
    CHECK(out.at(0) ==
          std::vector<std::int64_t>(greedy.begin(),
                                    greedy.begin() + static_cast<std::ptrdiff_t>(first) + 1));
  }
}

}  // namespace stowage_test
