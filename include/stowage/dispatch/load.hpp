// stowage/dispatch/load.hpp: streaming checkpoint loading, accelerate's load_checkpoint_in_model
// and load_checkpoint_and_dispatch (accelerate-spec §6.1, §7.1) for a module tree or a typed
// model. Every tensor goes straight from the memory-mapped checkpoint into the storage backend
// its device-map entry names (longest dotted prefix; "" covers all), converted on the way,
// chunk by chunk on several threads; each chunk's source pages are dropped from the resident
// set as soon as it is done, so peak memory stays at the resident weights plus a bounded
// staging window whatever the checkpoint size.
//
// Order: every header is read and checked first (missing / unexpected keys, shape mismatches,
// dtypes, devices), so a bad checkpoint or map fails before anything is allocated or written.
// Then storage is allocated, the bytes are copied, and the offload folder is committed
// atomically: written in a temporary folder (or under temporary names when merging into an
// existing folder), fsync'ed, renamed into place, index.json last. A load interrupted by an
// exception frees everything it allocated and leaves the offload folder complete or absent.
//
// Differences from accelerate, each deliberate (docs/loading.md):
//   - "disk" tensors are written in the TARGET dtype (accelerate keeps the checkpoint dtype and
//     converts on every fetch); a safetensors tensor already in the target dtype is not copied
//     at all: the index gets the safetensors form {"safetensors_file", "weight_name", "dtype"}
//     and the weight is served from the checkpoint file itself;
//   - persistent buffers of "disk" modules are loaded (accelerate §9.11 drops them when
//     offload_buffers is false): they go to the main device's memory, as dispatch would put them;
//   - keep_in_fp32_modules applies to every target dtype, bfloat16 included (§9.12);
//   - zero-element tensors on "disk" are kept in host memory (§9.13: accelerate cannot offload
//     them).
#pragma once

