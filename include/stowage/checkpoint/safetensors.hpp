// stowage/checkpoint/safetensors.hpp: the safetensors reader. Every validation the reference
// implementation (safetensors' Rust crate, formats-spec §5.4) performs, in its order, plus an
// explicit rejection of duplicate tensor names (the reference keeps the last one silently).
// Each failure is a checkpoint_error naming the file, the tensor and the byte offset. Tensors are
// zero-copy views into the memory-mapped file.
#pragma once

#include <stowage/checkpoint/json_strict.hpp>
#include <stowage/checkpoint/mapped_file.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace stowage::checkpoint {

/// The reference's cap on the JSON header length (decimal 100,000,000 bytes).
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

/// One tensor as the header describes it. Offsets are relative to the data buffer.
struct safetensors_entry {
  std::string name;
  stowage::dtype dtype = dtype::float32;
  stowage::shape shape;
  std::uint64_t begin = 0;  ///< data_offsets[0]
  std::uint64_t end = 0;    ///< data_offsets[1]
};

/// A validated header: tensors in data order, metadata in file order.
struct safetensors_layout {
  std::uint64_t header_size = 0;  ///< N (includes the padding)
  std::uint64_t data_start = 0;   ///< 8 + N
  std::vector<safetensors_entry> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
  bool has_metadata = false;  ///< `__metadata__` present (possibly empty)
};

namespace detail {

inline std::optional<dtype> safetensors_dtype(std::string_view s) noexcept {
  for (const auto& e : stowage::detail::dtype_table)
    if (!e.safetensors_name.empty() && e.safetensors_name == s) return e.value;
  return std::nullopt;
}

[[noreturn]] inline void st_fail(const std::string& file, const std::string& tensor,
                                 std::optional<std::uint64_t> offset, const std::string& what) {
  throw checkpoint_error(file, tensor, offset, what);
}

}  // namespace detail

