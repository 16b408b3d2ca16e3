// stowage/storage/offload_folder.hpp: accelerate's offload folder format (accelerate-spec §6.2),
// read and written byte for byte: one raw `<tensor name>.dat` per tensor (C order, native
// little-endian, no header; a 0-dim tensor is one element) and an `index.json` mapping each name
// to {"dtype": numpy name or "bfloat16"/"float8_*", "shape": [...]} written like Python's
// json.dump(index, f, indent=2). Entries of the safetensors form ({"safetensors_file",
// "weight_name", "dtype"}) are read too. Writing is atomic: every file goes to a temporary name
// and is renamed at commit, index.json last, so an interrupted write never leaves a folder whose
// index names missing or partial files.
#pragma once

#include <stowage/checkpoint/json_strict.hpp>
#include <stowage/checkpoint/mapped_file.hpp>
#include <stowage/checkpoint/safetensors.hpp>
#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <unistd.h>

namespace stowage::storage {

/// One index.json entry.
struct offload_entry {
  std::string name;
  stowage::dtype dtype = dtype::float32;
  stowage::shape shape;
  /// Set for the safetensors form (Transformers' offload of safetensors checkpoints).
  std::optional<std::string> safetensors_file;
  std::optional<std::string> weight_name;
  bool dtype_given = true;  ///< the safetensors form may omit "dtype"
};

namespace detail {

/// The name accelerate writes in "dtype": numpy's name (torch's for bf16/float8).
inline std::string offload_dtype_name(dtype d) {
  switch (d) {
    case dtype::bool_:
    case dtype::uint8:
    case dtype::int8:
    case dtype::int16:
    case dtype::uint16:
    case dtype::float16:
    case dtype::bfloat16:
    case dtype::int32:
    case dtype::uint32:
    case dtype::float32:
    case dtype::complex64:
    case dtype::float64:
    case dtype::int64:
    case dtype::uint64:
    case dtype::complex128:
    case dtype::float8_e5m2:
    case dtype::float8_e4m3fn:
    case dtype::float8_e8m0fnu:
    case dtype::float8_e4m3fnuz:
    case dtype::float8_e5m2fnuz:
      return std::string(name(d));
    default:
      throw invalid_dtype("offload folder: dtype " + std::string(name(d)) + " cannot be offloaded");
  }
}

/// Python's json.dump(obj, indent=2) for the index (ensure_ascii, ", " never used with indent).
inline std::string offload_index_text(const nlohmann::ordered_json& j) {
  try {
    return j.dump(2, ' ', true);
  } catch (const nlohmann::json::exception& e) {
    throw json_error("index.json", std::string("cannot serialize: ") + e.what());
  }
}

}  // namespace detail

/// Parses index.json text. `file` names it in errors.
inline std::vector<offload_entry> parse_offload_index(std::string_view text,
                                                      const std::string& file) {
  if (stowage::detail::find_invalid_utf8(text))
    throw json_error(file, "index.json is not valid UTF-8");
  nlohmann::ordered_json j;
  auto r = stowage::detail::parse_json_strict(text, j);
  if (!r.ok) throw json_error(file, "index.json is not valid JSON: " + r.error);
  if (!j.is_object()) throw json_error(file, "index.json must hold an object");
  std::vector<offload_entry> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string jp = file + ": " + it.key();
    const auto& v = it.value();
    if (!v.is_object()) throw json_error(jp, "entry must be an object");
    offload_entry e;
    e.name = it.key();
    if (auto sf = v.find("safetensors_file"); sf != v.end()) {
      if (!sf->is_string()) throw json_error(jp + ".safetensors_file", "must be a string");
      e.safetensors_file = sf->get<std::string>();
      e.weight_name = e.name;
      if (auto wn = v.find("weight_name"); wn != v.end() && !wn->is_null()) {
        if (!wn->is_string()) throw json_error(jp + ".weight_name", "must be a string");
        e.weight_name = wn->get<std::string>();
      }
      auto dt = v.find("dtype");
      e.dtype_given = dt != v.end() && !dt->is_null();
      if (e.dtype_given) {
        if (!dt->is_string()) throw json_error(jp + ".dtype", "must be a string");
        e.dtype = dtype_from_name(dt->get<std::string>());
      }
      out.push_back(std::move(e));
      continue;
    }
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    if (dt == v.end() || !dt->is_string())
      throw json_error(jp + ".dtype", "missing or not a string");
    if (sh == v.end() || !sh->is_array()) throw json_error(jp + ".shape", "missing or not a list");
    const auto d = parse_dtype(dt->get<std::string>());
    if (!d) throw json_error(jp + ".dtype", "unknown dtype \"" + dt->get<std::string>() + "\"");
    e.dtype = *d;
    std::vector<std::int64_t> dims;
    for (const auto& x : *sh) {
      if (!x.is_number_integer() || x.get<std::int64_t>() < 0)
        throw json_error(jp + ".shape", "dimensions must be non-negative integers");
      dims.push_back(x.get<std::int64_t>());
    }
    if (dims.size() > stowage::shape::max_rank)
      throw json_error(jp + ".shape", "rank above 8 is not supported");
    e.shape = stowage::shape(std::span<const std::int64_t>(dims));
    out.push_back(std::move(e));
  }
  return out;
}

