// Compile-time checks of the storage concept family.
#include <stowage/storage/deep_copy.hpp>

namespace st = stowage::storage;

static_assert(st::storage_backend<st::host>);
static_assert(st::storage_backend<st::pinned_host>);
static_assert(st::has_property<st::host, st::host_accessible>);
static_assert(!st::has_property<st::host, st::persistent>);
static_assert(st::storage_access<st::host, st::pinned_host>::copyable);

struct not_a_backend {};
static_assert(!st::storage_backend<not_a_backend>);

// A user backend over a fixed arena: satisfies the concept with one opt-in alias.
struct arena {
  using storage_backend_tag = arena;
  static constexpr std::string_view name() noexcept { return "arena"; }
  void* allocate(std::size_t, std::size_t) { return nullptr; }
  void deallocate(void*, std::size_t, std::size_t) noexcept {}
  friend bool operator==(const arena&, const arena&) = default;
};
static_assert(st::storage_backend<arena>);
static_assert(!st::storage_access<arena, st::host>::copyable, "no host_accessible property");
