// stowage/core/error.hpp: the exception types every part of stowage throws.
// All derive from stowage::error, so `catch (const stowage::error&)` catches everything we throw;
// each message names the file, tensor, offset, module or JSON path at fault.
#pragma once

#include <stowage/config.hpp>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace stowage {

/// Base of every exception stowage throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A memory-size string that is not a size ("5MBB", "-1GB"); accelerate's ValueError.
class invalid_size : public error {
 public:
  using error::error;
};

/// An unknown dtype name, or a dtype used where it cannot be (e.g. a size for "float").
class invalid_dtype : public error {
 public:
  using error::error;
};

/// A JSON document (module tree, device map, config.json, index file) of the wrong shape;
/// the message starts with the JSON path, e.g. `children[2].parameters[0].shape`.
class json_error : public error {
 public:
  json_error(std::string path, const std::string& what)
      : error(path.empty() ? what : path + ": " + what), path_(std::move(path)) {}
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

/// A model configuration stowage cannot build (unknown model_type, inconsistent head sizes).
class invalid_config : public error {
 public:
  using error::error;
};

/// A model structure problem: unknown module or tensor name, bad tie, shape mismatch.
class model_error : public error {
 public:
  using error::error;
};

/// A device map that does not fit the model or names unknown devices; names the key at fault.
class device_map_error : public error {
 public:
  using error::error;
};

/// max_memory budgets that are invalid (unknown device key, negative size).
class invalid_budget : public error {
 public:
  using error::error;
};

/// Placement failed: nothing fits where it must (the message says how much more is needed).
class placement_error : public error {
 public:
  using error::error;
};

/// File-system failures (open, read, write, rename, mmap), with the path and errno text.
class io_error : public error {
 public:
  io_error(std::string path, const std::string& what)
      : error(path + ": " + what), path_(std::move(path)) {}
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

/// A malformed or hostile checkpoint file; carries the file, the tensor and the byte offset
/// when known.
class checkpoint_error : public error {
 public:
  checkpoint_error(std::string file, std::string tensor, std::optional<std::uint64_t> offset,
                   const std::string& what)
      : error(compose(file, tensor, offset, what)),
        file_(std::move(file)),
        tensor_(std::move(tensor)),
        offset_(offset) {}
  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  std::optional<std::uint64_t> offset() const noexcept { return offset_; }

 private:
  static std::string compose(const std::string& file, const std::string& tensor,
                             std::optional<std::uint64_t> offset, const std::string& what) {
    std::string s = file;
    if (!tensor.empty()) s += ": tensor `" + tensor + "`";
    if (offset) s += ": at byte offset " + std::to_string(*offset);
    return s + ": " + what;
  }
  std::string file_;
  std::string tensor_;
  std::optional<std::uint64_t> offset_;
};

}  // namespace stowage
