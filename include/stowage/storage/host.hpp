// stowage/storage/host.hpp: pageable host memory, the default backend for "cpu" entries of a
// device map, and host_arena: one mapping that a load carves all its host tensors from (a few
// 2 MiB-aligned huge-page regions instead of thousands of small allocations whose unaligned
// edges fall back to 4 KiB pages).
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/storage/concepts.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

namespace stowage::storage {

/// Pageable host memory from the global aligned operator new.
struct host {
  using storage_backend_tag = host;
  static constexpr std::string_view name() noexcept { return "host"; }

  void* allocate(std::size_t bytes, std::size_t alignment = default_alignment) {
    if (bytes == 0) bytes = 1;  // a distinct, freeable pointer for empty tensors
    try {
      return ::operator new (bytes, std::align_val_t{alignment});
    } catch (const std::bad_alloc&) {
      throw error("storage::host: cannot allocate " + std::to_string(bytes) + " bytes");
    }
  }
  void deallocate(void* p, std::size_t bytes, std::size_t alignment = default_alignment) noexcept {
    (void)bytes;
    ::operator delete (p, std::align_val_t{alignment});
  }
  friend constexpr bool operator==(const host&, const host&) noexcept { return true; }
  friend constexpr void get_property(const host&, host_accessible) noexcept {}
};
static_assert(storage_backend_with<host, host_accessible>);
static_assert(!has_property<host, device_accessible>);

/// One private anonymous mapping, 2 MiB-aligned and a whole number of 2 MiB blocks long, that
/// host tensors are sub-allocated from (bump allocation; `take` is not thread-safe: the loader
/// carves every tensor before its workers start). With `huge_pages` the whole mapping is
/// MADV_HUGEPAGE, so every byte of every tensor can fault in as part of a 2 MiB page (separate
/// allocations leave each tensor's unaligned head and tail on 4 KiB pages: ~20% of a Llama
/// checkpoint's bytes, at several times the fault cost per byte). Tensors share it through a
/// shared_ptr: the mapping goes when the last of them does; a tensor dropped earlier returns its
/// whole pages to the kernel (`give_back`), as freeing a separate allocation would.
class host_arena {
 public:
  static constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;

  host_arena(std::size_t bytes, bool huge_pages) {
    capacity_ = (bytes + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
    if (capacity_ == 0) capacity_ = huge_page_bytes;
    // Over-map by one huge page and trim, so the kept range starts on a 2 MiB boundary.
    const std::size_t mapped = capacity_ + huge_page_bytes;
    void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw error("storage::host_arena: cannot map " + std::to_string(mapped) + " bytes");
    const auto raw = reinterpret_cast<std::uintptr_t>(p);
    const std::uintptr_t lo = (raw + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
    if (lo > raw) ::munmap(p, lo - raw);
    if (const std::uintptr_t tail = raw + mapped - (lo + capacity_); tail > 0)
      ::munmap(reinterpret_cast<void*>(lo + capacity_), tail);
    base_ = reinterpret_cast<std::byte*>(lo);
#if defined(MADV_HUGEPAGE)
    if (huge_pages) ::madvise(base_, capacity_, MADV_HUGEPAGE);
#else
    (void)huge_pages;
#endif
  }
  host_arena(const host_arena&) = delete;
  host_arena& operator=(const host_arena&) = delete;
  ~host_arena() { ::munmap(base_, capacity_); }

  /// The next `bytes` (at least 1) at `alignment` (a power of two); error when the arena is full.
  void* take(std::size_t bytes, std::size_t alignment = default_alignment) {
    if (bytes == 0) bytes = 1;
    const std::size_t at = (used_ + alignment - 1) / alignment * alignment;
    if (at > capacity_ || bytes > capacity_ - at)
      throw error("storage::host_arena: " + std::to_string(bytes) + " bytes do not fit (" +
                  std::to_string(capacity_ - std::min(at, capacity_)) + " left)");
    used_ = at + bytes;
    return base_ + at;
  }
  /// Returns the whole pages inside [p, p + bytes) to the kernel (the range reads as zeros
  /// afterwards); the caller no longer uses it.
  void give_back(void* p, std::size_t bytes) const noexcept {
    static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    const std::uintptr_t lo = (b + page - 1) / page * page, hi = (b + bytes) / page * page;
    if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }
  /// Asks for (or, `on` false, turns off) transparent huge pages on the whole arena.
  void advise_huge_pages(bool on) const noexcept {
#if defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
    ::madvise(base_, capacity_, on ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#else
    (void)on;
#endif
  }
  std::byte* data() const noexcept { return base_; }
  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t used() const noexcept { return used_; }

 private:
  std::byte* base_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
};

}  // namespace stowage::storage
