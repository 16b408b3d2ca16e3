// Smoke test of the core vocabulary; the conformance tests check it against accelerate's
// fixtures.
#include <catch2/catch.hpp>
#include <stowage/stowage.hpp>

TEST_CASE("module tree round-trips through JSON") {
  auto tree = stowage::module_tree_from_json_text(R"({"class":"M","parameters":[],
    "children":[{"name":"a","class":"Linear","parameters":[{"name":"weight","shape":[4,3],"dtype":"float32"}]},
                {"name":"b","class":"Linear","parameters":[{"name":"weight","shape":[4,3],"dtype":"float32"}]}],
    "tied_parameters":[["a.weight","b.weight"]]})");
  CHECK(tree.size() == 3);
  CHECK(tree.tie_canonical_names().at("b.weight") == "a.weight");
  auto again = stowage::module_tree_from_json(stowage::to_json(tree));
  CHECK(stowage::to_json(again) == stowage::to_json(tree));
  CHECK_THROWS_AS(
      stowage::module_tree_from_json_text(
          R"({"children":[{"name":"x","parameters":[{"name":"w","shape":[-1],"dtype":"float32"}]}]})"),
      stowage::json_error);
}

TEST_CASE("size strings") {
  CHECK(stowage::parse_memory_size("1Gb") == 125000000u);
  CHECK(stowage::parse_memory_size("2.675GiB") == 2872259379u);
  CHECK(stowage::parse_memory_size("1_000MB") == 1000000000u);
  CHECK_THROWS_AS(stowage::parse_memory_size("5k0MB"), stowage::invalid_size);
  CHECK_THROWS_AS(stowage::parse_memory_size("1000", stowage::size_syntax::accelerate),
                  stowage::invalid_size);
  CHECK(stowage::parse_memory_size("1000") == 1000u);
}
