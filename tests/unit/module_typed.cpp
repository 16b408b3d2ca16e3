// Typed module containers: meta parameters, binding, leaf modules, module_list, reflection
// names, and to_module_tree of typed versions of the torch models in tools/fixture_models.py
// (ModelForTest = F1, ToyGPT = F17/F17_untied) compared with the trees torch itself produced.
#include <stowage/module/init_empty.hpp>
#include <stowage/module/leaf_modules.hpp>
#include <stowage/module/module_list.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/precision/floating.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <cstddef>
#include <string>
#include <vector>

namespace sw = stowage;
using f32 = sw::precision::fp32;

namespace {

// nn.BatchNorm1d(n): weight, bias; buffers running_mean, running_var, num_batches_tracked.
struct batch_norm_1d {
  static constexpr std::string_view class_name = "BatchNorm1d";
  BOOST_HANA_DEFINE_STRUCT(batch_norm_1d, (sw::parameter, weight), (sw::parameter, bias),
                           (sw::buffer, running_mean), (sw::buffer, running_var),
                           (sw::buffer, num_batches_tracked));
  batch_norm_1d() = default;
  explicit batch_norm_1d(std::int64_t n)
      : weight({n}, sw::dtype::float32),
        bias({n}, sw::dtype::float32),
        running_mean({n}, sw::dtype::float32, true),
        running_var({n}, sw::dtype::float32, true),
        num_batches_tracked({}, sw::dtype::int64, true) {}
};

struct model_for_test {
  static constexpr std::string_view class_name = "ModelForTest";
  BOOST_HANA_DEFINE_STRUCT(model_for_test, (sw::linear<f32>, linear1), (batch_norm_1d, batchnorm),
                           (sw::linear<f32>, linear2));
  struct config {};
  model_for_test() = default;
  explicit model_for_test(config) : linear1(3, 4, true), batchnorm(4), linear2(4, 5, true) {}
};

struct gelu {
  static constexpr std::string_view class_name = "GELU";
  BOOST_HANA_DEFINE_STRUCT(gelu);
};

struct toy_attention {
  static constexpr std::string_view class_name = "Attention";
  BOOST_HANA_DEFINE_STRUCT(toy_attention, (sw::linear<f32>, c_attn), (sw::linear<f32>, c_proj),
                           (sw::buffer, mask));
};
struct toy_mlp {
  static constexpr std::string_view class_name = "MLP";
  BOOST_HANA_DEFINE_STRUCT(toy_mlp, (sw::linear<f32>, fc), (gelu, act), (sw::linear<f32>, out));
};
struct toy_block {
  static constexpr std::string_view class_name = "Block";
  BOOST_HANA_DEFINE_STRUCT(toy_block, (sw::layer_norm, ln1), (toy_attention, attn),
                           (sw::layer_norm, ln2), (toy_mlp, mlp));
};
struct toy_gpt_config {
  bool tied = true;
};
struct toy_gpt {
  static constexpr std::string_view class_name = "ToyGPT";
  BOOST_HANA_DEFINE_STRUCT(toy_gpt, (sw::embedding, wte), (sw::embedding, wpe),
                           (sw::module_list<toy_block>, h), (sw::layer_norm, ln_f),
                           (sw::linear<f32>, lm_head));
  bool tied = true;

