// accelerate's offload folder format: the folder written by accelerate.utils.offload_state_dict
// (tests/fixtures/checkpoints/offload/folder) is read tensor for tensor, and our writer produces
// the same index.json and .dat bytes; merging, the safetensors entry form, atomicity.
#include "support/temp_dir.hpp"

#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/storage/offload_folder.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_test_util.hpp"

#include <fstream>

using namespace stowage;
using namespace stowage::storage;
namespace fs = std::filesystem;

using stowage_test::temp_dir;

TEST_CASE("offload folder: reads accelerate's folder", "[storage][offload]") {
  const auto dir = ckpt_test::fixtures() / "offload";
  const auto f = offload_folder::open(dir / "folder");
  const auto expected = ckpt_test::expected_tensors(dir / "folder.expected.json");
  REQUIRE(f.entries().size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const auto& e = expected[i];
    INFO(e.name);
    CHECK(f.entries()[i].name == e.name);  // index order = insertion order
    const auto v = f.view(e.name);
    CHECK(v.desc.dtype == e.dtype);
    CHECK(v.desc.shape == e.shape);
    CHECK(ckpt_test::same_bytes(v.bytes, e.bytes));
  }
  // accelerate-spec §6.2 worked bytes.
  const auto bf = f.view("h.0.ln.weight");
  CHECK(ckpt_test::same_bytes(bf.bytes, ckpt_test::unhex("803f20c04040")));
}

TEST_CASE("offload folder: our writer's bytes equal accelerate's", "[storage][offload]") {
  const auto dir = ckpt_test::fixtures() / "offload";
  const auto expected = ckpt_test::expected_tensors(dir / "folder.expected.json");
  std::vector<checkpoint::tensor_ref> refs;
  for (const auto& e : expected) refs.push_back({e.name, e.dtype, e.shape, e.bytes});
  temp_dir t("offload-folder");
  write_offload_folder(t.path / "out", refs);
  CHECK(ckpt_test::read_text(t.path / "out" / "index.json") ==
        ckpt_test::read_text(dir / "folder" / "index.json"));
  std::size_t files = 0;
  for (const auto& de : fs::directory_iterator(t.path / "out")) {
    ++files;
    const auto name = de.path().filename();
    INFO(name.string());
    CHECK(ckpt_test::same_bytes(ckpt_test::read_all(de.path()),
                                ckpt_test::read_all(dir / "folder" / name)));
  }
  CHECK(files == expected.size() + 1);  // no temporaries left
}

TEST_CASE("offload folder: merge, safetensors entries, atomicity", "[storage][offload]") {
  temp_dir t("offload-folder");
  const std::vector<float> a{1.f, 2.f};
  const std::vector<std::int64_t> b{5};
  {
    offload_folder_writer w(t.path);
    w.add("a", dtype::float32, shape{2}, std::as_bytes(std::span(a)));
    // Not committed: nothing under a final name, no index, temporaries removed.
  }
  CHECK(fs::is_empty(t.path));
  {
    offload_folder_writer w(t.path);
    w.add("a", dtype::float32, shape{2}, std::as_bytes(std::span(a)));
    w.commit();
    offload_folder_writer w2(t.path);
    w2.add("b", dtype::int64, shape{}, std::as_bytes(std::span(b)));
    w2.commit();
  }
  auto f = offload_folder::open(t.path);
  REQUIRE(f.entries().size() == 2);
  CHECK(f.entries()[0].name == "a");
  CHECK(f.entries()[1].name == "b");
  CHECK(f.view("b").desc.shape.rank() == 0);
  CHECK(f.view("b").size() == 8);
  CHECK_THROWS_AS(offload_folder_writer(t.path).add("e", dtype::float32, shape{0}, {}),
                  checkpoint_error);

  // The safetensors entry form (Transformers).
  const auto st = ckpt_test::fixtures() / "st" / "nometa.safetensors";
  std::ofstream(t.path / "index.json") << R"({"w": {"safetensors_file": ")" + st.string() +
                                              R"(", "weight_name": "only", "dtype": "float16"}})";
  f = offload_folder::open(t.path);
  CHECK(f.entries()[0].safetensors_file);
  CHECK(f.entries()[0].dtype == dtype::float16);
  CHECK(f.view("w").desc.shape == shape{2, 3});
  // A .dat whose size disagrees with the index is refused.
  std::ofstream(t.path / "index.json") << R"({"a": {"dtype": "float32", "shape": [3]}})";
  CHECK_THROWS_AS(offload_folder::open(t.path).view("a"), checkpoint_error);
  std::ofstream(t.path / "index.json")
      << R"({"a": {"dtype": "float32", "shape": [2]}, "a": {"dtype": "float32", "shape": [2]}})";
  CHECK_THROWS_AS(offload_folder::open(t.path), json_error);
}
