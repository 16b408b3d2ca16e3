// stowage/storage/device.hpp: GPU memory on one CUDA device, the backend for integer entries
// of a device map. It exists only when stowage is built with CUDA (the stowage::cuda target
// defines STOWAGE_WITH_CUDA); without it this header declares nothing, and device-map entries
// that name a GPU are refused at dispatch with a clear error.
#pragma once

#include <stowage/config.hpp>

#if defined(STOWAGE_WITH_CUDA)

#include <stowage/core/error.hpp>
#include <stowage/storage/concepts.hpp>

#include <cuda_runtime_api.h>

#include <string>

namespace stowage::storage {

/// Throws stowage::error with the CUDA error text when `rc` is not cudaSuccess.
inline void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw error(std::string(what) + ": " + cudaGetErrorString(rc));
}

/// Memory of CUDA device `ordinal` (cudaMalloc; 256-byte aligned by CUDA's guarantee).
struct device {
  using storage_backend_tag = device;
  static constexpr std::string_view name() noexcept { return "device"; }

  int ordinal = 0;

  void* allocate(std::size_t bytes, std::size_t alignment = default_alignment) {
    (void)alignment;
    if (bytes == 0) bytes = 1;
    int previous = 0;
    cuda_check(cudaGetDevice(&previous), "storage::device: cudaGetDevice");
    cuda_check(cudaSetDevice(ordinal), "storage::device: cudaSetDevice");
    void* p = nullptr;
    const auto rc = cudaMalloc(&p, bytes);
    cudaSetDevice(previous);
    cuda_check(rc, ("storage::device: cudaMalloc of " + std::to_string(bytes) + " bytes on GPU " +
                    std::to_string(ordinal))
                       .c_str());
    return p;
  }
  void deallocate(void* p, std::size_t, std::size_t = default_alignment) noexcept { cudaFree(p); }
  friend constexpr bool operator==(const device& a, const device& b) noexcept {
    return a.ordinal == b.ordinal;
  }
  friend constexpr void get_property(const device&, device_accessible) noexcept {}
};
static_assert(storage_backend_with<device, device_accessible>);
static_assert(!has_property<device, host_accessible>);

/// Number of CUDA devices visible (0 when the driver has none or is missing).
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace stowage::storage

#endif  // STOWAGE_WITH_CUDA
