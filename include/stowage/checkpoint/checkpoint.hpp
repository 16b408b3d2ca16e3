// stowage/checkpoint/checkpoint.hpp: one reader over every checkpoint layout: a single
// safetensors or torch file, an index file, or a folder, resolved exactly as accelerate's
// load_checkpoint_in_model does (accelerate-spec §6.1 step 4). Shards are opened lazily on the
// first access to one of their tensors, so a 70B model's 30 shards cost nothing until used.
#pragma once

#include <stowage/checkpoint/mapped_file.hpp>
#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/checkpoint/sharded.hpp>
#include <stowage/checkpoint/torch_zip.hpp>
#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

namespace stowage::checkpoint {

/// Which files make up a checkpoint.
struct resolved_checkpoint {
  std::vector<std::filesystem::path> files;    ///< shards in load order (sorted), or the one file
  std::optional<std::filesystem::path> index;  ///< the index file, when sharded
};

/// accelerate's rules: a `.json` file is an index; any other file is a whole checkpoint; a folder
/// holding pytorch_model.bin (checked first) or model.safetensors is that file; otherwise the
/// folder must hold exactly one `*.index.json`. Anything else is invalid_config with
/// accelerate's message.
inline resolved_checkpoint resolve_checkpoint(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  resolved_checkpoint r;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    if (path.extension() == ".json") {
      r.index = path;
    } else {
      r.files.push_back(path);
      return r;
    }
  } else if (fs::is_directory(path, ec)) {
    if (fs::is_regular_file(path / "pytorch_model.bin", ec)) {
      r.files.push_back(path / "pytorch_model.bin");
      return r;
    }
    if (fs::is_regular_file(path / "model.safetensors", ec)) {
      r.files.push_back(path / "model.safetensors");
      return r;
    }
    std::vector<fs::path> idx;
    for (const auto& de : fs::directory_iterator(path, ec)) {
      const std::string n = de.path().filename().string();
      if (n.size() > 11 && n.ends_with(".index.json")) idx.push_back(de.path());
    }
    if (idx.empty())
      throw invalid_config(
          path.string() +
          " is not a folder containing a `.index.json` file or a pytorch_model.bin or a "
          "model.safetensors file");
    if (idx.size() > 1)
      throw invalid_config(
          path.string() +
          " containing more than one `.index.json` file, delete the irrelevant ones.");
    r.index = idx.front();
  } else {
    throw invalid_config(
        "`checkpoint` should be the path to a file containing a whole state dict, or the index of "
        "a sharded "
        "checkpoint, or a folder containing a sharded checkpoint or the whole state dict, but "
        "got " +
        path.string() + ".");
  }
  const checkpoint_index ix = read_index(*r.index);
  for (const auto& s : ix.shards) r.files.push_back(ix.folder / s);
  return r;
}

/// One open checkpoint file of either kind.
class checkpoint_file {
 public:
  /// `.safetensors` files are read as safetensors; anything else as a torch.save archive
  /// (accelerate's rule).
  static std::shared_ptr<checkpoint_file> open(const std::filesystem::path& p) {
    if (p.extension() == ".safetensors")
      return std::shared_ptr<checkpoint_file>(new checkpoint_file(safetensors_file::open(p)));
    return std::shared_ptr<checkpoint_file>(new checkpoint_file(torch_checkpoint::open(p)));
  }