  toy_gpt() = default;
  explicit toy_gpt(const toy_gpt_config& c)
      : wte(50, 8, sw::dtype::float32),
        wpe(16, 8, sw::dtype::float32),
        h(4,
          [](std::size_t) {
            toy_block b;
            b.ln1 = sw::layer_norm(8, sw::dtype::float32, 1e-5);
            b.attn.c_attn = sw::linear<f32>(8, 24, true);
            b.attn.c_proj = sw::linear<f32>(8, 8, true);
            b.attn.mask = sw::buffer({16, 16}, sw::dtype::bool_, true);
            b.ln2 = sw::layer_norm(8, sw::dtype::float32, 1e-5);
            b.mlp.fc = sw::linear<f32>(8, 32, true);
            b.mlp.out = sw::linear<f32>(32, 8, true);
            return b;
          }),
        ln_f(8, sw::dtype::float32, 1e-5),
        lm_head(8, 50, false),
        tied(c.tied) {}
  std::span<const sw::tied_weight> tied_weights() const noexcept {
    static constexpr sw::tied_weight ties[] = {{"lm_head.weight", "wte.weight"}};
    return tied ? std::span<const sw::tied_weight>(ties) : std::span<const sw::tied_weight>();
  }
};

std::string fixture(const std::string& rel) {
  return std::string(STOWAGE_FIXTURES_DIR) + "/" + rel;
}

}  // namespace

TEST_CASE("a parameter is a meta descriptor: shape and dtype, no bytes") {
  const sw::parameter p({4096, 11008}, sw::dtype::bfloat16);
  CHECK(p.is_meta());
  CHECK(p.shape() == sw::shape{4096, 11008});
  CHECK(p.dtype() == sw::dtype::bfloat16);
  CHECK(p.numel() == 4096LL * 11008);
  CHECK(p.nbytes() == 4096ULL * 11008 * 2);
  // No storage at all: the descriptor is a shape and a dtype.
  STATIC_REQUIRE(sizeof(sw::parameter) <= sizeof(sw::shape) + 8);

  const sw::buffer b({64}, sw::dtype::float32, false);
  CHECK_FALSE(b.persistent());
  CHECK(b.nbytes() == 256);
}

TEST_CASE("binding a parameter gives a view of exactly nbytes() bytes") {
  const sw::parameter p({2, 3}, sw::dtype::float32);
  std::array<float, 6> storage{1, 2, 3, 4, 5, 6};
  auto bytes = std::as_writable_bytes(std::span<float>(storage));
  auto bound = sw::bind(p, bytes);
  CHECK_FALSE(bound.is_meta());
  CHECK(bound.shape() == p.shape());
  auto data = bound.data<float>();
  REQUIRE(data.size() == 6);
  CHECK(data[4] == 5.0f);
  data[0] = 10.0f;
  CHECK(storage[0] == 10.0f);
  // Wrong element type: a clear run-time error (only run time knows the dtype).
  CHECK_THROWS_AS(bound.data<double>(), sw::invalid_dtype);
  // Wrong storage size.
  CHECK_THROWS_AS(sw::bind(p, bytes.first(20)), sw::model_error);
  CHECK_THROWS_WITH(sw::bind(p, bytes.first(20)),
                    Catch::Contains("needs 24 bytes") && Catch::Contains("storage has 20"));
}

TEST_CASE("leaf modules have torch's shapes, dtypes and class names") {
  const sw::linear<sw::precision::bf16> l(4096, 1024, true);
  CHECK(l.weight.shape() == sw::shape{1024, 4096});
  CHECK(l.weight.dtype() == sw::dtype::bfloat16);
  REQUIRE(l.bias);
  CHECK(l.bias->shape() == sw::shape{1024});
  CHECK(l.in_features() == 4096);
  CHECK(l.out_features() == 1024);
  CHECK_FALSE(sw::linear<sw::precision::fp16>(8, 8, false).has_bias());
  CHECK(sw::module_class_name_v<sw::linear<f32>> == "Linear");
  CHECK(sw::module_class_name_v<sw::embedding> == "Embedding");
  CHECK(sw::module_class_name_v<sw::rms_norm> == "RMSNorm");
  CHECK(sw::module_class_name_v<sw::layer_norm> == "LayerNorm");
  CHECK(sw::module_class_name_v<sw::module_list<sw::embedding>> == "ModuleList");
  CHECK(sw::activation("silu").runtime_class_name() == "SiLUActivation");
  CHECK(sw::activation("swish").runtime_class_name() == "SiLU");
  CHECK_THROWS_AS(sw::activation("prelu"), sw::model_error);
  CHECK_THROWS_AS(sw::linear<f32>(0, 4, false), sw::model_error);
  CHECK_THROWS_AS(sw::embedding(-1, 4, sw::dtype::float32), sw::model_error);
}

