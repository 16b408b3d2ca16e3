// stowage/core/tensor_desc.hpp: shapes and tensor descriptors (name, shape, dtype, no bytes).
// A shape holds its dimensions inline, so describing a 405B-parameter model allocates nothing
// per tensor.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>

namespace stowage {

/// A tensor shape of rank at most 8 (enough for every checkpoint stowage reads), stored inline.
class shape {
 public:
  static constexpr std::size_t max_rank = 8;

  constexpr shape() noexcept = default;
  constexpr shape(std::initializer_list<std::int64_t> dims) {
    if (dims.size() > max_rank) throw model_error("shape: rank above 8 is not supported");
    for (auto d : dims) {
      if (d < 0) throw model_error("shape: negative dimension " + std::to_string(d));
      dims_[rank_++] = d;
    }
  }
  constexpr explicit shape(std::span<const std::int64_t> dims) {
    if (dims.size() > max_rank) throw model_error("shape: rank above 8 is not supported");
    for (auto d : dims) {
      if (d < 0) throw model_error("shape: negative dimension " + std::to_string(d));
      dims_[rank_++] = d;
    }
  }

  constexpr std::size_t rank() const noexcept { return rank_; }
  constexpr std::int64_t operator[](std::size_t i) const noexcept { return dims_[i]; }
  constexpr std::span<const std::int64_t> dims() const noexcept { return {dims_.data(), rank_}; }
  constexpr const std::int64_t* begin() const noexcept { return dims_.data(); }
  constexpr const std::int64_t* end() const noexcept { return dims_.data() + rank_; }

  /// Number of elements (1 for a scalar, 0 if any dimension is 0). Throws on overflow.
  constexpr std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::size_t i = 0; i < rank_; ++i) {
      if (dims_[i] != 0 && n > std::numeric_limits<std::int64_t>::max() / dims_[i])
        throw model_error("shape " + to_string() + ": element count overflows 64 bits");
      n *= dims_[i];
    }
    return n;
  }

  friend constexpr bool operator==(const shape& a, const shape& b) noexcept {
    return a.rank_ == b.rank_ && std::equal(a.begin(), a.end(), b.begin());
  }

  /// "[4, 3]", as torch.Size prints its list.
  std::string to_string() const {
    std::string s = "[";
    for (std::size_t i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims_[i]);
    }
    return s + "]";
  }

 private:
  std::array<std::int64_t, max_rank> dims_{};
  std::size_t rank_ = 0;
};

/// Bytes a tensor occupies in memory: numel * bits / 8, rounded up to whole bytes.
constexpr std::uint64_t storage_bytes(const shape& s, dtype d) {
  const auto n = static_cast<std::uint64_t>(s.numel());
  return (n * bits(d) + 7) / 8;
}

/// The size accelerate's compute_module_sizes gives a tensor of this shape and dtype
/// (bool counts 1/8 byte per element).
constexpr byte_size accelerate_size(const shape& s, dtype d) {
  const std::int64_t e = accelerate_size_eighths(d);
  // Python: numel * dtype_byte_size(dtype): a float when the byte size is fractional.
  return byte_size::from_eighths(s.numel() * e, e % 8 != 0);
}

/// A tensor described without its bytes: what a meta parameter is.
struct tensor_desc {
  std::string name;  ///< dotted name from the model root ("model.layers.0.mlp.up_proj.weight")
  stowage::shape shape;
  stowage::dtype dtype = dtype::float32;

  std::int64_t numel() const { return shape.numel(); }
  std::uint64_t nbytes() const { return storage_bytes(shape, dtype); }
  friend bool operator==(const tensor_desc&, const tensor_desc&) = default;
};

}  // namespace stowage
