// The catalogue of malformed and hostile checkpoint files (tests/fixtures/checkpoints/bad,
// handcrafted by tools/gen_checkpoint_fixtures.py, which also records what Python's own readers
// said about each). Every file must be refused with a stowage::checkpoint_error whose message
// contains the catalogue's expected text and names the file; nothing may crash or be accepted.
#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/checkpoint/torch_zip.hpp>

#include <catch2/catch.hpp>

#include "../unit/checkpoint_test_util.hpp"

using namespace stowage;
using namespace stowage::checkpoint;

TEST_CASE("catalogue: every malformed or hostile file is refused with its own error",
          "[checkpoint][conformance]") {
  const auto dir = ckpt_test::fixtures() / "bad";
  const auto cat = ckpt_test::read_json(dir / "catalogue.json");
  REQUIRE(cat.size() >= 40);
  for (const auto& e : cat) {
    const std::string file = e["file"].get<std::string>();
    const std::string expect = e["expect"].get<std::string>();
    INFO(file << " (" << e["note"].get<std::string>()
              << "); Python said: " << e["python"].get<std::string>());
    bool refused = false;
    try {
      if (e["format"] == "safetensors")
        (void)safetensors_file::open(dir / file);
      else
        (void)torch_checkpoint::open(dir / file);
    } catch (const checkpoint_error& err) {
      refused = true;
      const std::string what = err.what();
      INFO("stowage said: " << what);
      CHECK(what.find(expect) != std::string::npos);
      CHECK(what.find(file) != std::string::npos);
      CHECK(err.file().find(file) != std::string::npos);
    }
    CHECK(refused);
  }
}

TEST_CASE("catalogue: errors carry tensor names and offsets", "[checkpoint][conformance]") {
  const auto dir = ckpt_test::fixtures() / "bad";
  try {
    (void)safetensors_file::open(dir / "hole.safetensors");
    FAIL("accepted");
  } catch (const checkpoint_error& e) {
    CHECK(e.tensor() == "b");
    REQUIRE(e.offset());
  }
  try {
    (void)safetensors_file::open(dir / "duplicate_name.safetensors");
    FAIL("accepted");
  } catch (const checkpoint_error& e) {
    CHECK(e.tensor() == "a");  // Python safetensors accepts this file; we refuse it
  }
  try {
    (void)torch_checkpoint::open(dir / "storage_overrun.bin");
    FAIL("accepted");
  } catch (const checkpoint_error& e) {
    CHECK(e.tensor() == "t");
    REQUIRE(e.offset());
  }
}