/// A read-only offload folder.
class offload_folder {
 public:
  /// Opens `folder/index.json` (io_error if absent; json_error if malformed).
  static offload_folder open(const std::filesystem::path& folder) {
    offload_folder f;
    f.folder_ = folder;
    checkpoint::mapped_file idx(folder / "index.json");
    f.entries_ =
        parse_offload_index(std::string_view(reinterpret_cast<const char*>(idx.data()), idx.size()),
                            (folder / "index.json").string());
    for (std::size_t i = 0; i < f.entries_.size(); ++i) f.pos_.emplace(f.entries_[i].name, i);
    return f;
  }

  const std::filesystem::path& folder() const noexcept { return folder_; }
  const std::vector<offload_entry>& entries() const noexcept { return entries_; }
  const offload_entry* find(std::string_view n) const {
    auto it = pos_.find(std::string(n));
    return it == pos_.end() ? nullptr : &entries_[it->second];
  }

  /// The tensor's bytes, memory-mapped from its .dat file (or from the safetensors file of a
  /// safetensors-form entry; its dtype is then the file's, `entry.dtype` says the target).
  checkpoint::tensor_view view(std::string_view n) const {
    const offload_entry* e = find(n);
    if (!e)
      throw checkpoint_error((folder_ / "index.json").string(), std::string(n), std::nullopt,
                             "not in the offload index");
    if (e->safetensors_file) {
      auto st = checkpoint::safetensors_file::open(*e->safetensors_file);
      return st.view(*e->weight_name);
    }
    const auto path = folder_ / (e->name + ".dat");
    auto file = checkpoint::map_file(path);
    const std::uint64_t elems =
        e->shape.rank() == 0 ? 1 : static_cast<std::uint64_t>(e->shape.numel());
    const std::uint64_t need = elems * element_size(e->dtype);
    if (file->size() != need)
      throw checkpoint_error(path.string(), e->name, std::nullopt,
                             "holds " + std::to_string(file->size()) + " bytes; index.json says " +
                                 e->shape.to_string() + " of " + std::string(name(e->dtype)) +
                                 " = " + std::to_string(need));
    checkpoint::tensor_view v;
    v.desc = tensor_desc{e->name, e->shape, e->dtype};
    v.bytes = file->bytes();
    v.file = std::move(file);
    return v;
  }

 private:
  std::filesystem::path folder_;
  std::vector<offload_entry> entries_;
  std::unordered_map<std::string, std::size_t> pos_;
};

/// Writes tensors into an offload folder (creating it, or merging into an existing index as
/// accelerate's save_offload_index does). Nothing is visible under a final name until commit();
/// a writer destroyed without commit() removes its temporary files.
class offload_folder_writer {
 public:
  explicit offload_folder_writer(std::filesystem::path folder) : folder_(std::move(folder)) {
    std::filesystem::create_directories(folder_);
  }
  offload_folder_writer(const offload_folder_writer&) = delete;
  offload_folder_writer& operator=(const offload_folder_writer&) = delete;
  ~offload_folder_writer() {
    std::error_code ec;
    for (const auto& p : pending_) std::filesystem::remove(p.tmp, ec);
  }

