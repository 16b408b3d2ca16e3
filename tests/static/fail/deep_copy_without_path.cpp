// deep_copy between backends with no storage_access path must not compile.
// expect: no storage_access<Dst, Src> path between these backends
#include <stowage/storage/deep_copy.hpp>

struct arena {
  using storage_backend_tag = arena;
  static constexpr std::string_view name() noexcept { return "arena"; }
  void* allocate(std::size_t, std::size_t) { return nullptr; }
  void deallocate(void*, std::size_t, std::size_t) noexcept {}
  friend bool operator==(const arena&, const arena&) = default;
};

void f(void* d, const void* s) {
  stowage::storage::deep_copy(arena{}, d, stowage::storage::host{}, s, 1);
}
