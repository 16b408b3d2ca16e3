// stowage-convert's conversion (convert_checkpoint) against the reference made by the Python
// tools: hf_llama_st converted to bfloat16 shards of at most 5KB by torch .to(bfloat16),
// huggingface_hub's splitter and safetensors save_file (tests/fixtures/checkpoints/convert/
// llama_bf16). Every output file must be byte-identical; config.json is copied. The same
// conversion from the .bin shards gives the same bytes too.
#include <stowage/checkpoint/convert_checkpoint.hpp>

#include <catch2/catch.hpp>

#include "../unit/checkpoint_test_util.hpp"

#include <unistd.h>

using namespace stowage;
using namespace stowage::checkpoint;
namespace fs = std::filesystem;

namespace {
void compare_folders(const fs::path& ours, const fs::path& ref) {
  std::size_t n = 0;
  for (const auto& de : fs::directory_iterator(ref)) {
    ++n;
    INFO(de.path().filename().string());
    REQUIRE(fs::exists(ours / de.path().filename()));
    CHECK(ckpt_test::same_bytes(ckpt_test::read_all(ours / de.path().filename()),
                                ckpt_test::read_all(de.path())));
  }
  std::size_t m = 0;
  for ([[maybe_unused]] const auto& de : fs::directory_iterator(ours)) ++m;
  CHECK(m == n);
}
}  // namespace

TEST_CASE("convert tool: bf16 shards byte-identical to torch + safetensors",
          "[checkpoint][convert][conformance]") {
  const auto out = fs::temp_directory_path() / ("stowage_convert_" + std::to_string(::getpid()));
  fs::remove_all(out);
  convert_options opt;
  opt.dtype = dtype::bfloat16;
  opt.max_shard_size = parse_shard_size("5KB");
  const auto rep = convert_checkpoint(ckpt_test::fixtures() / "hf_llama_st", out, opt);
  CHECK(rep.shards.size() == 3);
  CHECK(rep.index);
  CHECK(rep.copied.size() == 1);
  compare_folders(out, ckpt_test::fixtures() / "convert" / "llama_bf16");
  fs::remove_all(out);

  // From the .bin shards: same tensors; the order differs (state-dict order, not safetensors'
  // data order), so compare tensors rather than files.
  convert_checkpoint(ckpt_test::fixtures() / "hf_llama_bin", out, opt);
  const auto a = checkpoint_reader::open(out);
  const auto b = checkpoint_reader::open(ckpt_test::fixtures() / "convert" / "llama_bf16");
  REQUIRE(a.names().size() == b.names().size());
  for (const auto& name : b.names()) {
    INFO(name);
    const auto va = a.view(name), vb = b.view(name);
    CHECK(va.desc == vb.desc);
    CHECK(ckpt_test::same_bytes(va.bytes, vb.bytes));
  }
  fs::remove_all(out);
}
