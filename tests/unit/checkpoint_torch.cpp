// torch.save zip checkpoints read through the restricted unpickler, compared tensor for tensor
// with the bytes torch itself reported (tests/fixtures/checkpoints/torch/*.expected.json):
// tied and shared storages, a transposed view and a column slice (copied out), bf16, int64,
// bool, scalars, empty tensors, float8/uint16 through UntypedStorage + _rebuild_tensor_v3, an
// nn.Module state dict (OrderedDict with _metadata) and a plain dict.
#include <stowage/checkpoint/torch_zip.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_test_util.hpp"

using namespace stowage;
using namespace stowage::checkpoint;

namespace {

void check_against_expected(const std::string& stem) {
  const auto dir = ckpt_test::fixtures() / "torch";
  auto ck = torch_checkpoint::open(dir / (stem + ".bin"));
  const auto expected = ckpt_test::expected_tensors(dir / (stem + ".expected.json"));
  REQUIRE(ck.tensors().size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const auto& e = expected[i];
    INFO(stem << ": " << e.name);
    CHECK(ck.tensors()[i].desc.name == e.name);  // state-dict order kept
    const auto v = ck.view(e.name);
    CHECK(v.desc.dtype == e.dtype);
    CHECK(v.desc.shape == e.shape);
    CHECK(ckpt_test::same_bytes(v.bytes, e.bytes));
  }
}

}  // namespace

TEST_CASE("torch zip: state dicts read bit-exactly", "[checkpoint][torch]") {
  for (const char* stem : {"state_dict", "module", "plain_dict"}) check_against_expected(stem);
}

TEST_CASE("torch zip: shared storages, views and zero-copy", "[checkpoint][torch]") {
  auto ck = torch_checkpoint::open(ckpt_test::fixtures() / "torch" / "state_dict.bin");
  const auto* w = ck.find("w");
  const auto* tied = ck.find("w_tied");
  const auto* row = ck.find("w_row");
  const auto* t = ck.find("w_t");
  const auto* cols = ck.find("w_cols");
  REQUIRE((w && tied && row && t && cols));
  CHECK(w->storage_key == tied->storage_key);
  CHECK(w->storage_key == row->storage_key);
  CHECK(row->storage_offset == 6);
  CHECK(w->contiguous);
  CHECK(row->contiguous);
  CHECK_FALSE(t->contiguous);
  CHECK_FALSE(cols->contiguous);
  const auto vw = ck.view("w");
  const auto vt = ck.view("w_tied");
  CHECK(vw.zero_copy());
  CHECK(vw.data() == vt.data());  // one storage, one mapping
  CHECK(ck.view("w_row").data() == vw.data() + 6 * 4);
  CHECK_FALSE(ck.view("w_t").zero_copy());
  CHECK(ck.view("f8").desc.dtype == dtype::float8_e4m3fn);
  CHECK(ck.view("u16").desc.dtype == dtype::uint16);
  CHECK(ck.view("scalar").desc.shape.rank() == 0);
  CHECK(ck.view("empty").size() == 0);
  CHECK_FALSE(ck.layout().big_endian);
  CHECK(ck.layout().prefix == "state_dict");
}

TEST_CASE("torch zip: format detection names the legacy formats", "[checkpoint][torch]") {
  const auto dir = ckpt_test::fixtures() / "torch";
  CHECK(detect_torch_format(ckpt_test::read_all(dir / "state_dict.bin")) == torch_format::zip);
  CHECK(detect_torch_format(ckpt_test::read_all(dir / "legacy.bin")) ==
        torch_format::legacy_pickle);
  CHECK(detect_torch_format(ckpt_test::read_all(dir / "legacy_tar.bin")) ==
        torch_format::legacy_tar);
  CHECK(detect_torch_format(ckpt_test::read_all(dir / "preview.bin")) ==
        torch_format::preview_pytorch1);
  CHECK_THROWS_WITH(torch_checkpoint::open(dir / "legacy.bin"), Catch::Contains("legacy"));
  CHECK_THROWS_WITH(torch_checkpoint::open(dir / "legacy_tar.bin"), Catch::Contains("tar"));
  CHECK_THROWS_WITH(torch_checkpoint::open(dir / "preview.bin"), Catch::Contains("PYTORCH1"));
}

TEST_CASE("torch zip: big-endian byteorder record is honoured", "[checkpoint][torch]") {
  // big_endian.bin: plain_dict.bin with byteorder "big" and its storage byte-swapped (written by
  // the generator; torch.load reads it back to the same values, which the generator asserts).
  auto ck = torch_checkpoint::open(ckpt_test::fixtures() / "torch" / "big_endian.bin");
  CHECK(ck.layout().big_endian);
  const auto expected =
      ckpt_test::expected_tensors(ckpt_test::fixtures() / "torch" / "plain_dict.expected.json");
  REQUIRE(expected.size() == 1);
  const auto v = ck.view("x");
  CHECK_FALSE(v.zero_copy());
  CHECK(ckpt_test::same_bytes(v.bytes, expected[0].bytes));
}
