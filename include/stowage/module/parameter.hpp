// stowage/module/parameter.hpp: parameters and buffers as module containers hold them. A
// `parameter` is a meta descriptor: shape and dtype, no bytes, no name (the name comes from
// reflection when the model is walked), so describing a 405B model allocates nothing per
// tensor. Reading data needs a `bound_parameter`, a view that pairs a descriptor with storage
// of exactly the right size; a meta parameter has no data accessor, and asking it for one is a
// compile error that says what to do instead.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

namespace stowage {

namespace detail {
template <class...>
inline constexpr bool dependent_false_v = false;
}  // namespace detail

/// A parameter as declared by a module: shape + dtype, always meta (no storage).
class parameter {
 public:
  constexpr parameter() noexcept = default;
  constexpr parameter(stowage::shape s, stowage::dtype d) noexcept : shape_(s), dtype_(d) {}

  constexpr const stowage::shape& shape() const noexcept { return shape_; }
  constexpr stowage::dtype dtype() const noexcept { return dtype_; }
  constexpr std::int64_t numel() const { return shape_.numel(); }
  /// Bytes the tensor occupies once stored (numel * bits / 8, rounded up).
  constexpr std::uint64_t nbytes() const { return storage_bytes(shape_, dtype_); }
  /// Always true: a parameter never owns bytes. Bound data lives in a bound_parameter.
  static constexpr bool is_meta() noexcept { return true; }

  /// Not available: a meta parameter has no bytes. Bind it to storage (bind(param, bytes))
  /// and read the data through the resulting bound_parameter.
  template <class T = void>
  const T* data() const {
    static_assert(detail::dependent_false_v<T>,
                  "stowage::parameter::data(): a parameter is a meta descriptor (shape + dtype, "
                  "no bytes); bind it to storage with stowage::bind(param, bytes) and read the "
                  "bound_parameter's data");
    return nullptr;
  }

  friend constexpr bool operator==(const parameter&, const parameter&) noexcept = default;

 private:
  stowage::shape shape_;
  stowage::dtype dtype_ = stowage::dtype::float32;
};

/// A buffer: a tensor a module owns that is not trained (running statistics, rotary
/// frequencies). Persistent buffers are part of the state dict (the checkpoint); non-persistent
/// ones are computed at construction but still occupy memory (accelerate counts them in sizes).
class buffer : public parameter {
 public:
  constexpr buffer() noexcept = default;
  constexpr buffer(stowage::shape s, stowage::dtype d, bool persistent) noexcept
      : parameter(s, d), persistent_(persistent) {}
  constexpr bool persistent() const noexcept { return persistent_; }
  friend constexpr bool operator==(const buffer&, const buffer&) noexcept = default;

 private:
  bool persistent_ = true;
};

/// A parameter bound to storage: the descriptor plus a span of exactly nbytes() bytes.
/// It does not own the bytes (the storage backend does).
template <class Byte = const std::byte>
  requires std::is_same_v<std::remove_const_t<Byte>, std::byte>
class bound_parameter {
 public:
  const parameter& desc() const noexcept { return *desc_; }
  const stowage::shape& shape() const noexcept { return desc_->shape(); }
  stowage::dtype dtype() const noexcept { return desc_->dtype(); }
  static constexpr bool is_meta() noexcept { return false; }
  std::span<Byte> bytes() const noexcept { return bytes_; }

  /// Typed access; T must have the element size of the parameter's dtype (a float for
  /// float32, a 2-byte type for bfloat16/float16), else invalid_dtype.
  template <class T>
  std::span<std::conditional_t<std::is_const_v<Byte>, const T, T>> data() const {
    if (sizeof(T) != element_size(dtype()) || bits(dtype()) % 8 != 0)
      throw invalid_dtype("bound_parameter::data<T>(): element of " + std::to_string(sizeof(T)) +
                          " bytes does not match dtype " + std::string(name(dtype())));
    using elem = std::conditional_t<std::is_const_v<Byte>, const T, T>;
    return {reinterpret_cast<elem*>(bytes_.data()), bytes_.size() / sizeof(T)};
  }

 private:
  template <class B>
    requires std::is_same_v<std::remove_const_t<B>, std::byte>
  friend bound_parameter<B> bind(const parameter& p, std::span<B> bytes);
  bound_parameter(const parameter& p, std::span<Byte> b) noexcept : desc_(&p), bytes_(b) {}

  const parameter* desc_;
  std::span<Byte> bytes_;
};

/// Binds a meta parameter to storage. Throws model_error when the storage size differs from
/// the parameter's nbytes(); `what` names the tensor in that message.
template <class B>
  requires std::is_same_v<std::remove_const_t<B>, std::byte> bound_parameter<B> bind(
      const parameter& p, std::span<B> bytes) {
    if (bytes.size() != p.nbytes())
      throw model_error("bind: parameter of shape " + p.shape().to_string() + " and dtype " +
                        std::string(name(p.dtype())) + " needs " + std::to_string(p.nbytes()) +
                        " bytes, storage has " + std::to_string(bytes.size()));
    return bound_parameter<B>(p, bytes);
  }

}  // namespace stowage
