// stowage/checkpoint/zip_archive.hpp: a read-only view of a zip archive held in memory (the
// container of torch.save files). Reads the central directory (ZIP64 aware: torch always writes
// the ZIP64 records) and never trusts local headers for sizes (torch writes them as zero with
// data descriptors). Only STORED entries can be read; every offset is bounds-checked.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace stowage::checkpoint {

/// One member of a zip archive, as the central directory describes it.
struct zip_entry {
  std::string name;
  std::uint16_t method = 0;  ///< 0 = STORED
  std::uint16_t flags = 0;
  std::uint64_t compressed_size = 0;
  std::uint64_t size = 0;
  std::uint64_t local_header_offset = 0;
};

namespace detail {

class byte_reader {
 public:
  byte_reader(std::span<const std::byte> b, std::string file) : b_(b), file_(std::move(file)) {}
  bool has(std::uint64_t off, std::uint64_t n) const noexcept {
    return off <= b_.size() && n <= b_.size() - off;
  }
  std::uint64_t le(std::uint64_t off, int n, const char* what) const {
    if (!has(off, static_cast<std::uint64_t>(n)))
      throw checkpoint_error(file_, "", off,
                             std::string("zip: ") + what + " lies outside the file");
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i)
      v = (v << 8) | static_cast<std::uint8_t>(
                         b_[static_cast<std::size_t>(off) + static_cast<std::size_t>(i)]);
    return v;
  }
  std::uint16_t u16(std::uint64_t off, const char* what) const {
    return static_cast<std::uint16_t>(le(off, 2, what));
  }
  std::uint32_t u32(std::uint64_t off, const char* what) const {
    return static_cast<std::uint32_t>(le(off, 4, what));
  }
  std::uint64_t u64(std::uint64_t off, const char* what) const { return le(off, 8, what); }
  std::span<const std::byte> bytes() const noexcept { return b_; }
  const std::string& file() const noexcept { return file_; }

 private:
  std::span<const std::byte> b_;
  std::string file_;
};

}  // namespace detail

/// The central directory of an in-memory zip archive.
class zip_archive {
 public:
  zip_archive() = default;

