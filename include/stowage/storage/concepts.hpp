// stowage/storage/concepts.hpp: what a storage backend is. A backend is a memory resource
// (allocate / deallocate / equality, the shape of CCCL's cuda::mr) that declares its
// capabilities with property tags through a hidden-friend get_property, so code can require
// "host-accessible" or "device-accessible" memory at compile time.
//
// Customisation points in this family:
//   - storage_backend<R>             the concept a backend type satisfies
//   - get_property(const R&, Tag)    hidden friend declaring a property (host_accessible, ...)
//   - storage_access<Dst, Src>       trait: how bytes move between two backends (deep_copy.hpp)
#pragma once

#include <stowage/config.hpp>

#include <concepts>
#include <cstddef>
#include <string_view>

namespace stowage::storage {

/// Property: the CPU can read and write the memory directly.
struct host_accessible {};
/// Property: a CUDA kernel can read and write the memory directly.
struct device_accessible {};
/// Property: the memory outlives the process (an offload file).
struct persistent {};

/// A storage backend: a memory resource with an opt-in tag.
///   - `typename R::storage_backend_tag` (the Kokkos self-alias idea: an explicit opt-in)
///   - `r.allocate(bytes, alignment)` returns void*, throws on failure
///   - `r.deallocate(p, bytes, alignment)` is noexcept
///   - `R::name()` for messages and reports ("host", "pinned_host", "device", "file")
///   - equality: two backends compare equal when memory from one may be freed by the other
template <class R>
concept storage_backend = std::equality_comparable<R> &&
    requires(R& r, std::size_t bytes, std::size_t alignment, void* p) {
  typename R::storage_backend_tag;
  { r.allocate(bytes, alignment) } -> std::same_as<void*>;
  { r.deallocate(p, bytes, alignment) }
  noexcept->std::same_as<void>;
  { R::name() } -> std::convertible_to<std::string_view>;
};

/// True when backend R declares property P.
template <class R, class P>
concept has_property = requires(const R& r) {
  get_property(r, P{});
};

/// A backend that has every listed property.
template <class R, class... Props>
concept storage_backend_with = storage_backend<R> &&(has_property<R, Props>&&...);

/// Default alignment of every allocation: enough for AVX-512 loads and CUDA's 256-byte rule.
inline constexpr std::size_t default_alignment = 256;

}  // namespace stowage::storage
