// Unit tests of the placement API beyond accelerate's behaviour: devices, budgets, device-map
// JSON and validation, overrides, runtime-memory reservation, strategies, errors.
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/placement/policies.hpp>

#include <catch2/catch.hpp>

namespace sw = stowage;

namespace {
const sw::module_tree& f1() {
  static const auto t =
      sw::load_module_tree(std::string(STOWAGE_FIXTURES_DIR) + "/module_trees/F1.json");
  return t;
}
const sw::module_tree& toy() {
  static const auto t =
      sw::load_module_tree(std::string(STOWAGE_FIXTURES_DIR) + "/module_trees/F17.json");
  return t;
}
}  // namespace

TEST_CASE("devices parse, normalise and order as accelerate orders budgets") {
  CHECK(sw::device("cuda:3") == sw::device(3));
  CHECK(sw::device("2") == sw::device(2));
  CHECK(sw::device("cpu").is_cpu());
  CHECK_THROWS_AS(sw::device("gpu"), sw::device_map_error);
  CHECK_THROWS_WITH(sw::device("cuda:x"), Catch::Contains("cuda:x"));
  CHECK(sw::device(7) < sw::device::mps());
  CHECK(sw::device::mps() < sw::device::cpu());
  CHECK(sw::device::cpu() < sw::device::disk());
}

TEST_CASE("max_memory: sizes, order, errors naming the key") {
  sw::max_memory m{{"cpu", "1GB"}, {1, "1MiB"}, {0, 5}, {"disk", "1TB"}};
  REQUIRE(m.size() == 4);
  CHECK(m.entries()[0].first == sw::device(0));
  CHECK(m.at(1) == sw::byte_size(1048576));
  CHECK(m.at(sw::device::disk()) == sw::byte_size(1'000'000'000'000));
  CHECK_THROWS_WITH((sw::max_memory{{0, "5XB"}}), Catch::Contains("max_memory[0]"));
  CHECK_THROWS_AS((sw::max_memory{{0, -1}}), sw::invalid_budget);
  CHECK_THROWS_AS(sw::max_memory::parse_key("gpu"), sw::invalid_budget);
  auto j = sw::max_memory::from_json(nlohmann::json::parse(R"({"0": "2GiB", "cpu": 100})"));
  CHECK(j.at(0) == sw::byte_size(2147483648));
  CHECK(sw::max_memory::from_json(j.to_json()) == j);
  const auto measured = sw::measure_max_memory();
  CHECK(measured.measured);
  CHECK(measured.contains(sw::device::cpu()));
}

TEST_CASE("device_map JSON round trip in accelerate's format") {
  auto m =
      sw::device_map::from_json_text(R"({"linear1": 0, "batchnorm": "cuda:1", "linear2": "disk"})");
  CHECK(m.at("batchnorm") == sw::device(1));
  CHECK(m.to_json_text() == R"({"linear1":0,"batchnorm":1,"linear2":"disk"})");
  CHECK(sw::device_map::from_json_text(m.to_json_text()) == m);
  CHECK_THROWS_WITH(sw::device_map::from_json_text(R"({"a": true})"), Catch::Contains("\"a\""));
  CHECK_THROWS_AS(sw::device_map::from_json_text("{"), sw::device_map_error);
  CHECK(m.device_for("batchnorm.running_mean") == sw::device(1));
  CHECK_FALSE(m.device_for("linear10.weight"));
}

TEST_CASE("validate_device_map names the bad key") {
  CHECK_NOTHROW(sw::validate_device_map(
      f1(), {{"linear1", 0}, {"batchnorm", 1}, {"linear2.weight", 1}, {"linear2.bias", 1}}));
  CHECK_THROWS_WITH(sw::validate_device_map(f1(), {{"", 0}, {"nope", 1}}),
                    Catch::Contains("`nope`"));
  CHECK_THROWS_WITH(
      sw::validate_device_map(
          f1(), {{"linear1", 0}, {"linear1.weight", 1}, {"batchnorm", 0}, {"linear2", 0}}),
      Catch::Contains("`linear1`") && Catch::Contains("`linear1.weight`"));
  CHECK_THROWS_WITH(sw::validate_device_map(f1(), {{"linear1", 0}, {"linear2", 0}}),
                    Catch::Contains("batchnorm.running_mean"));
}