  /// Parses the archive in `bytes`; `file` names it in errors.
  zip_archive(std::span<const std::byte> bytes, std::string file)
      : bytes_(bytes), file_(std::move(file)) {
    detail::byte_reader r(bytes_, file_);
    const std::uint64_t size = bytes_.size();
    if (size < 22)
      fail("", 0, "no end-of-central-directory record (file too short): not a complete zip");
    // The end-of-central-directory record: scan back over a possible comment (<= 65535 bytes).
    std::optional<std::uint64_t> eocd;
    const std::uint64_t lowest = size >= 22 + 65535 ? size - 22 - 65535 : 0;
    for (std::uint64_t p = size - 22 + 1; p-- > lowest;) {
      if (r.u32(p, "end of central directory") == 0x06054b50U &&
          p + 22 + r.u16(p + 20, "comment length") <= size) {
        eocd = p;
        break;
      }
    }
    if (!eocd)
      fail("", std::nullopt, "cannot find the zip central directory (truncated or not a zip file)");
    std::uint64_t count = r.u16(*eocd + 10, "entry count");
    std::uint64_t cd_size = r.u32(*eocd + 12, "central directory size");
    std::uint64_t cd_off = r.u32(*eocd + 16, "central directory offset");
    // ZIP64: a locator right before the EOCD points at the ZIP64 EOCD record.
    if (*eocd >= 20 && r.u32(*eocd - 20, "zip64 locator") == 0x07064b50U) {
      const std::uint64_t z = r.u64(*eocd - 20 + 8, "zip64 end of central directory offset");
      if (r.u32(z, "zip64 end of central directory") != 0x06064b50U)
        fail("", z, "bad ZIP64 end-of-central-directory signature");
      count = r.u64(z + 32, "zip64 entry count");
      cd_size = r.u64(z + 40, "zip64 central directory size");
      cd_off = r.u64(z + 48, "zip64 central directory offset");
    }
    if (!r.has(cd_off, cd_size)) fail("", cd_off, "the central directory lies outside the file");
    if (count > cd_size / 46)
      fail("", cd_off, "the central directory is too small for its entry count");
    entries_.reserve(static_cast<std::size_t>(count));
    std::uint64_t p = cd_off;
    for (std::uint64_t i = 0; i < count; ++i) {
      if (p + 46 > cd_off + cd_size || r.u32(p, "central directory entry") != 0x02014b50U)
        fail("", p, "bad central directory entry " + std::to_string(i));
      zip_entry e;
      e.flags = r.u16(p + 8, "flags");
      e.method = r.u16(p + 10, "method");
      e.compressed_size = r.u32(p + 20, "compressed size");
      e.size = r.u32(p + 24, "size");
      const std::uint16_t name_len = r.u16(p + 28, "name length");
      const std::uint16_t extra_len = r.u16(p + 30, "extra length");
      const std::uint16_t comment_len = r.u16(p + 32, "comment length");
      e.local_header_offset = r.u32(p + 42, "local header offset");
      const std::uint64_t var = 46ULL + name_len + extra_len + comment_len;
      if (p + var > cd_off + cd_size) fail("", p, "central directory entry overruns the directory");
      e.name.assign(reinterpret_cast<const char*>(bytes_.data()) + p + 46, name_len);
      // ZIP64 extended information: only the fields saturated in the fixed record, in order.
      std::uint64_t x = p + 46 + name_len;
      const std::uint64_t xend = x + extra_len;
      while (x + 4 <= xend) {
        const std::uint16_t id = r.u16(x, "extra id");
        const std::uint16_t len = r.u16(x + 2, "extra length");
        if (x + 4 + len > xend) fail(e.name, x, "extra field overruns its entry");
        if (id == 0x0001) {
          std::uint64_t q = x + 4;
          auto take = [&](std::uint64_t& field) {
            if (q + 8 > x + 4 + len) fail(e.name, q, "ZIP64 extra field too short");
            field = r.u64(q, "zip64 field");
            q += 8;
          };
          if (e.size == 0xffffffffU) take(e.size);
          if (e.compressed_size == 0xffffffffU) take(e.compressed_size);
          if (e.local_header_offset == 0xffffffffU) take(e.local_header_offset);
        }
        x += 4ULL + len;
      }
      if (!index_.emplace(e.name, entries_.size()).second)
        fail(e.name, p, "zip entry name appears twice");
      entries_.push_back(std::move(e));
      p += var;
    }
  }

  const std::vector<zip_entry>& entries() const noexcept { return entries_; }
  const zip_entry* find(std::string_view name) const {
    auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &entries_[it->second];
  }

  /// Offset of the entry's data in the file (after its local header), bounds-checked.
  std::uint64_t data_offset(const zip_entry& e) const {
    detail::byte_reader r(bytes_, file_);
    const std::uint64_t p = e.local_header_offset;
    if (r.u32(p, "local header") != 0x04034b50U) fail(e.name, p, "bad local header signature");
    const std::uint64_t start =
        p + 30 + r.u16(p + 26, "name length") + r.u16(p + 28, "extra length");
    if (!r.has(start, e.compressed_size)) fail(e.name, start, "entry data lies outside the file");
    return start;
  }

  /// The bytes of a STORED entry (zero-copy); checkpoint_error for compressed or encrypted ones.
  std::span<const std::byte> data(const zip_entry& e) const {
    if (e.flags & 1U) fail(e.name, e.local_header_offset, "entry is encrypted");
    if (e.method != 0)
      fail(e.name, e.local_header_offset,
           "entry is compressed (method " + std::to_string(e.method) +
               "); torch.save writes STORED entries only and stowage reads no others");
    if (e.compressed_size != e.size)
      fail(e.name, e.local_header_offset, "STORED entry with two different sizes");
    const std::uint64_t start = data_offset(e);
    return bytes_.subspan(static_cast<std::size_t>(start), static_cast<std::size_t>(e.size));
  }

  const std::string& file() const noexcept { return file_; }

 private:
  [[noreturn]] void fail(const std::string& entry, std::optional<std::uint64_t> off,
                         const std::string& what) const {
    throw checkpoint_error(file_, entry, off, what);
  }

  std::span<const std::byte> bytes_;
  std::string file_;
  std::vector<zip_entry> entries_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace stowage::checkpoint