  bool is_safetensors() const noexcept { return std::holds_alternative<safetensors_file>(file_); }
  const std::filesystem::path& path() const {
    return std::visit([](const auto& f) -> const std::filesystem::path& { return f.path(); },
                      file_);
  }
  /// Tensor descriptors in file order (data order for safetensors, dict order for torch).
  std::vector<tensor_desc> tensors() const {
    std::vector<tensor_desc> out;
    if (auto* st = std::get_if<safetensors_file>(&file_)) {
      for (const auto& e : st->tensors()) out.push_back(tensor_desc{e.name, e.shape, e.dtype});
    } else {
      for (const auto& e : std::get<torch_checkpoint>(file_).tensors()) out.push_back(e.desc);
    }
    return out;
  }
  bool contains(std::string_view n) const {
    return std::visit([&](const auto& f) { return f.contains(n); }, file_);
  }
  tensor_view view(std::string_view n) const {
    return std::visit([&](const auto& f) { return f.view(n); }, file_);
  }
  const safetensors_file* as_safetensors() const noexcept {
    return std::get_if<safetensors_file>(&file_);
  }
  const torch_checkpoint* as_torch() const noexcept {
    return std::get_if<torch_checkpoint>(&file_);
  }

 private:
  explicit checkpoint_file(std::variant<safetensors_file, torch_checkpoint> f)
      : file_(std::move(f)) {}
  std::variant<safetensors_file, torch_checkpoint> file_;
};

/// A whole checkpoint (one file or many shards), tensors by name. Shards open lazily and stay
/// mapped while the checkpoint (or any view into them) lives. Thread-safe.
class checkpoint_reader {
 public:
  static checkpoint_reader open(const std::filesystem::path& path) {
    return checkpoint_reader(resolve_checkpoint(path));
  }

  explicit checkpoint_reader(resolved_checkpoint r) : resolved_(std::move(r)) {
    shards_.resize(resolved_.files.size());
    if (resolved_.index) {
      index_ = read_index(*resolved_.index);
      std::unordered_map<std::string, std::size_t> file_pos;
      for (std::size_t i = 0; i < resolved_.files.size(); ++i)
        file_pos.emplace(index_->shards[i], i);
      for (const auto& [tensor, shard] : index_->weight_map) {
        if (!where_.emplace(tensor, file_pos.at(shard)).second)
          throw checkpoint_error(resolved_.index->string(), tensor, std::nullopt,
                                 "tensor listed twice in the index");
        names_.push_back(tensor);
      }
    } else if (!resolved_.files.empty()) {
      auto f = shard(0);
      for (const auto& d : f->tensors()) {
        where_.emplace(d.name, 0);
        names_.push_back(d.name);
      }
    }
  }

  const resolved_checkpoint& files() const noexcept { return resolved_; }
  const std::optional<checkpoint_index>& index() const noexcept { return index_; }
  /// Tensor names: index order for sharded checkpoints, file order for one file.
  const std::vector<std::string>& names() const noexcept { return names_; }
  bool contains(std::string_view n) const { return where_.count(std::string(n)) != 0; }
  /// The shard file (index into files().files) holding `n`.
  std::size_t shard_of(std::string_view n) const {
    auto it = where_.find(std::string(n));
    if (it == where_.end())
      throw checkpoint_error(describe(), std::string(n), std::nullopt,
                             "no such tensor in the checkpoint");
    return it->second;
  }
  /// Opens (once) and returns shard `i`.
  std::shared_ptr<checkpoint_file> shard(std::size_t i) const {
    std::lock_guard lock(*mutex_);
    if (!shards_[i]) shards_[i] = checkpoint_file::open(resolved_.files[i]);
    return shards_[i];
  }
  tensor_view view(std::string_view n) const {
    const auto i = shard_of(n);
    auto f = shard(i);
    if (!f->contains(n))
      throw checkpoint_error(
          f->path().string(), std::string(n), std::nullopt,
          "the index puts this tensor in this shard, but the shard does not hold it");
    return f->view(n);
  }

 private:
  std::string describe() const {
    return resolved_.index           ? resolved_.index->string()
           : resolved_.files.empty() ? ""
                                     : resolved_.files[0].string();
  }
  resolved_checkpoint resolved_;
  std::optional<checkpoint_index> index_;
  std::unordered_map<std::string, std::size_t> where_;
  std::vector<std::string> names_;
  mutable std::vector<std::shared_ptr<checkpoint_file>> shards_;
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();
};

}  // namespace stowage::checkpoint
