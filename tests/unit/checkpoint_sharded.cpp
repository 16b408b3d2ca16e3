// Sharded checkpoints: a tiny Llama saved by transformers' save_pretrained (safetensors shards
// + model.safetensors.index.json) and the same state dict as pytorch_model-*.bin shards with
// pytorch_model.bin.index.json; both read tensor for tensor against the model's own bytes.
// Also accelerate's folder resolution rules, the flat index form, hostile shard names, the
// shard splitter against huggingface_hub's, and our index file against transformers' bytes.
#include "support/temp_dir.hpp"

#include <stowage/checkpoint/checkpoint.hpp>
#include <stowage/checkpoint/sharded.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_test_util.hpp"

#include <fstream>

using namespace stowage;
using namespace stowage::checkpoint;

using stowage_test::temp_dir;

namespace {

void check_llama(const std::filesystem::path& path) {
  const auto ck = checkpoint_reader::open(path);
  const auto expected =
      ckpt_test::expected_tensors(ckpt_test::fixtures() / "hf_llama.expected.json");
  REQUIRE(ck.names().size() == expected.size());
  for (const auto& e : expected) {
    INFO(path.string() << ": " << e.name);
    const auto v = ck.view(e.name);
    CHECK(v.desc.dtype == e.dtype);
    CHECK(v.desc.shape == e.shape);
    CHECK(ckpt_test::same_bytes(v.bytes, e.bytes));
  }
}

void write_text(const std::filesystem::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

}  // namespace

TEST_CASE("sharded: save_pretrained safetensors shards, by folder and by index",
          "[checkpoint][sharded]") {
  const auto dir = ckpt_test::fixtures() / "hf_llama_st";
  check_llama(dir);
  check_llama(dir / "model.safetensors.index.json");
  const auto r = resolve_checkpoint(dir);
  REQUIRE(r.index);
  CHECK(r.files.size() == 3);
  CHECK(std::is_sorted(r.files.begin(), r.files.end()));
  const auto ix = read_index(*r.index);
  CHECK(ix.total_size() == std::optional<std::uint64_t>(26944));
}

TEST_CASE("sharded: pytorch_model-*.bin shards", "[checkpoint][sharded]") {
  check_llama(ckpt_test::fixtures() / "hf_llama_bin");
}

TEST_CASE("sharded: shards are opened lazily", "[checkpoint][sharded]") {
  const auto ck = checkpoint_reader::open(ckpt_test::fixtures() / "hf_llama_st");
  const auto s = ck.shard_of("lm_head.weight");
  CHECK(ck.files().files[s].filename() == "model-00003-of-00003.safetensors");
  CHECK(ck.view("lm_head.weight").desc.shape == shape{64, 16});
  CHECK_THROWS_AS(ck.view("no.such.tensor"), checkpoint_error);
}

TEST_CASE("sharded: accelerate's folder resolution rules", "[checkpoint][sharded]") {
  temp_dir t("sharded");
  CHECK_THROWS_WITH(resolve_checkpoint(t.path),
                    Catch::Contains("is not a folder containing a `.index.json` file"));
  write_text(t.path / "a.index.json", "{}");
  write_text(t.path / "b.index.json", "{}");
  CHECK_THROWS_WITH(resolve_checkpoint(t.path),
                    Catch::Contains("containing more than one `.index.json` file"));
  CHECK_THROWS_WITH(resolve_checkpoint(t.path / "missing"),
                    Catch::Contains("`checkpoint` should be the path"));
  // pytorch_model.bin wins over model.safetensors and over index files.
  std::filesystem::copy_file(ckpt_test::fixtures() / "torch" / "plain_dict.bin",
                             t.path / "pytorch_model.bin");
  std::filesystem::copy_file(ckpt_test::fixtures() / "st" / "nometa.safetensors",
                             t.path / "model.safetensors");
  auto r = resolve_checkpoint(t.path);
  REQUIRE(r.files.size() == 1);
  CHECK(r.files[0].filename() == "pytorch_model.bin");
  std::filesystem::remove(t.path / "pytorch_model.bin");
  r = resolve_checkpoint(t.path);
  CHECK(r.files[0].filename() == "model.safetensors");
  CHECK(checkpoint_reader::open(t.path).view("only").desc.shape == shape{2, 3});
}

TEST_CASE("sharded: flat index form and hostile index files", "[checkpoint][sharded]") {
  temp_dir t("sharded");
  std::filesystem::copy_file(ckpt_test::fixtures() / "st" / "nometa.safetensors",
                             t.path / "s1.safetensors");
  write_text(t.path / "flat.index.json", R"({"only": "s1.safetensors"})");
  const auto ck = checkpoint_reader::open(t.path / "flat.index.json");
  CHECK(ck.names() == std::vector<std::string>{"only"});
  CHECK(ck.view("only").size() == 24);
  CHECK_THROWS_AS(parse_index(R"({"weight_map": {"a": "../../etc/passwd"}})", "x.index.json"),
                  checkpoint_error);
  CHECK_THROWS_AS(parse_index(R"({"weight_map": {"a": "/etc/passwd"}})", "x.index.json"),
                  checkpoint_error);
  CHECK_THROWS_AS(parse_index(R"({"weight_map": {"a": "s", "a": "t"}})", "x.index.json"),
                  checkpoint_error);
  CHECK_THROWS_AS(parse_index(R"({"weight_map": {"a": 3}})", "x.index.json"), json_error);
  CHECK_THROWS_AS(parse_index(R"([1])", "x.index.json"), json_error);
  CHECK_THROWS_AS(parse_index(R"({"weight_map": )", "x.index.json"), checkpoint_error);
  // A shard listed in the index that does not hold the tensor.
  write_text(t.path / "lie.index.json", R"({"weight_map": {"other": "s1.safetensors"}})");
  CHECK_THROWS_WITH(
      checkpoint_reader(resolved_checkpoint{{t.path / "s1.safetensors"}, t.path / "lie.index.json"})
          .view("other"),
      Catch::Contains("does not hold it"));
}

TEST_CASE("sharded: index text identical to transformers' save_pretrained",
          "[checkpoint][sharded]") {
  // Re-create the bin index (written with json.dumps(indent=2, sort_keys=True) + "\n").
  const auto path = ckpt_test::fixtures() / "hf_llama_bin" / "pytorch_model.bin.index.json";
  const auto ix = read_index(path);
  CHECK(index_json(ix.metadata, ix.weight_map) == ckpt_test::read_text(path));
}

TEST_CASE("sharded: splitting like huggingface_hub", "[checkpoint][sharded]") {
  CHECK(parse_shard_size("5GB") == 5'000'000'000ULL);
  CHECK(parse_shard_size("10KB") == 10'000);
  CHECK(parse_shard_size("1.5mb") == 1'500'000);
  CHECK(parse_shard_size("123") == 123);
  CHECK_THROWS_AS(parse_shard_size("5GiB"), invalid_size);
  // A tensor above the limit gets its own shard, appended before the one being filled.
  const std::vector<std::uint64_t> sizes{6, 6, 2, 12, 6, 2, 2};
  const auto plan = plan_shards(sizes, 10, "model{suffix}.safetensors");
  REQUIRE(plan.size() == 4);
  CHECK(plan[0].tensors == std::vector<std::size_t>{0});
  CHECK(plan[1].tensors == std::vector<std::size_t>{3});
  CHECK(plan[2].tensors == std::vector<std::size_t>{1, 2});
  CHECK(plan[3].tensors == std::vector<std::size_t>{4, 5, 6});
  CHECK(plan[0].filename == "model-00001-of-00004.safetensors");
  CHECK(
      plan_shards(std::vector<std::uint64_t>{1, 2}, 10, "model{suffix}.safetensors")[0].filename ==
      "model.safetensors");
}

TEST_CASE("sharded: save_pretrained's shards reproduced byte for byte",
          "[checkpoint][sharded][writer]") {
  // The fixture's tensors in state-dict order, split at 10KB like save_pretrained did.
  const auto expected =
      ckpt_test::expected_tensors(ckpt_test::fixtures() / "hf_llama.expected.json");
  std::vector<tensor_ref> refs;
  for (const auto& e : expected) refs.push_back({e.name, e.dtype, e.shape, e.bytes});
  temp_dir t("sharded");
  const auto res = save_sharded_safetensors(t.path, refs, parse_shard_size("10KB"));
  REQUIRE(res.files.size() == 3);
  for (const auto& f : res.files) {
    INFO(f.filename().string());
    CHECK(ckpt_test::same_bytes(
        ckpt_test::read_all(f),
        ckpt_test::read_all(ckpt_test::fixtures() / "hf_llama_st" / f.filename())));
  }
  REQUIRE(res.index);
  // transformers v5 adds total_parameters (a model property, not knowable from tensors alone).
  const auto theirs =
      read_index(ckpt_test::fixtures() / "hf_llama_st" / "model.safetensors.index.json");
  const auto ours = read_index(*res.index);
  CHECK(ours.weight_map.size() == theirs.weight_map.size());
  CHECK(ours.total_size() == theirs.total_size());
  auto sorted = [](auto v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  CHECK(sorted(ours.weight_map) == sorted(theirs.weight_map));
}
