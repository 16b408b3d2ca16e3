// stowage/storage/file.hpp: file-backed storage, the backend behind "disk" entries of a device
// map. Two pieces:
//   - file_region: a read-only mapping of a byte range of an existing file (a `.dat` of an
//     offload folder, or the range of one tensor inside a safetensors checkpoint), so an
//     offloaded weight is served straight from the file with no second copy. The pages are
//     clean and file-backed: the kernel can drop them at any time, and release_pages() drops
//     them from this process's resident set explicitly (what an offload hook does after use).
//   - file: a storage_backend (memory resource) whose allocations are unlinked temporary files
//     mapped shared, for code that wants scratch memory the kernel may write back to disk
//     instead of keeping in RAM.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/storage/concepts.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace stowage::storage {

namespace detail {
inline std::size_t page_size() noexcept {
  static const auto p = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return p;
}
}  // namespace detail

/// A read-only shared mapping of [offset, offset + length) of a file. Move-only; unmapped on
/// destruction. The mapping starts at the page boundary below `offset`; bytes() is exactly the
/// requested range.
class file_region {
 public:
  file_region() = default;

  /// Maps the range; io_error when the file cannot be opened or is shorter than the range.
  file_region(const std::filesystem::path& path, std::uint64_t offset, std::uint64_t length)
      : path_(path), offset_(offset), length_(length) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error(path.string(), std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      throw io_error(path.string(), std::string("cannot stat: ") + std::strerror(e));
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (offset > size || length > size - offset) {
      ::close(fd);
      throw io_error(path.string(), "file has " + std::to_string(size) + " bytes; the range [" +
                                        std::to_string(offset) + ", " +
                                        std::to_string(offset + length) + ") lies outside it");
    }
    if (length > 0) {
      const std::uint64_t start = offset / detail::page_size() * detail::page_size();
      map_length_ = static_cast<std::size_t>(length + (offset - start));
      void* p = ::mmap(nullptr, map_length_, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(start));
      if (p == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        map_length_ = 0;
        throw io_error(path.string(), std::string("cannot mmap: ") + std::strerror(e));
      }
      map_ = static_cast<std::byte*>(p);
      data_ = map_ + (offset - start);
    }
    ::close(fd);  // the mapping keeps the file alive
  }

  file_region(const file_region&) = delete;
  file_region& operator=(const file_region&) = delete;
  file_region(file_region&& o) noexcept { swap(o); }
  file_region& operator=(file_region&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  ~file_region() { release(); }

  std::span<const std::byte> bytes() const noexcept {
    return {data_, static_cast<std::size_t>(length_)};
  }
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return static_cast<std::size_t>(length_); }
  const std::filesystem::path& path() const noexcept { return path_; }
  std::uint64_t offset() const noexcept { return offset_; }

  /// Asks the kernel to read the range ahead (prefetch before use).
  void will_need() const noexcept {
    if (map_) ::madvise(map_, map_length_, MADV_WILLNEED);
  }
  /// Drops the range's pages from this process's resident set (they stay in the page cache
  /// and fault back in on the next read): the bytes are unchanged, only memory is returned.
  void release_pages() const noexcept {
    if (map_) ::madvise(map_, map_length_, MADV_DONTNEED);
  }

 private:
  void swap(file_region& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(offset_, o.offset_);
    std::swap(length_, o.length_);
    std::swap(map_, o.map_);
    std::swap(map_length_, o.map_length_);
    std::swap(data_, o.data_);
  }
  void release() noexcept {
    if (map_) ::munmap(map_, map_length_);
    map_ = nullptr;
    data_ = nullptr;
    map_length_ = 0;
  }

  std::filesystem::path path_;
  std::uint64_t offset_ = 0;
  std::uint64_t length_ = 0;
  std::byte* map_ = nullptr;
  std::size_t map_length_ = 0;
  const std::byte* data_ = nullptr;
};

/// Memory backed by an unlinked temporary file in `directory` (empty: the system temporary
/// directory), mapped shared: the kernel writes it back to the file under memory pressure
/// instead of keeping it in RAM. Host-accessible; its bytes do not outlive the allocation.
struct file {
  using storage_backend_tag = file;
  static constexpr std::string_view name() noexcept { return "file"; }

  std::filesystem::path directory;

  void* allocate(std::size_t bytes, std::size_t alignment = default_alignment) {
    (void)alignment;  // mappings are page-aligned
    if (bytes == 0) bytes = 1;
    const std::filesystem::path dir =
        directory.empty() ? std::filesystem::temp_directory_path() : directory;
    const int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0)
      throw io_error(dir.string(), std::string("storage::file: cannot create a temporary file: ") +
                                       std::strerror(errno));
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      const int e = errno;
      ::close(fd);
      throw io_error(dir.string(), "storage::file: cannot size a temporary file to " +
                                       std::to_string(bytes) + " bytes: " + std::strerror(e));
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int e = errno;
    ::close(fd);
    if (p == MAP_FAILED)
      throw io_error(dir.string(), std::string("storage::file: cannot mmap: ") + std::strerror(e));
    return p;
  }
  void deallocate(void* p, std::size_t bytes, std::size_t alignment = default_alignment) noexcept {
    (void)alignment;
    if (bytes == 0) bytes = 1;
    ::munmap(p, bytes);
  }
  friend bool operator==(const file& a, const file& b) noexcept {
    return a.directory == b.directory;
  }
  friend constexpr void get_property(const file&, host_accessible) noexcept {}
};
static_assert(storage_backend_with<file, host_accessible>);
// Not `persistent`: an allocation dies with its mapping. The persistent bytes of an offload
// folder are file_regions over files that exist on their own.
static_assert(!has_property<file, persistent>);

}  // namespace stowage::storage