TEST_CASE("strategies by name and by type agree") {
  const sw::max_memory mm{{0, 300}, {1, 300}};
  CHECK(sw::infer_device_map("balanced", f1(), mm).map ==
        sw::infer_device_map<sw::placement::balanced>(f1(), mm).map);
  CHECK(sw::infer_device_map("auto", f1(), mm).map ==
        sw::infer_device_map<sw::placement::auto_>(f1(), mm).map);
  CHECK_THROWS_WITH(sw::infer_device_map("fastest", f1(), mm), Catch::Contains("'balanced_low_0'"));
}

TEST_CASE("overrides pin tensors first and keep ties together") {
  sw::plan_options o;
  o.no_split = {"Block"};
  o.overrides = {{R"(lm_head\.weight)", sw::device::cpu()}};
  const auto r =
      sw::infer_device_map<sw::placement::sequential>(toy(), {{0, 100000}, {"cpu", 100000}}, o);
  // lm_head.weight is tied to wte.weight: both follow the override.
  CHECK(r.map.device_for("wte.weight") == sw::device::cpu());
  CHECK(r.map.device_for("lm_head.weight") == sw::device::cpu());
  CHECK(r.map.device_for("h.0.attn.c_attn.weight") == sw::device(0));
  REQUIRE_NOTHROW(sw::validate_device_map(toy(), r.map));
  o.overrides = {{R"(h\.0\..*)", sw::device(0)}};
  CHECK_THROWS_WITH(
      sw::infer_device_map<sw::placement::sequential>(toy(), {{0, 100}, {"cpu", 100000}}, o),
      Catch::Contains("more bytes needed"));
}

TEST_CASE("runtime memory: KV cache per layer and workspace are reserved before weights") {
  auto cfg = sw::models::llama_config::from_file(std::string(STOWAGE_EXAMPLES_DIR) +
                                                 "/configs/Llama-2-7b-hf/config.json");
  const auto tree =
      sw::to_module_tree(sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::bf16>>(cfg));
  sw::plan_options o;
  o.no_split = {"LlamaDecoderLayer"};
  const sw::max_memory mm{{0, "16GB"}, {"cpu", "100GB"}};
  const auto plain = sw::infer_device_map<sw::placement::sequential>(tree, mm, o);
  o.runtime.batch_size = 4;
  o.runtime.context_length = 4096;
  o.runtime.activation_workspace = 1'000'000'000;
  const auto with_kv = sw::infer_device_map<sw::placement::sequential>(tree, mm, o);
  // 2 (K, V) x 4096 x 2 bytes per token per layer = 16 KiB; x 4 x 4096 = 256 MiB per layer.
  auto on_gpu = [](const sw::plan_result& r) {
    int n = 0;
    for (int i = 0; i < 32; ++i)
      n += r.map.device_for("model.layers." + std::to_string(i) + ".mlp.up_proj.weight") ==
           sw::device(0);
    return n;
  };
  CHECK(on_gpu(with_kv) < on_gpu(plain));
  for (const auto& [k, d] : with_kv.map) CHECK(k.find("stowage_kv_cache") == std::string::npos);
  o.runtime.activation_workspace = 20'000'000'000;
  CHECK_THROWS_WITH(sw::infer_device_map<sw::placement::sequential>(tree, mm, o),
                    Catch::Contains("device 0") && Catch::Contains("more bytes needed"));
}

TEST_CASE("allow_disk_offload=false turns disk placement into a placement_error") {
  sw::plan_options o;
  o.allow_disk_offload = false;
  CHECK_THROWS_WITH(sw::infer_device_map<sw::placement::sequential>(f1(), {{0, 150}}, o),
                    Catch::Contains("more bytes") && Catch::Contains("0 needs at least"));
}

TEST_CASE("no_split<T> names module classes") {
  CHECK(sw::no_split<sw::models::llama_rms_norm> == std::vector<std::string>{"LlamaRMSNorm"});
}

