// stowage/checkpoint/torch_zip.hpp: reads torch.save state dicts (the zip format written since
// torch 1.6; pytorch_model.bin) without running Python: the central directory gives the
// members, data.pkl goes through the restricted unpickler, and each tensor becomes a view of
// its `data/<key>` storage. Every storage reference is validated (member exists, sizes agree,
// offset + extent inside the storage, no negative strides, no overflow). Contiguous
// little-endian tensors are zero-copy; strided views and big-endian archives are copied out.
// Legacy formats (pre-1.6 pickle stream, tar, PYTORCH1 preview) are detected and refused by name.
#pragma once

#include <stowage/checkpoint/mapped_file.hpp>
#include <stowage/checkpoint/pickle.hpp>
#include <stowage/checkpoint/zip_archive.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace stowage::checkpoint {

/// What the first bytes of a torch checkpoint say it is.
enum class torch_format { zip, legacy_pickle, legacy_tar, preview_pytorch1, unknown };

/// Recognises the container from its first bytes (formats-spec §6.4).
inline torch_format detect_torch_format(std::span<const std::byte> b) noexcept {
  auto starts = [&](std::string_view magic) {
    return b.size() >= magic.size() && std::memcmp(b.data(), magic.data(), magic.size()) == 0;
  };
  if (starts(std::string_view("PK\x03\x04", 4)) || starts(std::string_view("PK\x05\x06", 4)))
    return torch_format::zip;
  if (starts("PYTORCH1")) return torch_format::preview_pytorch1;
  // pickle PROTO 2, LONG1 of 10 bytes = 0x1950a86a20f9469cfc6c (the legacy magic number).
  static constexpr unsigned char legacy[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c,
                                             0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  if (b.size() >= sizeof legacy && std::memcmp(b.data(), legacy, sizeof legacy) == 0)
    return torch_format::legacy_pickle;
  if (b.size() >= 262 && std::memcmp(b.data() + 257, "ustar", 5) == 0)
    return torch_format::legacy_tar;
  return torch_format::unknown;
}

/// One tensor of a torch checkpoint, validated against its storage.
struct torch_tensor_entry {
  tensor_desc desc;
  std::string storage_key;
  std::int64_t storage_offset = 0;  ///< elements
  std::vector<std::int64_t> stride;
  bool contiguous = true;
  std::uint64_t storage_file_offset = 0;  ///< where data/<key> starts in the file
  std::uint64_t storage_nbytes = 0;
};

namespace detail {

inline bool is_contiguous(const std::vector<std::int64_t>& size,
                          const std::vector<std::int64_t>& stride) {
  std::int64_t expected = 1;
  for (std::size_t k = size.size(); k-- > 0;) {
    if (size[k] == 0) return true;
    if (size[k] != 1 && stride[k] != expected) return false;
    expected *= size[k];
  }
  return true;
}

}  // namespace detail

/// The parsed layout of a torch zip checkpoint held in memory (no ownership of the bytes).
struct torch_layout {
  std::string prefix;
  bool big_endian = false;
  std::vector<torch_tensor_entry> tensors;  ///< in state-dict order
};

/// Parses and validates a torch checkpoint in `file` (all of its bytes). `path` names it in errors.
inline torch_layout parse_torch_zip(std::span<const std::byte> file, const std::string& path) {
  switch (detect_torch_format(file)) {
    case torch_format::zip:
      break;
    case torch_format::legacy_pickle:
      throw checkpoint_error(
          path, "", 0,
          "legacy (pre-1.6, non-zip) torch.save format (magic 0x1950a86a20f9469cfc6c) is "
          "not supported: re-save it with a current torch or convert it to safetensors");
    case torch_format::legacy_tar:
      throw checkpoint_error(
          path, "", 0,
          "legacy tar torch.save format (pre-0.4) is not supported: re-save it with a "
          "current torch or convert it to safetensors");
    case torch_format::preview_pytorch1:
      throw checkpoint_error(path, "", 0, "PYTORCH1 preview format (unsupported by torch as well)");
    case torch_format::unknown:
      throw checkpoint_error(
          path, "", 0,
          "not a torch checkpoint: no zip, legacy pickle or tar signature at the start");
  }
  zip_archive zip(file, path);
  if (zip.entries().empty())
    throw checkpoint_error(path, "", std::nullopt, "empty zip archive: no data.pkl");
  const std::string& first = zip.entries().front().name;
  const auto slash = first.find('/');
  if (slash == std::string::npos || slash == 0)
    throw checkpoint_error(
        path, first, std::nullopt,
        "first zip entry is not inside a top-level folder (torch archives put every "
        "record under one folder)");
  torch_layout out;
  out.prefix = first.substr(0, slash);
  const std::string pre = out.prefix + "/";
  if (zip.find(pre + "constants.pkl"))
    throw checkpoint_error(path, "", std::nullopt,
                           "a TorchScript archive (constants.pkl), not a state dict");
  for (const auto& e : zip.entries())
    if (e.name.starts_with(pre + "code/"))
      throw checkpoint_error(path, "", std::nullopt,
                             "a TorchScript archive (code/), not a state dict");
  if (const auto* bo = zip.find(pre + "byteorder")) {
    const auto d = zip.data(*bo);
    const std::string_view s(reinterpret_cast<const char*>(d.data()), d.size());
    if (s == "big")
      out.big_endian = true;
    else if (s != "little")
      throw checkpoint_error(path, bo->name, std::nullopt,
                             "byteorder record is neither \"little\" nor \"big\"");
  }
  const zip_entry* pkl = zip.find(pre + "data.pkl");
  if (!pkl) throw checkpoint_error(path, "", std::nullopt, "no " + pre + "data.pkl in the archive");
  const auto pkl_bytes = zip.data(*pkl);

  struct storage_info {
    std::uint64_t offset, nbytes;
  };
  std::unordered_map<std::string, storage_info> storages;
  detail::restricted_unpickler up(pkl_bytes, path, pkl->name);
  const pickle_result res = up.run([&](const pickle_storage_ref& ref) {
    const std::string member = pre + "data/" + ref.key;
    const zip_entry* e = zip.find(member);
    if (!e)
      throw checkpoint_error(path, "", std::nullopt,
                             "storage `" + ref.key + "`: " + member + " is not in the archive");
    const auto bytes = zip.data(*e);
    const std::uint64_t es = ref.dtype ? element_size(*ref.dtype) : 1;
    const auto n = static_cast<std::uint64_t>(ref.numel);
    if (n > std::numeric_limits<std::uint64_t>::max() / es || n * es != bytes.size())
      throw checkpoint_error(
          path, "", std::nullopt,
          "storage `" + ref.key + "`: " + member + " holds " + std::to_string(bytes.size()) +
              " bytes, but its persistent id says " + std::to_string(ref.numel) +
              (ref.dtype ? " elements of " + std::string(name(*ref.dtype)) : " bytes"));
    storages.emplace(ref.key, storage_info{static_cast<std::uint64_t>(bytes.data() - file.data()),
                                           bytes.size()});
  });

  out.tensors.reserve(res.entries.size());
  for (const auto& entry : res.entries) {
    const std::string& tname = entry.first;
    const pickle_tensor& t = res.tensors[entry.second];
    const pickle_storage_ref& sref = res.storages[t.storage];
    const storage_info& si = storages.at(sref.key);
    auto bad = [&](const std::string& what) {
      throw checkpoint_error(path, tname, si.offset, "storage `" + sref.key + "`: " + what);
    };
    if (t.size.size() > stowage::shape::max_rank)
      bad("rank " + std::to_string(t.size.size()) + " is above the 8 dimensions stowage supports");
    if (t.offset < 0) bad("negative storage offset");
    for (auto s : t.size)
      if (s < 0) bad("negative size");
    for (auto s : t.stride)
      if (s < 0) bad("negative stride (not produced by torch.save; refused)");
    const std::uint64_t es = element_size(t.dtype);
    const std::uint64_t storage_elems = si.nbytes / es;
    // numel and the last element reached, with overflow checks.
    constexpr auto max64 = std::numeric_limits<std::uint64_t>::max();
    std::uint64_t numel = 1, last = 0;
    for (std::size_t k = 0; k < t.size.size(); ++k) {
      const auto sz = static_cast<std::uint64_t>(t.size[k]);
      if (sz != 0 && numel > max64 / sz) bad("element count overflows");
      numel *= sz;
    }
    if (numel != 0) {
      last = static_cast<std::uint64_t>(t.offset);
      for (std::size_t k = 0; k < t.size.size(); ++k) {
        const auto span = static_cast<std::uint64_t>(t.size[k] - 1);
        const auto st = static_cast<std::uint64_t>(t.stride[k]);
        if (st != 0 && span > max64 / st) bad("view extent overflows");
        if (last > max64 - span * st) bad("view extent overflows");
        last += span * st;
      }
      if (last >= storage_elems)
        bad("view (offset " + std::to_string(t.offset) + ", size " + std::to_string(numel) +
            " elements) reaches element " + std::to_string(last) + ", outside its storage of " +
            std::to_string(storage_elems) + " elements");
    } else if (static_cast<std::uint64_t>(t.offset) > storage_elems) {
      bad("storage offset " + std::to_string(t.offset) + " is outside its storage of " +
          std::to_string(storage_elems) + " elements");
    }
    if (numel > storage_elems)
      bad("view of " + std::to_string(numel) + " elements on a storage of " +
          std::to_string(storage_elems) + " (overlapping or broadcast strides are not supported)");
    torch_tensor_entry e;
    e.desc = tensor_desc{tname, stowage::shape(std::span<const std::int64_t>(t.size)), t.dtype};
    e.storage_key = sref.key;
    e.storage_offset = t.offset;
    e.stride = t.stride;
    e.contiguous = detail::is_contiguous(t.size, t.stride);
    e.storage_file_offset = si.offset;
    e.storage_nbytes = si.nbytes;
    out.tensors.push_back(std::move(e));
  }
  return out;
}

/// Copies one tensor out of its storage into C-contiguous little-endian bytes (for strided
/// views and big-endian archives). `storage` is the whole data/<key> record.
inline std::vector<std::byte> gather_tensor(const torch_tensor_entry& e,
                                            std::span<const std::byte> storage, bool big_endian) {
  const std::size_t es = element_size(e.desc.dtype);
  const auto numel = static_cast<std::size_t>(e.desc.numel());
  std::vector<std::byte> out(numel * es);
  const std::size_t rank = e.desc.shape.rank();
  std::vector<std::int64_t> idx(rank, 0);
  for (std::size_t n = 0; n < numel; ++n) {
    std::int64_t off = e.storage_offset;
    for (std::size_t k = 0; k < rank; ++k) off += idx[k] * e.stride[k];
    std::memcpy(out.data() + n * es, storage.data() + static_cast<std::size_t>(off) * es, es);
    for (std::size_t k = rank; k-- > 0;) {
      if (++idx[k] < e.desc.shape[k]) break;
      idx[k] = 0;
    }
  }
  if (big_endian && es > 1) {
    // Complex numbers swap each of their two halves.
    const std::size_t w = is_complex(e.desc.dtype) ? es / 2 : es;
    for (std::size_t p = 0; p < out.size(); p += w)
      std::reverse(out.begin() + static_cast<std::ptrdiff_t>(p),
                   out.begin() + static_cast<std::ptrdiff_t>(p + w));
  }
  return out;
}

/// A memory-mapped, validated torch.save zip checkpoint.
class torch_checkpoint {
 public:
  static torch_checkpoint open(const std::filesystem::path& path) {
    return torch_checkpoint(map_file(path));
  }

  explicit torch_checkpoint(mapped_file_ptr file) : file_(std::move(file)) {
    layout_ = parse_torch_zip(file_->bytes(), file_->path().string());
    for (std::size_t i = 0; i < layout_.tensors.size(); ++i)
      index_.emplace(layout_.tensors[i].desc.name, i);
  }

  const std::filesystem::path& path() const noexcept { return file_->path(); }
  const torch_layout& layout() const noexcept { return layout_; }
  const std::vector<torch_tensor_entry>& tensors() const noexcept { return layout_.tensors; }
  bool contains(std::string_view n) const { return index_.count(std::string(n)) != 0; }
  const torch_tensor_entry* find(std::string_view n) const {
    auto it = index_.find(std::string(n));
    return it == index_.end() ? nullptr : &layout_.tensors[it->second];
  }

  tensor_view view(std::string_view n) const {
    const auto* e = find(n);
    if (!e)
      throw checkpoint_error(path().string(), std::string(n), std::nullopt,
                             "no such tensor in the file");
    return view(*e);
  }

  /// Zero-copy when contiguous and little-endian, else copied out once.
  tensor_view view(const torch_tensor_entry& e) const {
    static_assert(std::endian::native == std::endian::little,
                  "torch_checkpoint: big-endian hosts are not supported");
    tensor_view v;
    v.desc = e.desc;
    const std::size_t es = element_size(e.desc.dtype);
    const auto storage = file_->bytes().subspan(static_cast<std::size_t>(e.storage_file_offset),
                                                static_cast<std::size_t>(e.storage_nbytes));
    if (e.contiguous && (!layout_.big_endian || es == 1)) {
      v.file = file_;
      v.file_offset = e.storage_file_offset + static_cast<std::uint64_t>(e.storage_offset) * es;
      v.bytes = file_->bytes().subspan(static_cast<std::size_t>(v.file_offset),
                                       static_cast<std::size_t>(e.desc.numel()) * es);
      return v;
    }
    auto owned = std::make_shared<const std::vector<std::byte>>(
        gather_tensor(e, storage, layout_.big_endian));
    v.bytes = std::span<const std::byte>(owned->data(), owned->size());
    v.owned = std::move(owned);
    return v;
  }

 private:
  mapped_file_ptr file_;
  torch_layout layout_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace stowage::checkpoint
