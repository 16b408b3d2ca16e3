// stowage/storage/deep_copy.hpp: one way to move bytes between any two backends. A trait,
// storage_access<Dst, Src>, says whether a direct copy exists and how (Kokkos'
// MemorySpaceAccess idea); deep_copy dispatches on it and refuses pairs without a path at
// compile time with a message naming the pair and the way round.
#pragma once

#include <stowage/config.hpp>
#include <stowage/storage/concepts.hpp>
#include <stowage/storage/host.hpp>
#include <stowage/storage/pinned_host.hpp>
#if defined(STOWAGE_WITH_CUDA)
#include <stowage/storage/device.hpp>
#endif

#include <cstddef>
#include <cstring>
#include <type_traits>

namespace stowage::storage {

/// How bytes move from backend Src to backend Dst. Specialise it for a backend of your own.
///   - `copyable`: deep_copy(dst, src) compiles
///   - `copy(dst_backend, dst, src_backend, src, bytes)`: does it
/// The primary template allows every pair of host-accessible backends (a memcpy).
template <class Dst, class Src>
struct storage_access {
  static_assert(storage_backend<Dst> && storage_backend<Src>,
                "storage_access<Dst, Src>: both arguments must satisfy storage_backend");
  static constexpr bool copyable =
      has_property<Dst, host_accessible> && has_property<Src, host_accessible>;
  static void copy(const Dst&, void* dst, const Src&, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
};

#if defined(STOWAGE_WITH_CUDA)
namespace detail {
template <class Dst, class Src>
void cuda_copy(void* dst, const void* src, std::size_t bytes) {
  cuda_check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "deep_copy: cudaMemcpy");
}
}  // namespace detail
template <class Src>
  requires has_property<Src, host_accessible>
struct storage_access<device, Src> {
  static constexpr bool copyable = true;
  static void copy(const device&, void* dst, const Src&, const void* src, std::size_t bytes) {
    detail::cuda_copy<device, Src>(dst, src, bytes);
  }
};
template <class Dst>
  requires has_property<Dst, host_accessible>
struct storage_access<Dst, device> {
  static constexpr bool copyable = true;
  static void copy(const Dst&, void* dst, const device&, const void* src, std::size_t bytes) {
    detail::cuda_copy<Dst, device>(dst, src, bytes);
  }
};
template <>
struct storage_access<device, device> {
  static constexpr bool copyable = true;
  static void copy(const device&, void* dst, const device&, const void* src, std::size_t bytes) {
    cuda_check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "deep_copy: cudaMemcpy");
  }
};
#endif

/// Copies `bytes` bytes from memory of backend `src_backend` to memory of `dst_backend`.
template <storage_backend Dst, storage_backend Src>
void deep_copy(const Dst& dst_backend, void* dst, const Src& src_backend, const void* src,
               std::size_t bytes) {
  static_assert(storage_access<Dst, Src>::copyable,
                "deep_copy(dst, src): no storage_access<Dst, Src> path between these backends; "
                "copy through a host_accessible backend (pinned_host) or specialise "
                "storage_access");
  storage_access<Dst, Src>::copy(dst_backend, dst, src_backend, src, bytes);
}

}  // namespace stowage::storage
