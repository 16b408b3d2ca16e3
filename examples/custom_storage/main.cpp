// A storage backend of one's own: a memory pool. One upfront allocation is carved into aligned
// chunks (a bump pointer; everything is returned at once when the pool is reset), which is what
// a program wants when it loads many tensors of known total size and frees them together. The
// backend satisfies stowage::storage::storage_backend, declares its properties through a hidden
// friend get_property, and specialises storage_access so deep_copy moves bytes in and out of it
// (counting them, which the default memcpy path cannot do).
#include <stowage/storage/concepts.hpp>
#include <stowage/storage/deep_copy.hpp>
#include <stowage/storage/host.hpp>
#include <stowage/storage/pinned_host.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

namespace sw = stowage;

// [doc:backend]
// The pool's state, shared by every copy of the backend (copies compare equal: memory from
// one may be given back through another).
struct arena {
  explicit arena(std::size_t capacity)
      : base(static_cast<std::byte*>(::operator new (capacity, std::align_val_t{4096}))),
        size(capacity) {}
  ~arena() { ::operator delete (base, std::align_val_t{4096}); }
  arena(const arena&) = delete;
  arena& operator=(const arena&) = delete;

  std::byte* base;
  std::size_t size;
  std::size_t used = 0;  // bump pointer
  std::size_t live = 0;  // allocations not yet given back
  std::uint64_t copied_in = 0, copied_out = 0;
};

class pool_storage {
 public:
  using storage_backend_tag = pool_storage;  // opts in to the storage_backend concept
  static constexpr std::string_view name() noexcept { return "pool"; }

  explicit pool_storage(std::size_t capacity) : arena_(std::make_shared<arena>(capacity)) {}

  void* allocate(std::size_t bytes, std::size_t alignment = sw::storage::default_alignment) {
    const std::size_t start = (arena_->used + alignment - 1) / alignment * alignment;
    if (start > arena_->size || bytes > arena_->size - start)
      throw sw::error("storage::pool: cannot allocate " + std::to_string(bytes) + " bytes (" +
                      std::to_string(arena_->size - arena_->used) + " of " +
                      std::to_string(arena_->size) + " left)");
    arena_->used = start + bytes;
    ++arena_->live;
    return arena_->base + start;
  }
  // Individual frees only count; the space comes back when the last allocation is returned.
  void deallocate(void*, std::size_t, std::size_t = sw::storage::default_alignment) noexcept {
    if (--arena_->live == 0) arena_->used = 0;
  }

  // The shared state (counters included) is reachable from a const backend, as deep_copy
  // passes backends by const reference.
  arena& stats() const noexcept { return *arena_; }

  friend bool operator==(const pool_storage& a, const pool_storage& b) noexcept {
    return a.arena_ == b.arena_;
  }
  // Properties are declared, not inferred: the CPU reads and writes pool memory directly.
  friend constexpr void get_property(const pool_storage&, sw::storage::host_accessible) noexcept {}

 private:
  std::shared_ptr<arena> arena_;
};

static_assert(sw::storage::storage_backend<pool_storage>,
              "pool_storage must satisfy storage_backend: tag, allocate, noexcept deallocate, "
              "name(), ==");
static_assert(sw::storage::storage_backend_with<pool_storage, sw::storage::host_accessible>);
static_assert(!sw::storage::has_property<pool_storage, sw::storage::device_accessible>);
// [/doc:backend]

// [doc:access]
// How bytes move in and out of the pool: a memcpy that also counts the traffic. Partial
// specialisations for any host-accessible peer are more specialised than the primary template.
namespace stowage::storage {
template <class Src>
  requires has_property<Src, host_accessible>
struct storage_access<pool_storage, Src> {
  static constexpr bool copyable = true;
  static void copy(const pool_storage& dst_backend, void* dst, const Src&, const void* src,
                   std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
    dst_backend.stats().copied_in += bytes;
  }
};
template <class Dst>
  requires has_property<Dst, host_accessible> &&
      (!std::is_same_v<Dst, pool_storage>)struct storage_access<Dst, pool_storage> {
    static constexpr bool copyable = true;
    static void copy(const Dst&, void* dst, const pool_storage& src_backend, const void* src,
                     std::size_t bytes) {
      if (bytes) std::memcpy(dst, src, bytes);
      src_backend.stats().copied_out += bytes;
    }
  };
}  // namespace stowage::storage
// [/doc:access]

int main() try {
  // [doc:use]
  pool_storage pool(1 << 20);  // 1 MiB
  sw::storage::host host;
  std::vector<float> weights(4096);
  for (std::size_t i = 0; i < weights.size(); ++i) weights[i] = static_cast<float>(i) * 0.5f;

  // Host -> pool -> pinned host, each step through the one deep_copy.
  const std::size_t bytes = weights.size() * sizeof(float);
  void* in_pool = pool.allocate(bytes);
  sw::storage::deep_copy(pool, in_pool, host, weights.data(), bytes);
  sw::storage::pinned_host pinned;
  void* back = pinned.allocate(bytes);
  sw::storage::deep_copy(pinned, back, pool, in_pool, bytes);
  const bool same = std::memcmp(back, weights.data(), bytes) == 0;
  std::printf("round trip through the pool: %s, %llu bytes in, %llu bytes out, %zu of %zu used\n",
              same ? "equal" : "DIFFERENT", static_cast<unsigned long long>(pool.stats().copied_in),
              static_cast<unsigned long long>(pool.stats().copied_out), pool.stats().used,
              pool.stats().size);
  pinned.deallocate(back, bytes);
  pool.deallocate(in_pool, bytes);
  std::printf("after the last deallocate: %zu used\n", pool.stats().used);

  try {
    (void)pool.allocate(2 << 20);
  } catch (const sw::error& e) {
    std::printf("%s\n", e.what());
  }
  // [/doc:use]
  return same ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "custom_storage: %s\n", e.what());
  return 1;
}