TEST_CASE("to_module_tree of ModelForTest equals torch's tree (F1)") {
  const auto m = sw::init_empty<model_for_test>(model_for_test::config{});
  const auto tree = sw::to_module_tree(m);
  CHECK(sw::to_json(tree) == sw::to_json(sw::load_module_tree(fixture("module_trees/F1.json"))));
}

TEST_CASE("to_module_tree of ToyGPT equals torch's tree, tied and untied (F17)") {
  const auto tied = sw::to_module_tree(sw::init_empty<toy_gpt>(toy_gpt_config{true}));
  CHECK(sw::to_json(tied) == sw::to_json(sw::load_module_tree(fixture("module_trees/F17.json"))));
  REQUIRE(tied.tied_parameters().size() == 1);
  CHECK(tied.tied_parameters()[0] == std::vector<std::string>{"lm_head.weight", "wte.weight"});

  const auto untied = sw::to_module_tree(sw::init_empty<toy_gpt>(toy_gpt_config{false}));
  CHECK(sw::to_json(untied) ==
        sw::to_json(sw::load_module_tree(fixture("module_trees/F17_untied.json"))));
}

TEST_CASE("for_each_parameter gives torch's named_parameters order and full names") {
  const auto m = sw::init_empty<toy_gpt>(toy_gpt_config{true});
  std::vector<std::pair<std::string, sw::shape>> mine;
  sw::for_each_parameter(m, [&](std::string_view name, const sw::parameter& p) {
    mine.emplace_back(std::string(name), p.shape());
  });
  std::vector<std::pair<std::string, sw::shape>> torch;
  sw::load_module_tree(fixture("module_trees/F17.json"))
      .for_each_parameter([&](std::string name, const sw::tensor_entry& e) {
        torch.emplace_back(std::move(name), e.shape);
      });
  CHECK(mine == torch);
  CHECK(mine.front().first == "wte.weight");
  CHECK(mine[2].first == "h.0.ln1.weight");
  CHECK(mine.back().first == "lm_head.weight");

  std::vector<std::string> buffers;
  sw::for_each_buffer(m, [&](std::string_view name, const sw::buffer& b) {
    CHECK(b.dtype() == sw::dtype::bool_);
    buffers.emplace_back(name);
  });
  CHECK(buffers == std::vector<std::string>{"h.0.attn.mask", "h.1.attn.mask", "h.2.attn.mask",
                                            "h.3.attn.mask"});

  std::vector<std::string> modules;
  sw::for_each_module(m, [&](std::string_view name, std::string_view cls) {
    modules.push_back(std::string(name) + ":" + std::string(cls));
  });
  REQUIRE(modules.size() == 3 + 4 * 10 + 2);  // wte, wpe, h; 10 per block; ln_f, lm_head
  CHECK(modules[0] == "wte:Embedding");
  CHECK(modules[2] == "h:ModuleList");
  CHECK(modules[3] == "h.0:Block");
  CHECK(modules[11] == "h.0.mlp.act:GELU");
}

TEST_CASE("module_list builds a run-time number of modules, named by index") {
  sw::module_list<sw::embedding> l(3, [](std::size_t i) {
    return sw::embedding(static_cast<std::int64_t>(i + 1), 2, sw::dtype::float16);
  });
  CHECK(l.size() == 3);
  CHECK(l[2].num_embeddings() == 3);
  l.emplace_back(7, 2, sw::dtype::float16);
  CHECK(l.size() == 4);
  CHECK_THROWS_AS(l.at(4), std::out_of_range);
}