#include <stowage/checkpoint/checkpoint.hpp>
#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/config.hpp>
#include <stowage/core/diagnostics.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/dispatch/progress.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/storage/file.hpp>
#include <stowage/storage/offload_folder.hpp>
#include <stowage/storage/tensor_storage.hpp>
#if defined(STOWAGE_WITH_CUDA)
#include <stowage/storage/device.hpp>
#endif

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace stowage {

/// What the test hook sees after each tensor is stored.
struct tensor_loaded_event {
  std::string_view name;  ///< the stored (canonical) name
  std::size_t index = 0;  ///< how many tensors were done before this one
  std::size_t total = 0;  ///< tensors to load
  device placement = device::cpu();
  storage::storage_kind kind = storage::storage_kind::host;
  std::uint64_t bytes = 0;  ///< bytes stored
};

/// Options of load_checkpoint_in_model / load_checkpoint_and_dispatch.
struct load_options {
  /// Target dtype of floating-point tensors (integer and bool tensors are never converted).
  /// Unset: each tensor takes the dtype the model declares for it (torch load_state_dict).
  std::optional<stowage::dtype> dtype;
  /// Modules kept in float32 when `dtype` is set (accelerate's matching rule; honoured for
  /// every target dtype, bfloat16 included).
  std::vector<std::string> keep_in_fp32_modules;
  /// Where "disk" tensors go (required when the map has "disk" entries).
  std::optional<std::filesystem::path> offload_folder;
  /// Put persistent buffers of "disk" modules on disk too (else: main device memory).
  bool offload_buffers = false;
  /// Missing or unexpected keys are errors (always checked before anything is loaded).
  bool strict = false;
  /// Bytes of checkpoint data in flight at once (touched source pages + staging buffers).
  std::size_t staging_window_bytes = std::size_t{64} << 20;
  /// Worker threads (0: the hardware's concurrency, at most 8).
  unsigned threads = 0;
  progress_mode progress = progress_mode::automatic;
  /// "cpu" entries use pinned host memory when the main device is a GPU.
  bool pin_cpu_memory = true;
  /// Test hook: called after each tensor is stored (serialised); an exception thrown from it
  /// aborts the load like any other failure.
  std::function<void(const tensor_loaded_event&)> on_tensor_loaded;
  /// Test hook: consulted before each write to the offload folder; a non-zero errno return
  /// makes that write fail with it (ENOSPC, EIO, ...).
  std::function<int(const std::filesystem::path& file, std::uint64_t offset, std::size_t bytes)>
      inject_write_error;
};

/// What a load did.
struct load_report {
  std::vector<std::string> missing_keys;  ///< model tensors the checkpoint lacks (state-dict order)
  std::vector<std::string> unexpected_keys;  ///< checkpoint tensors the model lacks (file order)
  std::vector<std::string> warnings;
  std::uint64_t tensors_loaded = 0;  ///< distinct storages filled
  std::uint64_t bytes_read = 0;      ///< checkpoint bytes processed
  std::uint64_t bytes_stored = 0;    ///< bytes written to memory or offload files
  std::uint64_t offload_bytes_written = 0;
  std::uint64_t offload_bytes_referenced = 0;  ///< served from the checkpoint, not copied
  bool offload_folder_reused = false;
  double seconds = 0;
};

/// The result of load_checkpoint_in_model.
struct loaded_weights {
  weight_store weights;
  load_report report;
};

/// accelerate §7.1: the main device is the first GPU of the map, else "cpu".
inline device main_device_of(const device_map& map) {
  std::optional<int> gpu;
  for (const auto& [k, d] : map)
    if (d.is_gpu() && (!gpu || d.index() < *gpu)) gpu = d.index();
  return gpu ? device::gpu(*gpu) : device::cpu();
}

/// A loaded model ready for execution: weights, device map, and accelerate's execution rules.
class dispatched_weights {
 public:
  dispatched_weights(weight_store w, device_map m, std::optional<std::filesystem::path> folder,
                     load_report r)
      : weights_(std::move(w)),
        map_(std::move(m)),
        folder_(std::move(folder)),
        report_(std::move(r)) {
    main_ = main_device_of(map_);
  }

  const weight_store& weights() const noexcept { return weights_; }
  /// Hands the weights over (dispatch_model re-placing a model by a new map).
  weight_store release_weights() && { return std::move(weights_); }
  const device_map& map() const noexcept { return map_; }
  const load_report& report() const noexcept { return report_; }
  const std::optional<std::filesystem::path>& offload_folder() const noexcept { return folder_; }
  /// The first GPU of the map, else "cpu".
  device main_device() const noexcept { return main_; }
  /// Where a module (or tensor) placed at `name` runs: its GPU, or the main device for "cpu"
  /// and "disk" entries (and for names no key covers, as accelerate's "" entry).
  device execution_device(std::string_view name) const {
    const auto d = map_.device_for(name);
    return d && d->is_accelerator() ? *d : main_;
  }
  /// Whether the weights at `name` must be brought to the execution device before use:
  /// "disk" always; "cpu" too when the main device is a GPU.
  bool offloaded(std::string_view name) const {
    const auto d = map_.device_for(name);
    if (!d) return false;
    return d->is_disk() || (d->is_cpu() && !main_.is_cpu());
  }
  /// A stored tensor under its name.
  weight_view view(std::string_view n) const { return weights_.view(n); }

 private:
  weight_store weights_;
  device_map map_;
  std::optional<std::filesystem::path> folder_;
  load_report report_;
  device main_ = device::cpu();
};

namespace detail {

/// accelerate's keep_in_fp32_modules test: k is a substring of the name and k + "." too, or
/// k is the whole name.
inline bool keep_in_fp32(const std::vector<std::string>& keep, std::string_view name) {
  for (const auto& k : keep)
    if (k == name ||
        (name.find(k) != std::string_view::npos && name.find(k + ".") != std::string_view::npos))
      return true;
  return false;
}

/// One storage to fill.
struct load_item {
  std::string name;                  ///< canonical (stored) name
  std::vector<std::string> aliases;  ///< other names of a tie group
  tensor_desc target;                ///< name, shape, target dtype
  checkpoint::tensor_view source;
  std::size_t shard = 0;
  device placement = device::cpu();  ///< the map's device for the name
  storage::storage_kind kind = storage::storage_kind::host;
  bool is_buffer = false;
  bool disk_dat = false;        ///< written to <folder>/<name>.dat
  bool disk_reference = false;  ///< served from the safetensors checkpoint itself
  bool disk_reused = false;     ///< an existing folder already holds it
  std::size_t chunks = 0;
  std::atomic<std::size_t> chunks_left{0};
  int fd = -1;  ///< open .dat while writing
  std::filesystem::path write_path, final_path;
};

struct load_task {
  std::size_t item;
  std::uint64_t begin;  ///< first element
  std::uint64_t count;  ///< elements
};

/// Closes fds and removes everything written but not committed, unless disarmed.
struct offload_guard {
  std::vector<std::unique_ptr<load_item>>* items = nullptr;
  std::optional<std::filesystem::path> temp_dir;
  bool armed = true;
  ~offload_guard() {
    if (!items) return;
    for (auto& it : *items)
      if (it->fd >= 0) {
        ::close(it->fd);
        it->fd = -1;
      }
    if (!armed) return;
    std::error_code ec;
    if (temp_dir) std::filesystem::remove_all(*temp_dir, ec);
    for (auto& it : *items)
      if (it->disk_dat && !it->write_path.empty() && it->write_path != it->final_path)
        std::filesystem::remove(it->write_path, ec);
  }
};

inline void fsync_path(const std::filesystem::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw io_error(p.string(), std::string("cannot open to fsync: ") + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (rc != 0) throw io_error(p.string(), std::string("cannot fsync: ") + std::strerror(e));
}

inline void write_all_at(int fd, const std::byte* p, std::size_t n, std::uint64_t offset,
                         const std::filesystem::path& path, const load_options& opts) {
  if (opts.inject_write_error)
    if (const int e = opts.inject_write_error(path, offset, n); e != 0)
      throw io_error(path.string(), "cannot write " + std::to_string(n) + " bytes at offset " +
                                        std::to_string(offset) + ": " + std::strerror(e));
  while (n > 0) {
    const ::ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw io_error(path.string(), "cannot write " + std::to_string(n) + " bytes at offset " +
                                        std::to_string(offset) + ": " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
    offset += static_cast<std::uint64_t>(w);
  }
}

/// Converts `n` elements like precision::convert_elements (same bits: RNE, NaN -> 0xffff for
/// bfloat16), with a direct, branch-free float32 -> bfloat16 loop the compiler vectorises: the
/// conversion every bf16 load of an fp32 checkpoint runs over all its bytes.
inline void convert_chunk(const std::byte* src, dtype from, std::byte* dst, dtype to,
                          std::size_t n) {
  if (from == dtype::float32 && to == dtype::bfloat16) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint32_t u;
      std::memcpy(&u, src + 4 * i, 4);
      const std::uint32_t rounded = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
      const bool nan = (u & 0x7fffffffU) > 0x7f800000U;
      const auto h = static_cast<std::uint16_t>(nan ? 0xffffU : rounded);
      std::memcpy(dst + 2 * i, &h, 2);
    }
    return;
  }
  precision::convert_elements(src, from, dst, to, n);
}

/// Page-aligned interior/exterior of [p, p + n) for madvise.
inline std::pair<void*, std::size_t> page_span(const void* p, std::size_t n, bool inner) noexcept {
  const auto page = static_cast<std::uintptr_t>(storage::detail::page_size());
  const auto b = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t lo = inner ? (b + page - 1) / page * page : b / page * page;
  const std::uintptr_t hi = inner ? (b + n) / page * page : (b + n + page - 1) / page * page;
  if (hi <= lo) return {nullptr, 0};
  return {reinterpret_cast<void*>(lo), hi - lo};
}

/// Maps [p, p + n) of a file mapping in one call (MADV_POPULATE_READ, Linux 5.14) instead of
/// one page fault per 64 KiB; ignored where the kernel lacks it.
inline void populate_read(const std::byte* p, std::size_t n) noexcept {
#if defined(MADV_POPULATE_READ)
  const auto [a, len] = page_span(p, n, false);
  if (len) ::madvise(a, len, MADV_POPULATE_READ);
#else
  (void)p;
  (void)n;
#endif
}

/// Faults in fresh destination memory [p, p + n) in one call (MADV_POPULATE_WRITE) instead of
/// one fault per page.
inline void populate_write(std::byte* p, std::size_t n) noexcept {
#if defined(MADV_POPULATE_WRITE)
  const auto [a, len] = page_span(p, n, true);
  if (len) ::madvise(a, len, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)n;
#endif
}

/// Drops the pages of [p, p + n) from the resident set (they stay in the page cache).
inline void drop_pages(const std::byte* p, std::size_t n) noexcept {
  if (n == 0) return;
  const auto page = static_cast<std::uintptr_t>(storage::detail::page_size());
  const auto a = reinterpret_cast<std::uintptr_t>(p) / page * page;
  const auto b = reinterpret_cast<std::uintptr_t>(p) + n;
  ::madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
}

inline std::string tensor_list(const std::vector<std::string>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", \"" : "\"") + v[i] + "\"";
  return s;
}

/// Whether an existing index entry already holds what item `it` needs.
inline bool entry_matches(const storage::offload_entry& e, const load_item& it,
                          const std::filesystem::path& folder) {
  if (it.disk_reference) {
    return e.safetensors_file && *e.safetensors_file == it.source.file->path().string() &&
           e.weight_name && *e.weight_name == it.name && e.dtype_given &&
           e.dtype == it.target.dtype;
  }
  if (e.safetensors_file || e.dtype != it.target.dtype || e.shape != it.target.shape) return false;
  std::error_code ec;
  const auto sz = std::filesystem::file_size(folder / (it.name + ".dat"), ec);
  return !ec && sz == it.target.nbytes();
}

}  // namespace detail