/// Validates a whole safetensors file held in `file` (the bytes of the file) and returns its
/// layout. `path` only names the file in errors. Never reads outside `file`.
inline safetensors_layout parse_safetensors(std::span<const std::byte> file,
                                            const std::string& path) {
  using detail::st_fail;
  // 1. At least the 8-byte length.
  if (file.size() < 8) st_fail(path, "", 0, "header too small (file shorter than 8 bytes)");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<std::uint8_t>(file[static_cast<std::size_t>(i)]);
  // 2. The header length cap.
  if (n > safetensors_max_header)
    st_fail(path, "", 0,
            "header too large (" + std::to_string(n) + " bytes; the limit is 100000000)");
  // 3. The header must lie inside the file.
  if (8 + n > file.size())
    st_fail(path, "", 0,
            "invalid header length: " + std::to_string(n) +
                " bytes of header, but the file has only " + std::to_string(file.size() - 8) +
                " bytes after the length");
  const std::string_view text(reinterpret_cast<const char*>(file.data()) + 8,
                              static_cast<std::size_t>(n));
  // 4. UTF-8.
  if (auto bad = stowage::detail::find_invalid_utf8(text))
    st_fail(path, "", 8 + *bad, "invalid UTF-8 in header");
  // 5. JSON and its schema (+ duplicate names, which the reference lets through).
  nlohmann::ordered_json j;
  const auto r = stowage::detail::parse_json_strict(text, j);
  if (!r.ok) {
    if (r.duplicate_key && *r.duplicate_key != "__metadata__")
      st_fail(path, *r.duplicate_key, 8, "duplicate tensor name in header");
    if (r.duplicate_key)
      st_fail(path, "", 8, "invalid JSON in header: duplicate field `__metadata__`");
    st_fail(path, "", 8, "invalid JSON in header: " + r.error);
  }
  if (!j.is_object()) st_fail(path, "", 8, "invalid JSON in header: expected an object");
  safetensors_layout out;
  out.header_size = n;
  out.data_start = 8 + n;
  auto as_u64 = [&](const nlohmann::ordered_json& v, const std::string& tensor,
                    const char* field) -> std::uint64_t {
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0))
      st_fail(
          path, tensor, 8,
          std::string("invalid JSON in header: `") + field + "` must hold non-negative integers");
    return v.get<std::uint64_t>();
  };
  out.tensors.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object())
        st_fail(path, "", 8, "invalid JSON in header: `__metadata__` must be an object of strings");
      out.has_metadata = true;
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          st_fail(path, "", 8,
                  "invalid JSON in header: `__metadata__` value of \"" + m.key() +
                      "\" is not a string");
        out.metadata.emplace_back(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    if (!v.is_object())
      st_fail(path, key, 8, "invalid JSON in header: tensor info must be an object");
    const auto dt = v.find("dtype");
    const auto sh = v.find("shape");
    const auto off = v.find("data_offsets");
    if (dt == v.end()) st_fail(path, key, 8, "invalid JSON in header: missing field `dtype`");
    if (sh == v.end()) st_fail(path, key, 8, "invalid JSON in header: missing field `shape`");
    if (off == v.end())
      st_fail(path, key, 8, "invalid JSON in header: missing field `data_offsets`");
    if (!dt->is_string()) st_fail(path, key, 8, "invalid JSON in header: `dtype` must be a string");
    const auto d = detail::safetensors_dtype(dt->get_ref<const std::string&>());
    if (!d)
      st_fail(path, key, 8,
              "invalid JSON in header: unknown dtype \"" + dt->get<std::string>() + "\"");
    if (!sh->is_array()) st_fail(path, key, 8, "invalid JSON in header: `shape` must be an array");
    if (!off->is_array() || off->size() != 2)
      st_fail(path, key, 8,
              "invalid JSON in header: `data_offsets` must be an array of 2 integers");
    std::vector<std::uint64_t> dims;
    dims.reserve(sh->size());
    for (const auto& x : *sh) dims.push_back(as_u64(x, key, "shape"));
    safetensors_entry e;
    e.name = key;
    e.dtype = *d;
    e.begin = as_u64((*off)[0], key, "data_offsets");
    e.end = as_u64((*off)[1], key, "data_offsets");
    if (dims.size() > stowage::shape::max_rank)
      st_fail(
          path, key, 8,
          "rank " + std::to_string(dims.size()) + " is above the 8 dimensions stowage supports");
    std::vector<std::int64_t> sdims;
    bool huge = false;
    for (auto x : dims) {
      if (x > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) huge = true;
      sdims.push_back(static_cast<std::int64_t>(std::min<std::uint64_t>(
          x, static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))));
    }
    if (huge)
      st_fail(path, key, 8, "overflow computing buffer size from shape and/or element type");
    e.shape = stowage::shape(std::span<const std::int64_t>(sdims));
    out.tensors.push_back(std::move(e));
  }
  // 6. Offsets: sorted by (begin, end), contiguous from 0, then each tensor's size.
  std::stable_sort(out.tensors.begin(), out.tensors.end(), [](const auto& a, const auto& b) {
    return std::pair(a.begin, a.end) < std::pair(b.begin, b.end);
  });
  std::uint64_t start = 0;
  for (const auto& e : out.tensors) {
    const std::uint64_t abs = out.data_start + e.begin;  // may wrap only for absurd values
    const std::optional<std::uint64_t> where =
        abs >= out.data_start ? std::optional<std::uint64_t>(abs) : std::nullopt;
    if (e.begin != start || e.end < e.begin)
      st_fail(path, e.name, where,
              "invalid offset for tensor: data_offsets [" + std::to_string(e.begin) + ", " +
                  std::to_string(e.end) + "] must start at " + std::to_string(start) +
                  " (tensors must be contiguous, non-overlapping, starting at 0)");
    start = e.end;
    std::uint64_t numel = 1;
    for (auto x : e.shape) {
      const auto ux = static_cast<std::uint64_t>(x);
      if (ux != 0 && numel > std::numeric_limits<std::uint64_t>::max() / ux)
        st_fail(path, e.name, where,
                "overflow computing buffer size from shape and/or element type");
      numel *= ux;
    }
    const std::uint64_t b = bits(e.dtype);
    if (numel > std::numeric_limits<std::uint64_t>::max() / b)
      st_fail(path, e.name, where, "overflow computing buffer size from shape and/or element type");
    const std::uint64_t nbits = numel * b;
    if (nbits % 8 != 0)
      st_fail(path, e.name, where,
              "misaligned slice: " + std::to_string(numel) + " elements of " +
                  std::string(safetensors_name(e.dtype)) + " do not end on a byte boundary");
    if (e.end - e.begin != nbits / 8)
      st_fail(path, e.name, where,
              "invalid shape, data type, or offset for tensor: " + std::to_string(e.end - e.begin) +
                  " bytes in data_offsets, but shape " + e.shape.to_string() + " of " +
                  std::string(safetensors_name(e.dtype)) + " needs " + std::to_string(nbits / 8));
  }
  // 7. The data must cover the rest of the file exactly.
  if (start > std::numeric_limits<std::uint64_t>::max() - out.data_start ||
      out.data_start + start != file.size())
    st_fail(path, "", out.data_start,
            "incomplete metadata, file not fully covered: the header describes " +
                std::to_string(start) + " data bytes, the file has " +
                std::to_string(file.size() - out.data_start));
  return out;
}

