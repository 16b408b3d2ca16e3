// Unit tests of what a module_tree keeps for planning (module_tree::derived): plan contexts of one
// tree share its index and size tables, any change to the tree drops them, copies and moves start
// without them, and concurrent plans of one const tree agree with a plan of a fresh copy.
#include <stowage/module/module_tree_json.hpp>
#include <stowage/placement/policies.hpp>

#include <catch2/catch.hpp>

#include <thread>
#include <utility>
#include <vector>

namespace sw = stowage;

namespace {
sw::module_tree toy() {
  return sw::load_module_tree(std::string(STOWAGE_FIXTURES_DIR) + "/module_trees/F17.json");
}

// The whole model's size as a planning context sees it, against compute_module_sizes (which
// builds its own index every call).
void check_fresh_sizes(const sw::module_tree& t) {
  sw::plan_context ctx(t);
  CHECK(ctx.index().modules() == t.size());
  CHECK(ctx.sizes(std::nullopt, {}).size[0] == sw::compute_module_sizes(t).total());
}
}  // namespace

TEST_CASE("plan contexts of one tree share its size tables; copies and moves do not") {
  const auto t = toy();
  sw::plan_context a(t), b(t);
  CHECK(&a.index() == &b.index());
  CHECK(&a.sizes(std::nullopt, {}) == &b.sizes(std::nullopt, {}));
  const sw::plan_context c = a;  // a copy shares the tables, with its own scratch space
  CHECK(&c.index() == &a.index());
  CHECK(&c.tree() == &t);

  const auto copy = t;
  sw::plan_context d(copy);
  CHECK(&d.index() != &a.index());
  CHECK(&d.tree() == &copy);
  CHECK(d.sizes(std::nullopt, {}).size[0] == a.sizes(std::nullopt, {}).size[0]);

  auto moved_from = toy();
  { sw::plan_context e(moved_from); }
  const auto moved = std::move(moved_from);
  sw::plan_context f(moved);
  CHECK(&f.tree() == &moved);
  CHECK(f.sizes(std::nullopt, {}).size[0] == a.sizes(std::nullopt, {}).size[0]);
}

TEST_CASE("changing a tree drops what was derived from it") {
  sw::module_tree t("M");
  const auto a = t.add_child(0, "a", "Block");
  t.add_parameter(a, {"weight", sw::shape{8, 8}, sw::dtype::float32});
  check_fresh_sizes(t);

  const auto b = t.add_child(0, "b", "Block");
  check_fresh_sizes(t);  // a new module
  t.add_parameter(b, {"weight", sw::shape{8, 8}, sw::dtype::float32});
  check_fresh_sizes(t);  // a new parameter
  t.add_buffer(a, {"scale", sw::shape{8}, sw::dtype::float32});
  check_fresh_sizes(t);  // a new buffer
  t.tie({"a.weight", "b.weight"});
  check_fresh_sizes(t);  // a tie: b.weight is counted once
  CHECK(sw::plan_context(t).ties().groups.size() == 1);

  // A plan after the changes equals a plan of a copy (which derives everything anew).
  sw::plan_options o;
  o.no_split = {"Block"};
  const sw::max_memory mm{{0, 300}, {"cpu", 100000}};
  const auto copy = t;
  CHECK(sw::infer_device_map<sw::placement::sequential>(t, mm, o).map ==
        sw::infer_device_map<sw::placement::sequential>(copy, mm, o).map);
}

TEST_CASE("concurrent plans of one const tree agree with a plan of a fresh copy") {
  const auto t = toy();
  sw::plan_options o;
  o.no_split = {"Block"};
  const sw::max_memory mm{{0, 2000}, {1, 4000}, {"cpu", 100000}};
  const auto copy = t;
  const auto expected = sw::infer_device_map<sw::placement::balanced>(copy, mm, o).map;
  std::vector<int> agree(4, 0);
  std::vector<std::thread> threads;
  for (std::size_t k = 0; k < agree.size(); ++k)
    threads.emplace_back([&, k] {
      for (int i = 0; i < 50; ++i)
        if (sw::infer_device_map<sw::placement::balanced>(t, mm, o).map == expected) ++agree[k];
    });
  for (auto& th : threads) th.join();
  for (int n : agree) CHECK(n == 50);
}
