// Conformance: the byte-level BPE tokenizer against the Python `tokenizers` package on the
// three pre-tokenizer styles (GPT-2, Llama-3, Qwen2), trained by tools/gen_tiny_models.py:
// the same ids for ~50 strings (Unicode letters, digits, emoji, whitespace runs, CRLF,
// contractions, special tokens), with and without the post-processor's special tokens, the
// same decoded text, and decode(encode(s)) == s.
#include <stowage/text/bpe_tokenizer.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

namespace {
const std::string fixtures = std::string(STOWAGE_FIXTURES_DIR) + "/tiny/";
nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}
}  // namespace

TEST_CASE("byte-level BPE ids equal the Python tokenizers' ids", "[text][tokenizer]") {
  const auto cases = read_json(fixtures + "tokenizer_cases.json");
  const auto strings = cases["strings"].get<std::vector<std::string>>();
  const auto style = GENERATE(as<std::string>{}, "gpt2", "llama3", "qwen2");
  INFO("style " << style);
  const auto& sc = cases["styles"][style];
  const auto tok =
      stowage::text::bpe_tokenizer::from_file(fixtures + sc["file"].get<std::string>());
  CHECK(tok.vocab_size() == sc["vocab_size"].get<std::size_t>());
  for (std::size_t i = 0; i < strings.size(); ++i) {
    INFO("string #" << i << ": '" << strings[i] << "'");
    const auto ids = tok.encode(strings[i]);
    CHECK(ids == sc["ids"][i].get<std::vector<std::int64_t>>());
    CHECK(tok.encode(strings[i], true) ==
          sc["ids_with_special"][i].get<std::vector<std::int64_t>>());
    CHECK(tok.decode(ids) == sc["decoded"][i].get<std::string>());
    CHECK(tok.decode(ids) == strings[i]);
  }
}

TEST_CASE("pre-tokenizer pieces follow the regex alternation", "[text][tokenizer]") {
  const auto cases = read_json(fixtures + "tokenizer_cases.json");
  const auto gpt2 = stowage::text::bpe_tokenizer::from_file(fixtures + "tokenizers/gpt2.json");
  const auto llama3 = stowage::text::bpe_tokenizer::from_file(fixtures + "tokenizers/llama3.json");
  const auto qwen2 = stowage::text::bpe_tokenizer::from_file(fixtures + "tokenizers/qwen2.json");
  CHECK(gpt2.style() == stowage::text::pretokenizer_style::gpt2);
  CHECK(llama3.style() == stowage::text::pretokenizer_style::llama3);
  CHECK(qwen2.style() == stowage::text::pretokenizer_style::qwen2);
  using v = std::vector<std::string>;
  // \s+(?!\S) leaves the last space of a run to the next word; digits: runs (GPT-2), groups
  // of three (Llama-3), single (Qwen2); Llama-3 lets any non-letter/digit prefix a word.
  CHECK(gpt2.pre_tokenize("Hello  world's 12345") == v{"Hello", " ", " world", "'s", " 12345"});
  CHECK(llama3.pre_tokenize("Hello  world'S 12345") ==
        v{"Hello", " ", " world", "'S", " ", "123", "45"});
  CHECK(qwen2.pre_tokenize("a1 23") == v{"a", "1", " ", "2", "3"});
  CHECK(llama3.pre_tokenize("x\n\n y") == v{"x", "\n\n", " y"});
  CHECK(llama3.pre_tokenize("(hello)") == v{"(hello", ")"});
  CHECK(gpt2.pre_tokenize("x\n\n y") == v{"x", "\n\n", " y"});
}

TEST_CASE("tokenizer.json features outside the supported set are rejected with the key",
          "[text][tokenizer]") {
  auto j = read_json(fixtures + "tokenizers/llama3.json");
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+";
  CHECK_THROWS_WITH(stowage::text::bpe_tokenizer::from_json(j, "t.json"),
                    Catch::Contains("pre_tokenizer.pretokenizers[0].pattern.Regex"));
  auto k = read_json(fixtures + "tokenizers/gpt2.json");
  k["model"]["type"] = "Unigram";
  CHECK_THROWS_AS(stowage::text::bpe_tokenizer::from_json(k, "t.json"), stowage::json_error);
  auto m = read_json(fixtures + "tokenizers/gpt2.json");
  m["model"]["merges"].push_back(nlohmann::json::array({"zzz_not", "in_vocab"}));
  CHECK_THROWS_AS(stowage::text::bpe_tokenizer::from_json(m, "t.json"), stowage::json_error);
  const auto tok = stowage::text::bpe_tokenizer::from_file(fixtures + "tokenizers/gpt2.json");
  const std::vector<std::int64_t> bad{static_cast<std::int64_t>(tok.vocab_size())};
  CHECK_THROWS_AS(tok.decode(bad), stowage::invalid_size);
}
