// Regression inputs for the checkpoint readers: files the fuzzers (tests/fuzz/*_fuzz.cpp) found
// (tests/fixtures/checkpoints/regress/), plus hostile pickles built here that target the
// unpickler's design limits (deep nesting, reference cycles through the memo, huge counts).
#include <stowage/checkpoint/pickle.hpp>
#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/checkpoint/sharded.hpp>
#include <stowage/checkpoint/torch_zip.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_test_util.hpp"

using namespace stowage;
using namespace stowage::checkpoint;

namespace {
pickle_result unpickle(const std::string& s) {
  checkpoint::detail::restricted_unpickler up(std::as_bytes(std::span(s.data(), s.size())),
                                              "regress.bin", "archive/data.pkl");
  return up.run([](const pickle_storage_ref&) {});
}
}  // namespace

TEST_CASE("regress: index_fuzz found a shard name starting with '..' (a legal file name)",
          "[checkpoint][regress]") {
  // The fuzz oracle, not the library, was wrong: "..layers..." is a plain file name inside the
  // folder; only a ".." path component escapes it.
  const auto text =
      ckpt_test::read_text(ckpt_test::fixtures() / "regress" / "index_dotdot_prefix.json");
  const auto ix = parse_index(text, "/ckpt/x.index.json");
  REQUIRE(ix.shards.size() == 1);
  CHECK(ix.shards[0].starts_with(".."));
  CHECK_THROWS_AS(parse_index(R"({"a": "../x"})", "/ckpt/x.index.json"), checkpoint_error);
  CHECK_THROWS_AS(parse_index(R"({"a": "sub/../../x"})", "/ckpt/x.index.json"), checkpoint_error);
}

TEST_CASE("regress: a million nested tuples neither recurse nor leak", "[checkpoint][regress]") {
  std::string p = "\x80\x02)";
  for (int i = 0; i < 1'000'000; ++i) p += '\x85';  // TUPLE1 around the previous value
  p += '.';
  CHECK_THROWS_WITH(unpickle(p), Catch::Contains("not a dict"));
}

TEST_CASE("regress: a list appended into itself through the memo", "[checkpoint][regress]") {
  auto bytes = [](std::initializer_list<int> b) {
    std::string s;
    for (int c : b) s += static_cast<char>(c);
    return s;
  };
  // EMPTY_LIST, BINPUT 0, BINGET 0, APPEND: the list now contains itself. Values live in an
  // arena, so the cycle cannot leak; the result is then refused for what it is.
  const std::string p = bytes({0x80, 2, ']', 'q', 0, 'h', 0, 'a', '.'});
  CHECK_THROWS_WITH(unpickle(p), Catch::Contains("not a dict"));
  // A dict holding itself under key "k".
  const std::string q = bytes({0x80, 2, '}', 'q', 0, 'X', 1, 0, 0, 0, 'k', 'h', 0, 's', '.'});
  CHECK_THROWS_WITH(unpickle(q), Catch::Contains("not a tensor"));
  // POP is not an opcode torch.save writes: refused by name.
  CHECK_THROWS_WITH(unpickle(bytes({0x80, 2, ')', '0', '.'})),
                    Catch::Contains("unsupported pickle opcode 0x30"));
}
