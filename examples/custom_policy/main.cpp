// A placement policy of one's own: embeddings and lm_head stay on the CPU, the decoder layers
// fill the GPUs from the last one backwards, whatever does not fit goes to the CPU. It satisfies
// stowage::placement_policy, so infer_device_map<embeddings_on_cpu> plans (and validates) with it.
#include <stowage/module/module_tree_json.hpp>
#include <stowage/placement/policies.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace sw = stowage;

// [doc:policy]
struct embeddings_on_cpu {
  sw::device_map plan(const sw::module_tree& tree, const sw::max_memory& budgets,
                      const sw::plan_options& options) const {
    const auto sizes = sw::compute_module_sizes(tree, options.dtype, options.special_dtypes);
    std::vector<std::pair<sw::device, sw::byte_size>> gpus;  // remaining room, last GPU first
    for (const auto& [d, b] : budgets)
      if (d.is_gpu()) gpus.insert(gpus.begin(), {d, b});
    sw::device_map map;
    // Walk the tree: split modules down to the no-split layers (or leaves).
    std::vector<std::size_t> stack{0};
    while (!stack.empty()) {
      const std::size_t i = stack.back();
      stack.pop_back();
      const auto& n = tree.node(i);
      const bool layer =
          i != 0 && (n.children.empty() || sw::is_no_split(tree, i, options.no_split));
      if (!layer) {
        for (auto it = n.children.rbegin(); it != n.children.rend(); ++it) stack.push_back(*it);
        for (const auto* list : {&n.parameters, &n.buffers})
          for (const auto& t : *list) map.set(sw::join_name(n.path, t.name), sw::device::cpu());
        continue;
      }
      const bool embedding =
          n.class_name.find("Embedding") != std::string::npos || n.name == "lm_head";
      sw::device where = sw::device::cpu();
      if (!embedding)
        for (auto& [d, room] : gpus)
          if (sizes[n.path] <= room) {
            room -= sizes[n.path];
            where = d;
            break;
          }
      map.set(n.path, where);
    }
    return options.clean_result ? sw::clean_device_map(map) : map;
  }
};
static_assert(
    sw::placement_policy<embeddings_on_cpu>,
    "embeddings_on_cpu must satisfy placement_policy: a const plan(tree, budgets, options)");
// [/doc:policy]

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: custom_policy MODULE_TREE.json\n");
    return 2;
  }
  try {
    // [doc:use]
    const auto tree = sw::load_module_tree(argv[1]);
    sw::plan_options o;
    o.no_split = {"Block"};
    const auto r = sw::infer_device_map<embeddings_on_cpu>(
        tree, sw::max_memory{{0, 4000}, {1, 4000}, {"cpu", "1MB"}}, o);
    std::printf("%s\n", r.map.to_json_text(2).c_str());
    for (const auto& d : r.report.devices)
      std::printf("%s: %s bytes\n", d.target.to_string().c_str(),
                  d.weights.to_python_string().c_str());
    // [/doc:use]
    return 0;
  } catch (const sw::error& e) {
    std::fprintf(stderr, "custom_policy: %s\n", e.what());
    return 1;
  }
}