TEST_CASE("a tree whose modules were not added in pre-order plans like one that was") {
  // Same structure twice: "a" (two linears) and "b" (one linear); the second tree adds b
  // before a's children, so its node order is not the pre-order.
  auto linear = [](sw::module_tree& t, std::size_t parent, const char* name, std::int64_t n) {
    t.add_parameter(t.add_child(parent, name, "Linear"),
                    {"weight", sw::shape{n, n}, sw::dtype::float32});
  };
  sw::module_tree in_order("Model");
  const auto a1 = in_order.add_child(0, "a", "Block");
  linear(in_order, a1, "x", 4);
  linear(in_order, a1, "y", 6);
  const auto b1 = in_order.add_child(0, "b", "Block");
  linear(in_order, b1, "z", 5);
  sw::module_tree shuffled("Model");
  const auto a2 = shuffled.add_child(0, "a", "Block");
  const auto b2 = shuffled.add_child(0, "b", "Block");
  linear(shuffled, b2, "z", 5);
  linear(shuffled, a2, "x", 4);
  linear(shuffled, a2, "y", 6);
  const sw::tree_index ix(shuffled);
  CHECK(ix.preorder() != std::vector<sw::tree_index::id>{0, 1, 2, 3, 4, 5});
  CHECK(ix.covers(*ix.find("a"), *ix.find("a.y.weight")));
  CHECK_FALSE(ix.covers(*ix.find("b"), *ix.find("a.y.weight")));
  CHECK(sw::compute_module_sizes(shuffled).entries() ==
        sw::compute_module_sizes(in_order).entries());
  for (const sw::max_memory& mm :
       {sw::max_memory{{0, 150}, {1, 150}, {"cpu", 1000}}, sw::max_memory{{0, 300}, {"cpu", 1000}},
        sw::max_memory{{0, 100}}}) {
    sw::plan_options o;
    CHECK(sw::infer_device_map<sw::placement::sequential>(shuffled, mm, o).map ==
          sw::infer_device_map<sw::placement::sequential>(in_order, mm, o).map);
    o.no_split = {"Block"};
    CHECK(sw::infer_device_map<sw::placement::balanced>(shuffled, mm, o).map ==
          sw::infer_device_map<sw::placement::balanced>(in_order, mm, o).map);
  }
}

TEST_CASE("plan_context: repeated plans equal fresh ones and reuse the size tables") {
  sw::plan_context ctx(toy());
  sw::plan_options o;
  o.no_split = {"Block"};
  const sw::max_memory mm{{0, 2000}, {1, 4000}, {"cpu", 100000}};
  const auto& s1 = ctx.sizes(std::nullopt, {});
  for (int i = 0; i < 3; ++i) {
    CHECK(sw::infer_device_map<sw::placement::balanced>(ctx, mm, o).map ==
          sw::infer_device_map<sw::placement::balanced>(toy(), mm, o).map);
    CHECK(sw::infer_device_map<sw::placement::auto_>(ctx, mm, o).map ==
          sw::infer_device_map<sw::placement::auto_>(toy(), mm, o).map);
  }
  CHECK(&ctx.sizes(std::nullopt, {}) == &s1);
  CHECK(s1.size[0] == sw::compute_module_sizes(toy()).total());
}

TEST_CASE("Transformers' size rule: bool is one byte, buffers keep their dtype") {
  sw::module_tree t("M");
  const auto m = t.add_child(0, "m", "Mod");
  t.add_parameter(m, {"weight", sw::shape{4, 4}, sw::dtype::float32});
  t.add_buffer(m, {"mask", sw::shape{16}, sw::dtype::bool_});
  t.add_buffer(m, {"freq", sw::shape{8}, sw::dtype::float32, false});
  const sw::tree_index ix(t);
  const auto acc = sw::compute_item_sizes(ix, sw::dtype::float16);
  const auto tf =
      sw::compute_item_sizes(ix, sw::dtype::float16, {}, false, sw::size_rule::transformers);
  // accelerate: 16 x 2 + 16 / 8 + 8 x 2; Transformers: 16 x 2 + 16 x 1 + 8 x 4.
  CHECK(acc.size[0] == sw::byte_size(32 + 2 + 16));
  CHECK(tf.size[0] == sw::byte_size(32 + 16 + 32));
  CHECK(tf.biggest_direct == sw::byte_size(80));
}