/// Loads `checkpoint_path` (a file, an index JSON, or a folder; accelerate §6.1 step 4) into
/// storage for every parameter and persistent buffer of `tree`, placed by `map`.
/// Throws (before anything is loaded) checkpoint_error for unreadable files, model_error for
/// shape mismatches and, when strict, missing/unexpected keys, device_map_error for a map that
/// misses a tensor or names a device this build cannot use; io_error for offload-folder
/// failures (the folder is then left as it was).
inline loaded_weights load_checkpoint_in_model(const module_tree& tree,
                                               const std::filesystem::path& checkpoint_path,
                                               const device_map& map,
                                               const load_options& opts = {}) {
  namespace fs = std::filesystem;
  using storage::storage_kind;
  const auto t0 = std::chrono::steady_clock::now();
  load_report report;

  // ---- 1. The device map. -------------------------------------------------------------------
  bool any_disk = false;
  for (const auto& [k, d] : map) {
    const std::string who = k.empty() ? std::string("the whole model") : "`" + k + "`";
    if (d.is_gpu()) {
#if defined(STOWAGE_WITH_CUDA)
      if (d.index() >= storage::device_count())
        throw device_map_error("device map puts " + who + " on GPU " + std::to_string(d.index()) +
                               " but only " + std::to_string(storage::device_count()) +
                               " GPU(s) are visible");
#else
      throw device_map_error("device map puts " + who + " on GPU " + std::to_string(d.index()) +
                             " but stowage was built without CUDA");
#endif
    }
    if (d.is_mps())
      throw device_map_error("device map puts " + who +
                             " on \"mps\", which stowage does not support");
    if (d.is_disk()) any_disk = true;
  }
  if (any_disk && !opts.offload_folder)
    throw device_map_error(
        "At least one of the model submodule will be offloaded to disk, please pass along an "
        "`offload_folder`.");
  for (auto& w : check_device_map(tree, map).warnings) report.warnings.push_back(std::move(w));
  const device main_dev = main_device_of(map);

  // ---- 2. The model's state dict. -----------------------------------------------------------
  struct model_tensor {
    tensor_entry entry;
    bool is_buffer;
  };
  std::vector<std::string> order;
  std::unordered_map<std::string, model_tensor> model;
  tree.for_each_parameter([&](std::string n, const tensor_entry& e) {
    if (model.emplace(n, model_tensor{e, false}).second) order.push_back(std::move(n));
  });
  tree.for_each_buffer([&](std::string n, const tensor_entry& e) {
    if (e.persistent && model.emplace(n, model_tensor{e, true}).second)
      order.push_back(std::move(n));
  });
  const auto canon = tree.tie_canonical_names();
  auto canonical = [&](const std::string& n) -> const std::string& {
    auto it = canon.find(n);
    return it == canon.end() ? n : it->second;
  };

  // ---- 3. Every checkpoint header. ----------------------------------------------------------
  checkpoint::checkpoint_reader reader = checkpoint::checkpoint_reader::open(checkpoint_path);
  struct ckpt_tensor {
    tensor_desc desc;
    std::size_t shard;
  };
  std::unordered_map<std::string, ckpt_tensor> ckpt;
  std::vector<std::string> ckpt_order;
  for (std::size_t i = 0; i < reader.files().files.size(); ++i) {
    for (auto& d : reader.shard(i)->tensors()) {
      if (d.name.find("SCB") != std::string::npos) continue;  // bitsandbytes statistics
      std::string n = d.name;
      if (ckpt.insert_or_assign(n, ckpt_tensor{std::move(d), i}).second)
        ckpt_order.push_back(std::move(n));
    }
  }

  // ---- 4. Match names, shapes and dtypes (all problems reported together). -----------------
  std::vector<std::string> mismatched;
  for (const auto& n : ckpt_order)
    if (!model.count(n)) report.unexpected_keys.push_back(n);
  // The checkpoint name that provides each canonical tensor (a tie group needs one member).
  std::unordered_map<std::string, std::string> source_of;
  for (const auto& n : order) {
    const std::string& c = canonical(n);
    // The canonical name itself wins; else the first member of the group the checkpoint has.
    auto have = source_of.find(c);
    if (ckpt.count(n) && (have == source_of.end() || n == c)) source_of[c] = n;
  }
  for (const auto& n : order)
    if (!source_of.count(canonical(n))) report.missing_keys.push_back(n);
  for (const auto& n : order) {
    auto it = ckpt.find(n);
    if (it == ckpt.end()) continue;
    const auto& me = model.at(n).entry;
    const auto& cd = it->second.desc;
    if (me.shape != cd.shape)
      mismatched.push_back("Trying to set a tensor of shape " + cd.shape.to_string() + " in \"" +
                           n + "\" (which has shape " + me.shape.to_string() +
                           "), this looks incorrect.");
  }
  if (!mismatched.empty()) {
    std::string s = "checkpoint " + checkpoint_path.string() + " does not fit the model:";
    for (const auto& m : mismatched) s += "\n  " + m;
    throw model_error(s);
  }
  if (opts.strict && (!report.missing_keys.empty() || !report.unexpected_keys.empty())) {
    std::string s = "Error(s) in loading state_dict for " + tree.root().class_name + " from " +
                    checkpoint_path.string() + ":";
    if (!report.missing_keys.empty())
      s += "\n  Missing key(s) in state_dict: " + detail::tensor_list(report.missing_keys) + ".";
    if (!report.unexpected_keys.empty())
      s += "\n  Unexpected key(s) in state_dict: " + detail::tensor_list(report.unexpected_keys) +
           ".";
    throw model_error(s);
  }
  if (!report.unexpected_keys.empty()) {
    std::string s =
        "Some weights of the model checkpoint at " + checkpoint_path.string() +
        " were not used when initializing " + tree.root().class_name + ": {" +
        detail::tensor_list(report.unexpected_keys) +
        "}. This may or may not be an issue - make sure that the checkpoint does not have "
        "unnecessary "
        "parameters, or that the model definition correctly corresponds to the checkpoint.";
    warn(s);
    report.warnings.push_back(std::move(s));
  }
  if (!report.missing_keys.empty()) {
    std::string s = "Some weights of " + tree.root().class_name +
                    " were not found in the checkpoint at " + checkpoint_path.string() +
                    " and are left unloaded: " + detail::tensor_list(report.missing_keys);
    warn(s);
    report.warnings.push_back(std::move(s));
  }

  // ---- 5. Plan every storage: source view, target dtype, backend. --------------------------
  std::vector<std::unique_ptr<detail::load_item>> items;
  std::unordered_map<std::string, std::size_t> item_of;  // canonical -> items index
  for (const auto& n : order) {
    const std::string& c = canonical(n);
    auto src = source_of.find(c);
    if (src == source_of.end()) continue;
    if (auto it = item_of.find(c); it != item_of.end()) {
      if (n != c) items[it->second]->aliases.push_back(n);
      continue;
    }
    const auto& mt = model.at(c);
    const auto& cd = ckpt.at(src->second);
    auto item = std::make_unique<detail::load_item>();
    item->name = c;
    if (n != c) item->aliases.push_back(n);
    item->is_buffer = mt.is_buffer;
    item->shard = cd.shard;
    const dtype from = cd.desc.dtype;
    dtype to = mt.entry.dtype;
    if (is_floating_point(from) && opts.dtype) {
      to = *opts.dtype;
      if (!opts.keep_in_fp32_modules.empty() && detail::keep_in_fp32(opts.keep_in_fp32_modules, c))
        to = dtype::float32;
    } else if (!is_floating_point(from) && opts.dtype) {
      to = from;  // integer and bool tensors are never converted
    }
    if (!precision::can_convert(from, to))
      throw model_error("checkpoint " + reader.files().files[cd.shard].string() + ": tensor `" +
                        src->second + "` is " + std::string(name(from)) + ", the model wants " +
                        std::string(name(to)) + ", and stowage cannot convert between them");
    item->target = tensor_desc{c, mt.entry.shape, to};
    auto d = map.device_for(c);
    if (!d) throw device_map_error(c + " doesn't have any device set.");
    item->placement = *d;
    for (const auto& a : item->aliases)
      if (auto ad = map.device_for(a); ad && *ad != *d)
        report.warnings.push_back("tied parameters `" + c + "` (" + d->to_string() + ") and `" + a +
                                  "` (" + ad->to_string() +
                                  ") are placed on different devices; they share `" + c +
                                  "`'s storage");
    device eff = *d;
    if (eff.is_disk() && item->is_buffer && !opts.offload_buffers)
      eff = main_dev;  // §9.11: loaded, not dropped
    if (eff.is_disk() && item->target.numel() == 0) eff = device::cpu();  // §9.13
    if (eff.is_disk()) {
      item->kind = storage_kind::file;
    } else if (eff.is_gpu()) {
      item->kind = storage_kind::device;
    } else {
      item->kind =
          main_dev.is_gpu() && opts.pin_cpu_memory ? storage_kind::pinned_host : storage_kind::host;
    }
    item_of.emplace(c, items.size());
    items.push_back(std::move(item));
  }
  // Source views (zero-copy into the mappings) and disk forms.
  for (auto& it : items) {
    it->source = reader.view(source_of.at(it->name));
    if (it->kind == storage_kind::file) {
      const auto* f = reader.shard(it->shard).get();
      it->disk_reference = f->is_safetensors() && it->source.zero_copy() &&
                           it->source.desc.dtype == it->target.dtype;
      it->disk_dat = !it->disk_reference;
    }
  }
  // Source file order, so each shard is read front to back.
  std::vector<std::size_t> sequence(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) sequence[i] = i;
  std::stable_sort(sequence.begin(), sequence.end(), [&](std::size_t a, std::size_t b) {
    return std::pair(items[a]->shard, items[a]->source.file_offset) <
           std::pair(items[b]->shard, items[b]->source.file_offset);
  });

  // ---- 6. The offload folder: reuse a complete one, else prepare a temporary one. ----------
  std::optional<fs::path> folder;
  detail::offload_guard guard;
  guard.items = &items;
  bool merge = false;
  bool need_writes = false;
  if (any_disk) {
    folder = fs::absolute(*opts.offload_folder).lexically_normal();
    if (folder->filename().empty()) folder = folder->parent_path();  // "offload/" -> "offload"
    std::error_code ec;
    std::optional<storage::offload_folder> existing;
    if (fs::is_regular_file(*folder / "index.json", ec)) {
      try {
        existing = storage::offload_folder::open(*folder);
      } catch (const error& e) {
        throw io_error((*folder / "index.json").string(),
                       std::string("existing offload index cannot be read: ") + e.what());
      }
    }
    bool all_there = true;
    for (auto& it : items) {
      if (it->kind != storage_kind::file) continue;
      const storage::offload_entry* e = existing ? existing->find(it->name) : nullptr;
      if (e && detail::entry_matches(*e, *it, *folder))
        it->disk_reused = true;
      else
        all_there = false;
    }
    need_writes = !all_there;
    report.offload_folder_reused = existing.has_value() && all_there;
    if (need_writes) {
      const bool fresh =
          !fs::exists(*folder, ec) || (fs::is_directory(*folder, ec) && fs::is_empty(*folder, ec));
      if (fs::exists(*folder, ec) && !fs::is_directory(*folder, ec))
        throw io_error(folder->string(), "offload folder path exists and is not a folder");
      merge = !fresh;
      fs::path write_dir = *folder;
      if (!merge) {
        fs::create_directories(folder->parent_path(), ec);
        write_dir = folder->parent_path() / ("." + folder->filename().string() + ".stowage-tmp-" +
                                             std::to_string(::getpid()));
        fs::remove_all(write_dir, ec);
        if (!fs::create_directory(write_dir, ec))
          throw io_error(write_dir.string(),
                         "cannot create the temporary offload folder: " + ec.message());
        guard.temp_dir = write_dir;
      }
      // Every disk tensor gets its file now (preallocated, so a full disk fails before the copy).
      for (auto& it : items) {
        if (it->kind != storage_kind::file) continue;
        if (it->disk_reused && merge) continue;
        if (!it->disk_dat) continue;
        it->final_path = *folder / (it->name + ".dat");
        it->write_path =
            merge ? *folder / (it->name + ".dat.stowage-tmp-" + std::to_string(::getpid()))
                  : write_dir / (it->name + ".dat");
        if (it->name.empty() || it->name.find('/') != std::string::npos)
          throw io_error(folder->string(),
                         "tensor `" + it->name + "` cannot be used as a file name");
        it->fd = ::open(it->write_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (it->fd < 0)
          throw io_error(it->write_path.string(),
                         std::string("cannot create: ") + std::strerror(errno));
        const auto n = static_cast<std::size_t>(it->target.nbytes());
        if (opts.inject_write_error)
          if (const int e = opts.inject_write_error(it->write_path, 0, n); e != 0)
            throw io_error(it->write_path.string(),
                           "cannot reserve " + std::to_string(n) + " bytes: " + std::strerror(e));
        if (const int rc = ::posix_fallocate(it->fd, 0, static_cast<off_t>(n));
            rc != 0 && rc != EOPNOTSUPP && rc != EINVAL)
          throw io_error(it->write_path.string(),
                         "cannot reserve " + std::to_string(n) + " bytes: " + std::strerror(rc));
      }
    }
  }

  // ---- 7. Allocate memory storage (all of it before any copy: no half-loaded model). ------
  std::vector<storage::tensor_storage> stores(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto& it = *items[i];
    switch (it.kind) {
      case storage_kind::host:
        stores[i] = storage::tensor_storage::allocate_host(it.target);
        break;
      case storage_kind::pinned_host:
        stores[i] = storage::tensor_storage::allocate_pinned(it.target);
        break;
      case storage_kind::device:
#if defined(STOWAGE_WITH_CUDA)
        stores[i] = storage::tensor_storage::allocate_device(
            it.target, it.placement.is_gpu() ? it.placement.index() : main_dev.index());
#endif
        break;
      case storage_kind::file:
        break;
    }
  }

  // ---- 8. Copy: chunks of every tensor, in file order, across worker threads. ---------------
  unsigned threads =
      opts.threads ? opts.threads : std::min(8u, std::max(1u, std::thread::hardware_concurrency()));
  const std::size_t window = std::max<std::size_t>(opts.staging_window_bytes, std::size_t{1} << 20);
  // Each worker holds at most one source chunk touched and one staging chunk.
  const std::size_t chunk_bytes = std::clamp<std::size_t>(
      window / (2 * threads), std::size_t{256} << 10, std::size_t{16} << 20);
  std::vector<detail::load_task> tasks;
  std::uint64_t total_bytes = 0;
  std::size_t work_items = 0;
  for (std::size_t i : sequence) {
    auto& it = *items[i];
    const bool copies =
        it.kind != storage_kind::file || (it.disk_dat && !(it.disk_reused && merge) && need_writes);
    if (!copies) continue;
    ++work_items;
    const std::size_t es = element_size(it.source.desc.dtype);
    const auto numel = static_cast<std::uint64_t>(it.target.numel());
    const std::uint64_t per =
        std::max<std::uint64_t>(1, chunk_bytes / std::max<std::size_t>(es, 1));
    std::size_t n = 0;
    for (std::uint64_t b = 0; b < numel; b += per, ++n)
      tasks.push_back({i, b, std::min(per, numel - b)});
    if (numel == 0) {
      tasks.push_back({i, 0, 0});
      n = 1;
    }
    it.chunks = n;
    it.chunks_left.store(n);
    total_bytes += it.source.size();
  }
  // Disk tensors served from files need no copy; count them done.
  progress_bar bar(work_items, total_bytes, opts.progress);
  threads =
      static_cast<unsigned>(std::min<std::size_t>(threads, std::max<std::size_t>(tasks.size(), 1)));
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stop{false};
  std::exception_ptr failure;
  std::mutex failure_mutex, hook_mutex;
  std::size_t done_tensors = 0;
  std::atomic<std::uint64_t> stored{0}, written{0};
  auto fail = [&](std::exception_ptr e) {
    std::lock_guard lock(failure_mutex);
    if (!failure) failure = e;
    stop.store(true);
  };
  auto worker = [&]() {
    std::vector<std::byte> staging;
#if defined(STOWAGE_WITH_CUDA)
    std::unique_ptr<void, void (*)(void*)> pinned(nullptr, [](void* p) {
      if (p) cudaFreeHost(p);
    });
    std::size_t pinned_size = 0;
#endif
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        const std::size_t k = next.fetch_add(1, std::memory_order_relaxed);
        if (k >= tasks.size()) break;
        const auto& t = tasks[k];
        auto& it = *items[t.item];
        const dtype from = it.source.desc.dtype, to = it.target.dtype;
        const std::size_t in_es = element_size(from), out_es = element_size(to);
        const std::byte* src = it.source.data() + t.begin * in_es;
        const auto in_n = static_cast<std::size_t>(t.count * in_es),
                   out_n = static_cast<std::size_t>(t.count * out_es);
        // Read ahead: the next chunk this worker is likely to take.
        if (k + threads < tasks.size()) {
          const auto& nt = tasks[k + threads];
          const auto& ni = *items[nt.item];
          if (ni.source.zero_copy() && ni.source.file) {
            const std::size_t nes = element_size(ni.source.desc.dtype);
            ni.source.file->advise(checkpoint::access_hint::will_need,
                                   ni.source.file_offset + nt.begin * nes,
                                   static_cast<std::size_t>(nt.count * nes));
          }
        }
        switch (it.kind) {
          case storage_kind::host:
          case storage_kind::pinned_host: {
            auto* dst = static_cast<std::byte*>(stores[t.item].mutable_data()) + t.begin * out_es;
            if (it.source.zero_copy()) detail::populate_read(src, in_n);
            detail::populate_write(dst, out_n);
            detail::convert_chunk(src, from, dst, to, static_cast<std::size_t>(t.count));
            break;
          }
          case storage_kind::file: {
            const std::byte* out = src;
            if (from != to) {
              if (staging.size() < out_n) staging.resize(out_n);
              detail::convert_chunk(src, from, staging.data(), to,
                                    static_cast<std::size_t>(t.count));
              out = staging.data();
            }
            detail::write_all_at(it.fd, out, out_n, t.begin * out_es, it.write_path, opts);
            written.fetch_add(out_n, std::memory_order_relaxed);
            break;
          }
          case storage_kind::device: {
#if defined(STOWAGE_WITH_CUDA)
            if (pinned_size < out_n) {
              void* p = nullptr;
              storage::cuda_check(cudaHostAlloc(&p, out_n, cudaHostAllocPortable),
                                  "load: cudaHostAlloc (staging)");
              pinned.reset(p);
              pinned_size = out_n;
            }
            detail::convert_chunk(src, from, static_cast<std::byte*>(pinned.get()), to,
                                  static_cast<std::size_t>(t.count));
            storage::cuda_check(cudaMemcpy(static_cast<std::byte*>(stores[t.item].mutable_data()) +
                                               t.begin * out_es,
                                           pinned.get(), out_n, cudaMemcpyHostToDevice),
                                "load: cudaMemcpy to GPU");
#endif
            break;
          }
        }
        if (it.source.zero_copy()) detail::drop_pages(src, in_n);
        stored.fetch_add(out_n, std::memory_order_relaxed);
        bar.add_bytes(in_n);
        if (it.chunks_left.fetch_sub(1) == 1) {
          if (it.fd >= 0 && ::fsync(it.fd) != 0)
            throw io_error(it.write_path.string(),
                           std::string("cannot fsync: ") + std::strerror(errno));
          bar.add_tensor();
          std::lock_guard lock(hook_mutex);
          const std::size_t idx = done_tensors++;
          if (opts.on_tensor_loaded && !stop.load())
            opts.on_tensor_loaded(tensor_loaded_event{it.name, idx, work_items, it.placement,
                                                      it.kind, it.target.nbytes()});
        }
      }
    } catch (...) {
      fail(std::current_exception());
    }
  };
  {
    std::vector<std::thread> pool;
    for (unsigned i = 1; i < threads; ++i) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
  }
  if (failure) std::rethrow_exception(failure);
  bar.finish();
  report.bytes_read = total_bytes;
  report.bytes_stored = stored.load();
  report.offload_bytes_written = written.load();
  report.tensors_loaded = items.size();

  // ---- 9. Commit the offload folder. -----------------------------------------------------
  if (any_disk && need_writes) {
    for (auto& it : items)
      if (it->fd >= 0) {
        if (::close(it->fd) != 0) {
          it->fd = -1;
          throw io_error(it->write_path.string(),
                         std::string("cannot close: ") + std::strerror(errno));
        }
        it->fd = -1;
      }
    // The index: entries we produce, in file order, merged after an existing index's entries.
    nlohmann::ordered_json index = nlohmann::ordered_json::object();
    if (merge && fs::is_regular_file(*folder / "index.json")) {
      checkpoint::mapped_file f(*folder / "index.json");
      const std::string_view text(reinterpret_cast<const char*>(f.data()), f.size());
      auto r = stowage::detail::parse_json_strict(text, index);
      if (!r.ok || !index.is_object())
        throw io_error((*folder / "index.json").string(),
                       "existing index.json is not a JSON object");
    }
    std::vector<std::string> replaced;
    for (std::size_t i : sequence) {
      const auto& it = *items[i];
      if (it.kind != storage_kind::file) continue;
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      if (it.disk_reference) {
        e["safetensors_file"] = it.source.file->path().string();
        e["weight_name"] = it.name;
        e["dtype"] = std::string(name(it.target.dtype));
      } else {
        e["dtype"] = storage::detail::offload_dtype_name(it.target.dtype);
        e["shape"] = nlohmann::ordered_json::array();
        for (auto x : it.target.shape) e["shape"].push_back(x);
      }
      if (index.contains(it.name) && index[it.name] != e) replaced.push_back(it.name);
      index[it.name] = std::move(e);
    }
    auto write_index = [&](const fs::path& dir, const nlohmann::ordered_json& j) {
      const std::string text = storage::detail::offload_index_text(j);
      const std::span<const std::byte> chunk(reinterpret_cast<const std::byte*>(text.data()),
                                             text.size());
      if (opts.inject_write_error)
        if (const int e = opts.inject_write_error(dir / "index.json", 0, text.size()); e != 0)
          throw io_error((dir / "index.json").string(),
                         std::string("cannot write: ") + std::strerror(e));
      checkpoint::detail::write_file_atomically(dir / "index.json", std::span(&chunk, 1));
    };
    if (!merge) {
      write_index(*guard.temp_dir, index);
      detail::fsync_path(*guard.temp_dir);
      std::error_code ec;
      if (fs::is_directory(*folder, ec)) fs::remove(*folder, ec);  // empty: replaced by rename
      if (::rename(guard.temp_dir->c_str(), folder->c_str()) != 0)
        throw io_error(folder->string(),
                       std::string("cannot rename the temporary offload folder into place: ") +
                           std::strerror(errno));
      guard.temp_dir.reset();
      guard.armed = false;
      detail::fsync_path(folder->parent_path());
    } else {
      // Entries about to change meaning leave the index first, so it never names a file whose
      // content does not match it.
      if (!replaced.empty()) {
        nlohmann::ordered_json without = nlohmann::ordered_json::object();
        checkpoint::mapped_file f(*folder / "index.json");
        nlohmann::ordered_json cur;
        (void)stowage::detail::parse_json_strict(
            std::string_view(reinterpret_cast<const char*>(f.data()), f.size()), cur);
        for (auto e = cur.begin(); e != cur.end(); ++e)
          if (std::find(replaced.begin(), replaced.end(), e.key()) == replaced.end())
            without[e.key()] = e.value();
        write_index(*folder, without);
      }
      for (auto& it : items) {
        if (it->write_path.empty() || it->write_path == it->final_path) continue;
        if (::rename(it->write_path.c_str(), it->final_path.c_str()) != 0)
          throw io_error(it->final_path.string(),
                         std::string("cannot rename into place: ") + std::strerror(errno));
        it->write_path = it->final_path;
      }
      write_index(*folder, index);
      guard.armed = false;
      detail::fsync_path(*folder);
    }
  }
  guard.armed = false;

  // ---- 10. Serve disk tensors from their files; fill the store. -----------------------------
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto& it = *items[i];
    if (it.kind != storage_kind::file) continue;
    if (it.disk_reference) {
      stores[i] = storage::tensor_storage::from_file(
          it.target,
          storage::file_region(it.source.file->path(), it.source.file_offset, it.source.size()));
      report.offload_bytes_referenced += it.source.size();
    } else {
      stores[i] = storage::tensor_storage::from_file(
          it.target, storage::file_region(*folder / (it.name + ".dat"), 0, it.target.nbytes()));
    }
  }
  loaded_weights out;
  for (std::size_t i = 0; i < items.size(); ++i) out.weights.add(std::move(stores[i]));
  for (const auto& it : items)
    for (const auto& a : it->aliases) out.weights.alias(a, it->name);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.report = std::move(report);
  return out;
}

