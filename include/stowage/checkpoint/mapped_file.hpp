// stowage/checkpoint/mapped_file.hpp: a read-only memory-mapped file (POSIX mmap, MAP_SHARED)
// and the zero-copy tensor view that points into it. Checkpoints are mapped, never read into
// buffers, so a shard larger than RAM costs only address space and the pages actually touched;
// madvise hints tell the kernel how the bytes are about to be used. A view holds a shared
// reference to its mapping, so the bytes stay valid as long as any view exists.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace stowage::checkpoint {

/// How the bytes of a mapping are about to be read (maps to madvise).
enum class access_hint { normal, sequential, random, will_need, dont_need };

/// A whole file mapped read-only. Move-only; unmapped and closed on destruction.
class mapped_file {
 public:
  mapped_file() = default;

  /// Maps `path`; throws io_error (with errno text) when it cannot be opened or mapped.
  explicit mapped_file(const std::filesystem::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw io_error(path.string(), std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int e = errno;
      close_fd();
      throw io_error(path.string(), std::string("cannot stat: ") + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
      close_fd();
      throw io_error(path.string(), "not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {  // mmap of length 0 is an error; an empty file is a valid empty span
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
      if (p == MAP_FAILED) {
        const int e = errno;
        close_fd();
        throw io_error(path.string(), std::string("cannot mmap: ") + std::strerror(e));
      }
      data_ = static_cast<const std::byte*>(p);
    }
  }

  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  mapped_file(mapped_file&& o) noexcept { swap(o); }
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  ~mapped_file() { release(); }

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  const std::filesystem::path& path() const noexcept { return path_; }
  /// The open descriptor behind the mapping (-1 when default-constructed): for pread, which
  /// copies page-cache bytes without mapping them (the loader's streaming path).
  int fd() const noexcept { return fd_; }

  /// Advises the kernel about [offset, offset+length) (clamped to the file; best effort:
  /// a refused hint is not an error).
  void advise(access_hint hint, std::size_t offset = 0,
              std::size_t length = SIZE_MAX) const noexcept {
    if (!data_ || offset >= size_) return;
    if (length > size_ - offset) length = size_ - offset;
    // madvise needs a page-aligned start.
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t start = offset / page * page;
    length += offset - start;
    int advice = MADV_NORMAL;
    switch (hint) {
      case access_hint::normal:
        advice = MADV_NORMAL;
        break;
      case access_hint::sequential:
        advice = MADV_SEQUENTIAL;
        break;
      case access_hint::random:
        advice = MADV_RANDOM;
        break;
      case access_hint::will_need:
        advice = MADV_WILLNEED;
        break;
      case access_hint::dont_need:
        advice = MADV_DONTNEED;
        break;
    }
    ::madvise(const_cast<std::byte*>(data_) + start, length, advice);
  }

 private:
  void swap(mapped_file& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(fd_, o.fd_);
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
  }
  void close_fd() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void release() noexcept {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
    close_fd();
  }

  std::filesystem::path path_;
  int fd_ = -1;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Shared ownership of a mapping: what views hold.
using mapped_file_ptr = std::shared_ptr<const mapped_file>;

inline mapped_file_ptr map_file(const std::filesystem::path& path) {
  return std::make_shared<const mapped_file>(path);
}

/// One tensor's bytes, C-contiguous and little-endian, with its descriptor. Zero-copy when the
/// checkpoint stores it that way (the span points into the mapping, `file_offset` says where);
/// otherwise (a strided torch view, a big-endian archive) the bytes were copied out once into
/// an owned buffer and `zero_copy()` is false.
struct tensor_view {
  tensor_desc desc;
  std::span<const std::byte> bytes;  ///< nbytes() long
  mapped_file_ptr file;              ///< keeps the mapping alive (null for owned data)
  std::uint64_t file_offset = 0;     ///< where `bytes` starts in `file` (zero-copy only)
  std::shared_ptr<const std::vector<std::byte>> owned;  ///< set when the bytes were copied

  bool zero_copy() const noexcept { return owned == nullptr; }
  const std::byte* data() const noexcept { return bytes.data(); }
  std::size_t size() const noexcept { return bytes.size(); }
  /// Hints the kernel that this tensor is about to be read (prefetch).
  void will_need() const noexcept {
    if (file && zero_copy()) file->advise(access_hint::will_need, file_offset, bytes.size());
  }
};

}  // namespace stowage::checkpoint
