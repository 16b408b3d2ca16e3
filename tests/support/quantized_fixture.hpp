// tests/support/quantized_fixture.hpp: reading the quantized fixtures of
// tools/gen_quantized_checkpoint_fixtures.py (tests/fixtures/quantized/<variant>/expected.json and
// the tiny source models beside them), shared by the quantize-on-load, interchange and planner-size
// conformance tests so that all of them turn a fixture's BitsAndBytesConfig into the same
// bnb_config.
#pragma once

#include <stowage/core/dtype.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/precision/bnb_config.hpp>
#include <stowage/precision/floating.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>

namespace stowage_test::quantized {

/// tests/fixtures/quantized.
inline std::filesystem::path fixtures() {
  return std::filesystem::path(STOWAGE_FIXTURES_DIR) / "quantized";
}

/// The tiny model a fixture was made from (its "source" field is relative to tests/fixtures).
inline std::filesystem::path source_dir(const nlohmann::json& expected) {
  return std::filesystem::path(STOWAGE_FIXTURES_DIR) / expected.at("source").get<std::string>();
}

/// A JSON file; std::runtime_error naming it when it cannot be opened.
inline nlohmann::json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  if (!in) throw std::runtime_error("cannot open fixture " + p.string());
  return nlohmann::json::parse(in);
}

/// `<variant>/expected.json`.
inline nlohmann::json expected(const std::string& variant) {
  return read_json(fixtures() / variant / "expected.json");
}

/// The kwargs the fixture passed to BitsAndBytesConfig, read by the library's own
/// quantization_config reader (the kwargs carry no quant_method; config.json blocks do).
inline stowage::precision::bnb_config bnb_config_of(nlohmann::json kwargs) {
  kwargs["quant_method"] = "bitsandbytes";
  return stowage::precision::bnb_config_from_json(kwargs, "bitsandbytes_config");
}

/// A fixture's bnb_config with its block size (the fixtures also cover blocksize 128).
inline stowage::precision::bnb_config bnb_config_for(const nlohmann::json& expected) {
  auto c = bnb_config_of(expected.at("bitsandbytes_config"));
  if (!expected.at("blocksize").is_null()) c.blocksize = expected["blocksize"].get<std::size_t>();
  return c;
}

/// The torch_dtype the fixture passed to from_pretrained, if any.
inline std::optional<stowage::dtype> from_pretrained_dtype(const nlohmann::json& expected) {
  if (expected.at("from_pretrained_dtype").is_null()) return std::nullopt;
  return stowage::dtype_from_name(expected["from_pretrained_dtype"].get<std::string>());
}

/// The config.json of a model folder.
inline stowage::models::llama_config config_of(const std::filesystem::path& folder) {
  return stowage::models::llama_config::from_file((folder / "config.json").string());
}

/// The float32 Llama module tree of a model folder.
inline stowage::module_tree llama_tree(const std::filesystem::path& folder) {
  return stowage::to_module_tree(
      stowage::init_empty<stowage::models::llama_for_causal_lm<stowage::precision::fp32>>(
          config_of(folder)));
}

}  // namespace stowage_test::quantized