  /// Stages one tensor (C-contiguous bytes). accelerate cannot offload empty tensors (numpy
  /// cannot map an empty file); neither do we.
  void add(const std::string& name, dtype d, const shape& s, std::span<const std::byte> bytes) {
    const std::string dn = detail::offload_dtype_name(d);
    const std::uint64_t elems = s.rank() == 0 ? 1 : static_cast<std::uint64_t>(s.numel());
    if (elems == 0)
      throw checkpoint_error(folder_.string(), name, std::nullopt,
                             "an empty tensor cannot be offloaded");
    if (bytes.size() != elems * element_size(d))
      throw checkpoint_error(folder_.string(), name, std::nullopt,
                             "data holds " + std::to_string(bytes.size()) + " bytes, shape " +
                                 s.to_string() + " of " + dn + " needs " +
                                 std::to_string(elems * element_size(d)));
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      throw checkpoint_error(folder_.string(), name, std::nullopt,
                             "tensor name cannot be used as a file name");
    const auto final_path = folder_ / (name + ".dat");
    const auto tmp = folder_ / (name + ".dat.tmp." + std::to_string(::getpid()));
    const std::span<const std::byte> chunk = bytes;
    write_plain(tmp, std::span(&chunk, 1));
    pending_.push_back({tmp, final_path});
    nlohmann::ordered_json entry;
    entry["dtype"] = dn;
    entry["shape"] = nlohmann::ordered_json::array();
    for (auto x : s) entry["shape"].push_back(x);
    staged_[name] = std::move(entry);
  }

  /// Renames the staged .dat files into place, then writes index.json (merged with an existing
  /// one: existing keys keep their position, new ones are appended) through a temporary name.
  void commit() {
    for (const auto& p : pending_) {
      std::error_code ec;
      std::filesystem::rename(p.tmp, p.final_path, ec);
      if (ec) throw io_error(p.final_path.string(), "cannot rename into place: " + ec.message());
    }
    pending_.clear();
    if (staged_.empty()) return;  // accelerate writes no index for an empty one
    nlohmann::ordered_json current = nlohmann::ordered_json::object();
    const auto index_path = folder_ / "index.json";
    if (std::filesystem::exists(index_path)) {
      checkpoint::mapped_file f(index_path);
      const std::string_view text(reinterpret_cast<const char*>(f.data()), f.size());
      auto r = stowage::detail::parse_json_strict(text, current);
      if (!r.ok || !current.is_object())
        throw json_error(index_path.string(), "existing index.json is not a JSON object");
    }
    for (auto it = staged_.begin(); it != staged_.end(); ++it) current[it.key()] = it.value();
    const std::string text = detail::offload_index_text(current);
    const std::span<const std::byte> chunk(reinterpret_cast<const std::byte*>(text.data()),
                                           text.size());
    checkpoint::detail::write_file_atomically(index_path, std::span(&chunk, 1));
    staged_ = nlohmann::ordered_json::object();
  }

 private:
  static void write_plain(const std::filesystem::path& p,
                          std::span<const std::span<const std::byte>> chunks) {
    // Durably written (fsync) under the temporary name; commit() renames it.
    checkpoint::detail::write_file_atomically(p, chunks);
  }
  struct pending {
    std::filesystem::path tmp, final_path;
  };
  std::filesystem::path folder_;
  std::vector<pending> pending_;
  nlohmann::ordered_json staged_ = nlohmann::ordered_json::object();
};

/// accelerate's offload_state_dict: writes every tensor then the index, atomically.
inline void write_offload_folder(const std::filesystem::path& folder,
                                 std::span<const checkpoint::tensor_ref> tensors) {
  offload_folder_writer w(folder);
  for (const auto& t : tensors) w.add(t.name, t.dtype, t.shape, t.data);
  w.commit();
}

}  // namespace stowage::storage
