// stowage/checkpoint/safetensors_writer.hpp: writes safetensors files byte-identical to Python
// safetensors' save_file (formats-spec §5.3): tensors sorted by dtype (descending in the
// format's enum order) then by name, offsets contiguous, compact serde_json header with
// `__metadata__` first and fields dtype/shape/data_offsets, padded with spaces to 8 bytes.
// Files are written atomically: a temporary name in the same folder, then rename.
#pragma once

#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace stowage::checkpoint {

/// A tensor to write: name, dtype, shape and its C-contiguous little-endian bytes.
struct tensor_ref {
  std::string name;
  stowage::dtype dtype = dtype::float32;
  stowage::shape shape;
  std::span<const std::byte> data;
};

using metadata_list = std::vector<std::pair<std::string, std::string>>;

namespace detail {

/// serde_json's string escaping: `"` `\` and control characters; everything else raw UTF-8.
inline void serde_escape(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

/// Writes `chunks` to `path` through a temporary file in the same folder, then renames it into
/// place, so readers never see a half-written file.
inline void write_file_atomically(const std::filesystem::path& path,
                                  std::span<const std::span<const std::byte>> chunks) {
  const std::filesystem::path tmp =
      path.parent_path() / (path.filename().string() + ".tmp." + std::to_string(::getpid()));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw io_error(tmp.string(), std::string("cannot create: ") + std::strerror(errno));
  auto fail = [&](const char* what) {
    const int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    throw io_error(tmp.string(), std::string(what) + std::strerror(e));
  };
  for (auto c : chunks) {
    const std::byte* p = c.data();
    std::size_t left = c.size();
    while (left > 0) {
      const ::ssize_t w = ::write(fd, p, left);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write: ");
      }
      p += w;
      left -= static_cast<std::size_t>(w);
    }
  }
  if (::fsync(fd) != 0) fail("cannot fsync: ");
  if (::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw io_error(tmp.string(), std::string("cannot close: ") + std::strerror(e));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw io_error(path.string(), std::string("cannot rename into place: ") + std::strerror(e));
  }
}

}  // namespace detail

/// The order save_file writes tensors in: dtype descending (enum order), then name ascending.
inline std::vector<const tensor_ref*> safetensors_order(std::span<const tensor_ref> tensors) {
  std::vector<const tensor_ref*> order;
  order.reserve(tensors.size());
  for (const auto& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const tensor_ref* a, const tensor_ref* b) {
    if (a->dtype != b->dtype) return static_cast<int>(a->dtype) > static_cast<int>(b->dtype);
    return a->name < b->name;
  });
  return order;
}

/// The 8-byte length plus the padded header for `tensors` (validated: dtype has a
/// safetensors code, byte size matches the shape, names unique, no `__metadata__` tensor).
inline std::string safetensors_header(std::span<const tensor_ref> tensors,
                                      const metadata_list& metadata,
                                      const std::string& path = "<safetensors>") {
  std::unordered_set<std::string_view> seen;
  for (const auto& t : tensors) {
    if (safetensors_name(t.dtype).empty())
      throw checkpoint_error(path, t.name, std::nullopt,
                             "dtype " + std::string(name(t.dtype)) + " has no safetensors code");
    if (t.name == "__metadata__")
      throw checkpoint_error(path, t.name, std::nullopt, "a tensor cannot be named __metadata__");
    if (!seen.insert(t.name).second)
      throw checkpoint_error(path, t.name, std::nullopt, "duplicate tensor name");
    const std::uint64_t nbits = static_cast<std::uint64_t>(t.shape.numel()) * bits(t.dtype);
    if (nbits % 8 != 0 || nbits / 8 != t.data.size())
      throw checkpoint_error(path, t.name, std::nullopt,
                             "data holds " + std::to_string(t.data.size()) + " bytes, shape " +
                                 t.shape.to_string() + " of " + std::string(name(t.dtype)) +
                                 " needs " + std::to_string(nbits) + " bits");
  }
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    for (std::size_t i = 0; i < metadata.size(); ++i) {
      if (i) h += ',';
      detail::serde_escape(h, metadata[i].first);
      h += ':';
      detail::serde_escape(h, metadata[i].second);
    }
    h += '}';
    first = false;
  }
  std::uint64_t offset = 0;
  for (const tensor_ref* t : safetensors_order(tensors)) {
    if (!first) h += ',';
    first = false;
    detail::serde_escape(h, t->name);
    h += ":{\"dtype\":\"";
    h += safetensors_name(t->dtype);
    h += "\",\"shape\":[";
    for (std::size_t i = 0; i < t->shape.rank(); ++i) {
      if (i) h += ',';
      h += std::to_string(t->shape[i]);
    }
    h += "],\"data_offsets\":[" + std::to_string(offset) + ",";
    offset += t->data.size();
    h += std::to_string(offset) + "]}";
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  if (h.size() > safetensors_max_header)
    throw checkpoint_error(path, "", std::nullopt, "header would exceed 100000000 bytes");
  std::string out(8, '\0');
  std::uint64_t n = h.size();
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h;
}

/// Writes a safetensors file exactly as save_file(tensors, path, metadata) would.
inline void write_safetensors(const std::filesystem::path& path,
                              std::span<const tensor_ref> tensors,
                              const metadata_list& metadata = {}) {
  const std::string header = safetensors_header(tensors, metadata, path.string());
  std::vector<std::span<const std::byte>> chunks;
  chunks.emplace_back(reinterpret_cast<const std::byte*>(header.data()), header.size());
  for (const tensor_ref* t : safetensors_order(tensors)) chunks.push_back(t->data);
  detail::write_file_atomically(path, chunks);
}

/// The whole file in memory (for tests and small outputs).
inline std::vector<std::byte> serialize_safetensors(std::span<const tensor_ref> tensors,
                                                    const metadata_list& metadata = {}) {
  const std::string header = safetensors_header(tensors, metadata);
  std::vector<std::byte> out(reinterpret_cast<const std::byte*>(header.data()),
                             reinterpret_cast<const std::byte*>(header.data()) + header.size());
  for (const tensor_ref* t : safetensors_order(tensors))
    out.insert(out.end(), t->data.begin(), t->data.end());
  return out;
}

}  // namespace stowage::checkpoint
