// test_package.cpp: proves an installed stowage is usable: the umbrella header compiles with the
// package's dependencies, a small module tree is built and a memory budget string is parsed.
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <stowage/stowage.hpp>

int main() {
  namespace sw = stowage;
  sw::module_tree tree("TinyModel");
  const auto embed = tree.add_child(0, "embed", "Embedding");
  tree.add_parameter(embed, {"weight", sw::shape{32000, 64}, sw::dtype::bfloat16});
  const auto head = tree.add_child(0, "head", "Linear");
  tree.add_parameter(head, {"weight", sw::shape{32000, 64}, sw::dtype::bfloat16});
  tree.tie({"embed.weight", "head.weight"});

  const std::uint64_t budget = sw::parse_memory_size("20GiB");
  if (budget != 20ULL * 1024 * 1024 * 1024 || tree.size() != 3) {
    std::cerr << "test_package: unexpected result\n";
    return EXIT_FAILURE;
  }
  std::cout << "stowage test_package: " << tree.size() << " modules, budget " << budget
            << " bytes (" << sw::format_memory_size(static_cast<double>(budget), true) << ")\n";
  return EXIT_SUCCESS;
}
