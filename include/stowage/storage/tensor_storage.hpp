// stowage/storage/tensor_storage.hpp: the owning handle of one tensor's bytes. A variant over the
// backends a device-map entry can name: pageable host memory ("cpu"), pinned host memory ("cpu"
// when the main device is a GPU, so later copies can be asynchronous), GPU memory (an integer
// entry; CUDA builds only) and a file region ("disk": an offload .dat or a checkpoint range).
// It carries the tensor's descriptor and its placement device. Move-only; the bytes are freed
// (or unmapped) when the handle dies. Live allocations are counted per backend so tests can
// prove that an interrupted load freed everything it allocated. Host bytes are either their own
// allocation or a slice of a host_arena shared with the other tensors of one load.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/placement/devices.hpp>
#include <stowage/storage/concepts.hpp>
#include <stowage/storage/file.hpp>
#include <stowage/storage/host.hpp>
#include <stowage/storage/pinned_host.hpp>
#if defined(STOWAGE_WITH_CUDA)
#include <stowage/storage/device.hpp>
#endif

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace stowage::storage {

/// Which backend a tensor_storage uses.
enum class storage_kind : std::uint8_t { host, pinned_host, device, file };

constexpr std::string_view to_string(storage_kind k) noexcept {
  switch (k) {
    case storage_kind::host:
      return "host";
    case storage_kind::pinned_host:
      return "pinned_host";
    case storage_kind::device:
      return "device";
    case storage_kind::file:
      return "file";
  }
  return "?";
}

namespace detail {

/// Live allocation counters, one per storage_kind (file: live mappings).
struct live_counters {
  std::array<std::atomic<std::int64_t>, 4> count{};
  std::array<std::atomic<std::int64_t>, 4> bytes{};
};
inline live_counters& live() noexcept {
  static live_counters c;
  return c;
}
inline void count_alloc(storage_kind k, std::size_t n) noexcept {
  live().count[static_cast<std::size_t>(k)].fetch_add(1, std::memory_order_relaxed);
  live().bytes[static_cast<std::size_t>(k)].fetch_add(static_cast<std::int64_t>(n),
                                                      std::memory_order_relaxed);
}
inline void count_free(storage_kind k, std::size_t n) noexcept {
  live().count[static_cast<std::size_t>(k)].fetch_sub(1, std::memory_order_relaxed);
  live().bytes[static_cast<std::size_t>(k)].fetch_sub(static_cast<std::int64_t>(n),
                                                      std::memory_order_relaxed);
}

/// One allocation from an allocating backend, freed on destruction.
template <storage_backend Backend, storage_kind Kind>
class owned_block {
 public:
  owned_block(Backend b, std::size_t bytes) : backend_(std::move(b)), bytes_(bytes) {
    ptr_ = backend_.allocate(bytes_, default_alignment);
    count_alloc(Kind, bytes_);
  }
  owned_block(const owned_block&) = delete;
  owned_block& operator=(const owned_block&) = delete;
  owned_block(owned_block&& o) noexcept
      : backend_(o.backend_),
        ptr_(std::exchange(o.ptr_, nullptr)),
        bytes_(std::exchange(o.bytes_, 0)) {}
  owned_block& operator=(owned_block&& o) noexcept {
    if (this != &o) {
      release();
      backend_ = o.backend_;
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~owned_block() { release(); }

  void* data() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return bytes_; }
  const Backend& backend() const noexcept { return backend_; }

 private:
  void release() noexcept {
    if (ptr_) {
      backend_.deallocate(ptr_, bytes_, default_alignment);
      count_free(Kind, bytes_);
    }
    ptr_ = nullptr;
  }
  Backend backend_{};
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// A tensor's bytes carved from a host_arena, counted as host memory. The arena lives as long as
/// its last slice; a slice released while others live gives its whole pages back.
class arena_slice {
 public:
  arena_slice(std::shared_ptr<host_arena> arena, std::size_t bytes)
      : arena_(std::move(arena)), bytes_(bytes) {
    ptr_ = arena_->take(bytes_, default_alignment);
    count_alloc(storage_kind::host, bytes_);
  }
  arena_slice(const arena_slice&) = delete;
  arena_slice& operator=(const arena_slice&) = delete;
  arena_slice(arena_slice&& o) noexcept
      : arena_(std::move(o.arena_)),
        ptr_(std::exchange(o.ptr_, nullptr)),
        bytes_(std::exchange(o.bytes_, 0)) {}
  arena_slice& operator=(arena_slice&& o) noexcept {
    if (this != &o) {
      release();
      arena_ = std::move(o.arena_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~arena_slice() { release(); }

  void* data() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return bytes_; }

 private:
  void release() noexcept {
    if (ptr_) {
      // The last slice unmaps the whole arena instead (use_count is only a hint here: a stale
      // value costs one redundant madvise or a delayed return, never a wrong free).
      if (arena_.use_count() > 1) arena_->give_back(ptr_, bytes_);
      count_free(storage_kind::host, bytes_);
    }
    ptr_ = nullptr;
    arena_.reset();
  }
  std::shared_ptr<host_arena> arena_;
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// A counted file_region.
class counted_region {
 public:
  explicit counted_region(file_region r) : region_(std::move(r)) {
    count_alloc(storage_kind::file, region_.size());
  }
  counted_region(const counted_region&) = delete;
  counted_region& operator=(const counted_region&) = delete;
  counted_region(counted_region&& o) noexcept
      : region_(std::move(o.region_)), live_(std::exchange(o.live_, false)) {}
  counted_region& operator=(counted_region&& o) noexcept {
    if (this != &o) {
      release();
      region_ = std::move(o.region_);
      live_ = std::exchange(o.live_, false);
    }
    return *this;
  }
  ~counted_region() { release(); }
  const file_region& region() const noexcept { return region_; }

 private:
  void release() noexcept {
    if (live_) count_free(storage_kind::file, region_.size());
    live_ = false;
  }
  file_region region_;
  bool live_ = true;
};

}  // namespace detail

/// Allocations (or mappings) currently alive for a backend, across all tensor_storage handles.
inline std::int64_t live_allocations(storage_kind k) noexcept {
  return detail::live().count[static_cast<std::size_t>(k)].load(std::memory_order_relaxed);
}
/// Bytes currently held by a backend, across all tensor_storage handles.
inline std::int64_t live_bytes(storage_kind k) noexcept {
  return detail::live().bytes[static_cast<std::size_t>(k)].load(std::memory_order_relaxed);
}

/// One tensor's bytes in one backend, with its descriptor and placement.
class tensor_storage {
 public:
  using host_block = detail::owned_block<host, storage_kind::host>;
  using pinned_block = detail::owned_block<pinned_host, storage_kind::pinned_host>;
#if defined(STOWAGE_WITH_CUDA)
  using device_block = detail::owned_block<device, storage_kind::device>;
  using block = std::variant<std::monostate, host_block, detail::arena_slice, pinned_block,
                             device_block, detail::counted_region>;
#else
  using block = std::variant<std::monostate, host_block, detail::arena_slice, pinned_block,
                             detail::counted_region>;
#endif

  tensor_storage() = default;
  tensor_storage(const tensor_storage&) = delete;
  tensor_storage& operator=(const tensor_storage&) = delete;
  tensor_storage(tensor_storage&& o) noexcept
      : desc_(std::move(o.desc_)),
        placement_(o.placement_),
        block_(std::exchange(o.block_, block{})) {}
  tensor_storage& operator=(tensor_storage&& o) noexcept {
    if (this != &o) {
      desc_ = std::move(o.desc_);
      placement_ = o.placement_;
      block_ = std::exchange(o.block_, block{});
    }
    return *this;
  }

  /// Pageable host memory for `desc` (placement "cpu").
  static tensor_storage allocate_host(tensor_desc desc) {
    const std::size_t n = byte_count(desc);
    return tensor_storage(std::move(desc), stowage::device::cpu(),
                          block(std::in_place_type<host_block>, host{}, n));
  }
  /// Pageable host memory for `desc` carved from `arena` (placement "cpu"); the arena must have
  /// room for it (host_arena::take's alignment and size).
  static tensor_storage allocate_host(tensor_desc desc, std::shared_ptr<host_arena> arena) {
    const std::size_t n = byte_count(desc);
    return tensor_storage(std::move(desc), stowage::device::cpu(),
                          block(std::in_place_type<detail::arena_slice>, std::move(arena), n));
  }
  /// Pinned host memory for `desc` (placement "cpu").
  static tensor_storage allocate_pinned(tensor_desc desc) {
    const std::size_t n = byte_count(desc);
    return tensor_storage(std::move(desc), stowage::device::cpu(),
                          block(std::in_place_type<pinned_block>, pinned_host{}, n));
  }
#if defined(STOWAGE_WITH_CUDA)
  /// Memory of GPU `ordinal` for `desc`.
  static tensor_storage allocate_device(tensor_desc desc, int ordinal) {
    const std::size_t n = byte_count(desc);
    return tensor_storage(std::move(desc), stowage::device::gpu(ordinal),
                          block(std::in_place_type<device_block>, device{ordinal}, n));
  }
#endif
  /// Bytes served from a file range (placement "disk"); the region must hold exactly the
  /// tensor's bytes (a 0-dim tensor: one element).
  static tensor_storage from_file(tensor_desc desc, file_region region) {
    if (region.size() != byte_count(desc))
      throw io_error(region.path().string(),
                     "tensor `" + desc.name + "` needs " + std::to_string(byte_count(desc)) +
                         " bytes, the file range holds " + std::to_string(region.size()));
    return tensor_storage(std::move(desc), stowage::device::disk(),
                          block(std::in_place_type<detail::counted_region>, std::move(region)));
  }

  bool empty() const noexcept { return std::holds_alternative<std::monostate>(block_); }
  const tensor_desc& desc() const noexcept { return desc_; }
  /// Where the device map put the tensor ("cpu", a GPU index, "disk").
  stowage::device placement() const noexcept { return placement_; }
  storage_kind kind() const noexcept {
    return std::visit(
        [](const auto& b) {
          using B = std::remove_cvref_t<decltype(b)>;
          if constexpr (std::is_same_v<B, host_block> || std::is_same_v<B, detail::arena_slice>)
            return storage_kind::host;
          else if constexpr (std::is_same_v<B, pinned_block>)
            return storage_kind::pinned_host;
#if defined(STOWAGE_WITH_CUDA)
          else if constexpr (std::is_same_v<B, device_block>)
            return storage_kind::device;
#endif
          else
            return storage_kind::file;  // and the empty handle, as before
        },
        block_);
  }
  /// The CPU can read the bytes directly (everything but GPU memory).
  bool host_accessible() const noexcept { return !empty() && kind() != storage_kind::device; }
  std::size_t size() const noexcept { return byte_count(desc_); }

  /// The raw address (a device pointer for GPU storage; never dereference it on the host).
  const void* data() const noexcept {
    return std::visit(
        [](const auto& b) -> const void* {
          using B = std::remove_cvref_t<decltype(b)>;
          if constexpr (std::is_same_v<B, std::monostate>)
            return nullptr;
          else if constexpr (std::is_same_v<B, detail::counted_region>)
            return b.region().data();
          else
            return b.data();
        },
        block_);
  }
  /// Writable address: memory backends only (a file region is read-only).
  void* mutable_data() const {
    if (kind() == storage_kind::file || empty())
      throw error("tensor_storage: `" + desc_.name + "` is served read-only from a file");
    return const_cast<void*>(data());
  }
  /// The bytes as a host span; error for GPU storage (copy it with deep_copy instead).
  std::span<const std::byte> bytes() const {
    if (!host_accessible())
      throw error("tensor_storage: `" + desc_.name + "` lives in " +
                  std::string(to_string(kind())) +
                  " memory, which the CPU cannot read; copy it to host memory first");
    return {static_cast<const std::byte*>(data()), size()};
  }
  std::span<std::byte> mutable_bytes() const {
    if (!host_accessible()) (void)bytes();
    return {static_cast<std::byte*>(mutable_data()), size()};
  }
  /// The file region behind disk storage (nullptr otherwise).
  const file_region* region() const noexcept {
    const auto* r = std::get_if<detail::counted_region>(&block_);
    return r ? &r->region() : nullptr;
  }
  /// The GPU ordinal of device storage (-1 otherwise).
  int device_ordinal() const noexcept { return placement_.is_gpu() ? placement_.index() : -1; }

  /// Bytes a descriptor needs in storage (a 0-dim tensor holds one element).
  static std::size_t byte_count(const tensor_desc& d) {
    return static_cast<std::size_t>(d.nbytes());
  }

 private:
  tensor_storage(tensor_desc d, stowage::device p, block b)
      : desc_(std::move(d)), placement_(p), block_(std::move(b)) {}

  tensor_desc desc_;
  stowage::device placement_ = stowage::device::cpu();
  block block_;
};

}  // namespace stowage::storage