/// Typed models: the same, on to_module_tree(model).
template <module_type Model>
loaded_weights load_checkpoint_in_model(const Model& model,
                                        const std::filesystem::path& checkpoint_path,
                                        const device_map& map, const load_options& opts = {}) {
  return load_checkpoint_in_model(to_module_tree(model), checkpoint_path, map, opts);
}

/// Loads the checkpoint into the storage each map entry names and returns the dispatched
/// weights: weight store, device map, main device and execution devices (accelerate §7.1).
inline dispatched_weights load_checkpoint_and_dispatch(const module_tree& tree,
                                                       const std::filesystem::path& checkpoint_path,
                                                       const device_map& map,
                                                       const load_options& opts = {}) {
  auto loaded = load_checkpoint_in_model(tree, checkpoint_path, map, opts);
  std::optional<std::filesystem::path> folder;
  for (const auto& [k, d] : map)
    if (d.is_disk()) {
      folder = std::filesystem::absolute(*opts.offload_folder).lexically_normal();
      if (folder->filename().empty()) folder = folder->parent_path();
    }
  return dispatched_weights(std::move(loaded.weights), map, std::move(folder),
                            std::move(loaded.report));
}

/// Without a map, everything goes to "cpu" (accelerate's device_map=None).
inline dispatched_weights load_checkpoint_and_dispatch(const module_tree& tree,
                                                       const std::filesystem::path& checkpoint_path,
                                                       const load_options& opts = {}) {
  return load_checkpoint_and_dispatch(tree, checkpoint_path, device_map{{"", device::cpu()}}, opts);
}

/// Typed models.
template <module_type Model>
dispatched_weights load_checkpoint_and_dispatch(const Model& model,
                                                const std::filesystem::path& checkpoint_path,
                                                const device_map& map,
                                                const load_options& opts = {}) {
  return load_checkpoint_and_dispatch(to_module_tree(model), checkpoint_path, map, opts);
}

}  // namespace stowage