/// A validated, memory-mapped safetensors file.
class safetensors_file {
 public:
  /// Maps and validates `path`. Throws io_error (cannot open/map) or checkpoint_error.
  static safetensors_file open(const std::filesystem::path& path) {
    return safetensors_file(map_file(path));
  }

  explicit safetensors_file(mapped_file_ptr file) : file_(std::move(file)) {
    layout_ = parse_safetensors(file_->bytes(), file_->path().string());
    index_.reserve(layout_.tensors.size());
    for (std::size_t i = 0; i < layout_.tensors.size(); ++i)
      index_.emplace(layout_.tensors[i].name, i);
  }

  const std::filesystem::path& path() const noexcept { return file_->path(); }
  const mapped_file_ptr& file() const noexcept { return file_; }
  const safetensors_layout& layout() const noexcept { return layout_; }
  /// Tensors in data order.
  const std::vector<safetensors_entry>& tensors() const noexcept { return layout_.tensors; }
  const std::vector<std::pair<std::string, std::string>>& metadata() const noexcept {
    return layout_.metadata;
  }
  std::optional<std::string> metadata_value(std::string_view key) const {
    for (const auto& [k, v] : layout_.metadata)
      if (k == key) return v;
    return std::nullopt;
  }
  bool contains(std::string_view name) const { return index_.count(std::string(name)) != 0; }
  const safetensors_entry* find(std::string_view name) const {
    auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &layout_.tensors[it->second];
  }

  /// A zero-copy view of one tensor; checkpoint_error if the file has no such tensor.
  tensor_view view(std::string_view name) const {
    const safetensors_entry* e = find(name);
    if (!e)
      throw checkpoint_error(path().string(), std::string(name), std::nullopt,
                             "no such tensor in the file");
    return view(*e);
  }
  tensor_view view(const safetensors_entry& e) const {
    tensor_view v;
    v.desc = tensor_desc{e.name, e.shape, e.dtype};
    v.file_offset = layout_.data_start + e.begin;
    v.bytes = file_->bytes().subspan(static_cast<std::size_t>(v.file_offset),
                                     static_cast<std::size_t>(e.end - e.begin));
    v.file = file_;
    return v;
  }

 private:
  mapped_file_ptr file_;
  safetensors_layout layout_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace stowage::checkpoint
