// stowage/storage/host.hpp: pageable host memory, the default backend for "cpu" entries of a
// device map.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/storage/concepts.hpp>

#include <cstddef>
#include <new>
#include <string>

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

}  // namespace stowage::storage
