// stowage/storage/pinned_host.hpp: page-locked host memory, the staging area for copies to a
// GPU. With CUDA it is cudaHostAlloc'd (device-accessible, DMA-capable); without CUDA the pages
// are locked with mlock where the OS allows (so offloaded weights are never swapped out), and
// where it does not (RLIMIT_MEMLOCK), plain pages are used after one warning.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/diagnostics.hpp>
#include <stowage/core/error.hpp>
#include <stowage/storage/concepts.hpp>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

#if defined(STOWAGE_WITH_CUDA)
#include <cuda_runtime_api.h>
#else
#include <sys/mman.h>
#endif

namespace stowage::storage {

/// Page-locked host memory.
struct pinned_host {
  using storage_backend_tag = pinned_host;
  static constexpr std::string_view name() noexcept { return "pinned_host"; }

  void* allocate(std::size_t bytes, std::size_t alignment = default_alignment) {
    if (bytes == 0) bytes = 1;
    (void)alignment;  // both paths return page-aligned memory
#if defined(STOWAGE_WITH_CUDA)
    void* p = nullptr;
    if (auto rc = cudaHostAlloc(&p, bytes, cudaHostAllocPortable); rc != cudaSuccess)
      throw error("storage::pinned_host: cudaHostAlloc of " + std::to_string(bytes) +
                  " bytes failed: " + cudaGetErrorString(rc));
    return p;
#else
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw error("storage::pinned_host: mmap of " + std::to_string(bytes) +
                  " bytes failed: " + std::strerror(errno));
    if (::mlock(p, bytes) != 0) {
      static std::atomic<bool> warned{false};
      if (!warned.exchange(true))
        warn(std::string("storage::pinned_host: cannot lock pages (") + std::strerror(errno) +
             "); using pageable memory. Raise RLIMIT_MEMLOCK (ulimit -l) to lock them.");
    }
    return p;
#endif
  }
  void deallocate(void* p, std::size_t bytes, std::size_t alignment = default_alignment) noexcept {
    (void)alignment;
    if (bytes == 0) bytes = 1;
#if defined(STOWAGE_WITH_CUDA)
    (void)bytes;
    cudaFreeHost(p);
#else
    ::munlock(p, bytes);
    ::munmap(p, bytes);
#endif
  }
  friend constexpr bool operator==(const pinned_host&, const pinned_host&) noexcept { return true; }
  friend constexpr void get_property(const pinned_host&, host_accessible) noexcept {}
#if defined(STOWAGE_WITH_CUDA)
  friend constexpr void get_property(const pinned_host&, device_accessible) noexcept {}
#endif
};
static_assert(storage_backend_with<pinned_host, host_accessible>);

}  // namespace stowage::storage
