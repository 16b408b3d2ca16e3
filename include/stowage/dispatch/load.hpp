// stowage/dispatch/load.hpp: streaming checkpoint loading, accelerate's load_checkpoint_in_model
// and load_checkpoint_and_dispatch (accelerate-spec §6.1, §7.1) for a module tree or a typed
// model. Every tensor goes straight from the checkpoint into the storage backend its device-map
// entry names (longest dotted prefix; "" covers all), converted on the way, chunk by chunk on
// several threads. Tensors bound for host memory are read with pread straight into the
// destination when the dtype is unchanged, else converted 2 MiB source window by window: from
// the memory mapping where the page cache maps the window as one huge page (a file written in
// large pieces sits in 2 MiB folios: one fault per 2 MiB, no copy), else through pread into a
// small cache-resident staging buffer (small folios would map and unmap 4 KiB at a time, which
// costs more than pread's copy); mapped pages are dropped chunk by chunk. The destination, one
// 2 MiB-aligned arena for all host tensors (storage::host_arena), is faulted in a chunk at a
// time (MADV_POPULATE_WRITE), on transparent huge pages by default, and written with
// non-temporal stores. Other paths (GPU, disk, quantize-on-load) also read the
// mapping and drop each chunk's source pages as soon as it is done. Either way peak memory stays
// at the resident weights plus a bounded staging window whatever the checkpoint size.
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
#include <stowage/dispatch/quantized_weights.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/precision/bnb_config.hpp>
#include <stowage/precision/bnb_serialize.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/precision/int8.hpp>
#include <stowage/precision/kernels_cpu.hpp>
#include <stowage/precision/nf4.hpp>
#include <stowage/precision/quant_state.hpp>
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
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
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
#include <unordered_set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
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
  /// Back pageable host storage with transparent huge pages where the kernel allows it
  /// (MADV_HUGEPAGE on the load's host arena, storage::host_arena): far fewer page faults while
  /// filling fresh memory. Where huge pages fault in slower than 2 GB/s of CPU time (memory a
  /// hypervisor took back, detail::huge_page_probe) the load switches to 4 KiB pages for the
  /// memory not yet touched. Off: plain 4 KiB pages throughout.
  bool transparent_huge_pages = true;
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
  /// Quantize-on-load (bitsandbytes layouts, docs/loading.md "Quantized loading"): the weights
  /// of the Linear modules Transformers would replace (precision::modules_to_quantize: not the
  /// output embeddings, tied weights or the last module unless `llm_int8_skip_modules`
  /// replaces that list; never keep_in_fp32_modules) are converted to `dtype` (else the
  /// model's floating dtype, else the checkpoint's) and quantized as they stream in. Each is
  /// stored as the packed weight plus its state tensors under bitsandbytes' state-dict names
  /// (`<w>.absmax`, `<w>.quant_map`, ..., `<module>.SCB`). Already-quantized weights in the
  /// checkpoint are loaded as they are whatever this says. Unset: the checkpoint folder's
  /// config.json `quantization_config` (when read_quantization_config), else no quantization.
  std::optional<precision::bnb_config> quantization;
  /// The module get_output_embeddings() returns (never quantized); "" for none.
  std::string output_embeddings = "lm_head";
  /// Read `quantization_config` from config.json next to the checkpoint. Like Transformers,
  /// a checkpoint's own config wins over `quantization` (with a warning) when both are set.
  bool read_quantization_config = true;
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
  /// The bitsandbytes config in effect (options or config.json); nullopt: none.
  std::optional<precision::bnb_config> quantization;
  std::size_t quantized_on_load = 0;  ///< weights quantized while loading
  std::size_t prequantized = 0;       ///< weights the checkpoint held quantized (loaded as is)
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
  /// Quantize-on-load: the weight is converted to `quant_input`, then quantized chunk by chunk
  /// into the packed target; `scales` collects the per-block absmax (4-bit) or per-row SCB
  /// (int8); `states` are the state tensors made when the last chunk is done.
  enum class quant_mode : std::uint8_t { none, four_bit, int8 } quant = quant_mode::none;
  dtype quant_input = dtype::float32;
  stowage::shape original_shape;  ///< [out_features, in_features] before packing
  std::vector<float> scales;
  struct state_out {
    tensor_desc desc;
    std::vector<std::uint8_t> bytes;
    std::filesystem::path write_path, final_path;  ///< "disk" only
  };
  std::vector<state_out> states;
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
    for (auto& it : *items) {
      if (it->disk_dat && !it->write_path.empty() && it->write_path != it->final_path)
        std::filesystem::remove(it->write_path, ec);
      for (auto& st : it->states)
        if (!st.write_path.empty() && st.write_path != st.final_path)
          std::filesystem::remove(st.write_path, ec);
    }
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
/// bfloat16); float32 -> bfloat16, the conversion every bf16 load of an fp32 checkpoint runs
/// over all its bytes, goes straight through the (AVX2 where available) bulk loop, with
/// non-temporal stores when `streaming` (a host destination nobody reads during the load).
inline void convert_chunk(const std::byte* src, dtype from, std::byte* dst, dtype to, std::size_t n,
                          bool streaming = false) {
  if (from == dtype::float32 && to == dtype::bfloat16) {
    if (streaming)
      precision::fp32_to_bf16_bytes_streaming(src, dst, n);
    else
      precision::fp32_to_bf16_bytes(src, dst, n);
    return;
  }
  precision::convert_elements(src, from, dst, to, n);
}

/// Reads exactly `n` bytes at `offset` of a checkpoint file with pread (EINTR retried); a short
/// read (the file shrank after its header was checked) or an I/O error is an io_error naming
/// the file and offset.
inline void pread_exact(int fd, std::byte* dst, std::size_t n, std::uint64_t offset,
                        const std::filesystem::path& path) {
  while (n > 0) {
    const ::ssize_t r = ::pread(fd, dst, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      throw io_error(
          path.string(),
          "cannot read " + std::to_string(n) + " bytes at offset " + std::to_string(offset) + ": " +
              (r == 0 ? std::string("unexpected end of file") : std::string(std::strerror(errno))));
    dst += r;
    n -= static_cast<std::size_t>(r);
    offset += static_cast<std::uint64_t>(r);
  }
}

/// Before a chunk is read through the mapping: the file still holds [offset, offset + n) (it
/// was checked whole when its header was read, but may have shrunk since). Reading a mapped
/// page past the end of the file is a SIGBUS; this makes a file cut between chunks the same
/// io_error that pread reports.
inline void check_still_mapped(int fd, std::size_t n, std::uint64_t offset,
                               const std::filesystem::path& path) {
  struct stat st {};
  if (fd < 0 || n == 0) return;
  if (::fstat(fd, &st) == 0 && static_cast<std::uint64_t>(st.st_size) >= offset + n) return;
  throw io_error(path.string(), "cannot read " + std::to_string(n) + " bytes at offset " +
                                    std::to_string(offset) + ": unexpected end of file");
}

/// Watches how fast huge-page destinations fault in and says when to fall back to 4 KiB pages.
/// Faulting in a huge page that is really backed costs one 2 MiB clear (10+ GB/s of CPU time);
/// under a hypervisor that took free guest memory back (virtio-balloon free page reporting
/// returns exactly the free 2 MiB+ blocks huge pages are made from) every first touch is a host
/// fault per 4 KiB, and huge-page fault-in drops below 1 GB/s, slower than plain 4 KiB pages
/// (which come from smaller free blocks the host kept). Every `probe_bytes` of populated
/// destination is judged on thread CPU time (a busy machine's preemption does not count); the
/// first slow window turns huge pages off for the rest of the load.
struct huge_page_probe {
  static constexpr std::uint64_t probe_bytes = std::uint64_t{16} << 20;
  static constexpr double min_bytes_per_cpu_second = 2e9;
  std::atomic<bool> active{false};  ///< huge pages on and still watched
  std::mutex m;
  std::uint64_t bytes = 0;
  double cpu_seconds = 0;

  static double thread_cpu_seconds() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }
  /// Records one populate of `n` bytes that took `secs` of CPU; true exactly once, at the end
  /// of the first window in which huge pages were too slow.
  bool record(std::uint64_t n, double secs) {
    std::lock_guard lock(m);
    if (!active.load(std::memory_order_relaxed)) return false;
    bytes += n;
    cpu_seconds += secs;
    if (bytes < probe_bytes) return false;
    const bool slow = static_cast<double>(bytes) < min_bytes_per_cpu_second * cpu_seconds;
    bytes = 0;
    cpu_seconds = 0;
    if (slow) active.store(false, std::memory_order_relaxed);
    return slow;
  }
};

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

/// Whether the byte at `offset` of the file open as `fd` is in the page cache: a one-byte
/// preadv2 with RWF_NOWAIT, which fails instead of reading from the disk (unlike mincore it
/// answers for files the caller may not write). False where the kernel cannot tell; the caller
/// then issues its read-ahead hint as if the byte were not cached.
inline bool byte_cached(int fd, std::uint64_t offset) noexcept {
#if defined(RWF_NOWAIT)
  char b = 0;
  ::iovec v{&b, 1};
  return ::preadv2(fd, &v, 1, static_cast<off_t>(offset), RWF_NOWAIT) == 1;
#else
  (void)fd;
  (void)offset;
  return false;
#endif
}

/// Tells, for each 2 MiB window of a checkpoint mapping, whether the page cache maps it as one
/// huge page. ext4 keeps a file written in large pieces (save_pretrained) in 2 MiB folios, which
/// map with one PMD per window: converting straight from the mapping then costs one fault per
/// 2 MiB. A file read in from disk may sit in small folios (readahead-sized), which map 4 KiB
/// at a time: mapping and unmapping every page then costs more than pread copying it into a
/// small cache-resident staging buffer. The test maps one page of the window
/// (MADV_POPULATE_READ, which maps the whole folio's PMD when there is one) and asks
/// /proc/self/pagemap whether a page at least 1 MiB away, farther than any fault-around, is
/// mapped too. It never affects what is read, only how; without pagemap every window reads
/// through the mapping.
class huge_window_test {
 public:
  static constexpr std::uintptr_t window = std::uintptr_t{2} << 20;
  huge_window_test() : fd_(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)) {}
  huge_window_test(const huge_window_test&) = delete;
  huge_window_test& operator=(const huge_window_test&) = delete;
  ~huge_window_test() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool available() const noexcept { return fd_ >= 0; }
  /// Whether the window holding `p` maps as a huge page; `base`/`size`: the whole mapping.
  bool huge(const std::byte* p, const std::byte* base, std::size_t size) const noexcept {
#if defined(MADV_POPULATE_READ)
    if (fd_ < 0) return true;
    const auto page = static_cast<std::uintptr_t>(storage::detail::page_size());
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    const auto lo = reinterpret_cast<std::uintptr_t>(base);
    const std::uintptr_t w = a / window * window;
    // Only a window wholly inside the mapping can be a PMD.
    if (w < lo || w + window > lo + size) return false;
    ::madvise(reinterpret_cast<void*>(a / page * page), static_cast<std::size_t>(page),
              MADV_POPULATE_READ);
    const std::uintptr_t far = a - w < window / 2 ? w + window - page : w;
    std::uint64_t entry = 0;
    if (::pread(fd_, &entry, sizeof entry, static_cast<off_t>(far / page * sizeof entry)) !=
        static_cast<::ssize_t>(sizeof entry))
      return true;
    return (entry >> 63) != 0;  // bit 63: page present
#else
    (void)p;
    (void)base;
    (void)size;
    return true;
#endif
  }

 private:
  int fd_ = -1;
};

/// Converts `count` elements of a checkpoint tensor held in mapping `f` (from `src`, at
/// `file_offset`) into fresh host memory at `dst`, one 2 MiB source window at a time: a window
/// the page cache maps as a huge page is converted straight from the mapping, any other is
/// pread through `staging` (256 KiB, so it stays in cache). Stores are non-temporal: nothing
/// reads the destination during the load. `windows`: huge_window_test, or a test's stand-in.
template <class WindowTest>
  requires requires(const WindowTest& w, const std::byte* p, std::size_t n) {
    { w.huge(p, p, n) } -> std::convertible_to<bool>;
  }
void convert_mapped_chunk(const checkpoint::mapped_file& f, const std::byte* src,
                          std::uint64_t file_offset, dtype from, std::byte* dst, dtype to,
                          std::uint64_t count, const WindowTest& windows,
                          std::vector<std::byte>& staging) {
  const std::size_t in_es = element_size(from), out_es = element_size(to);
  const std::uint64_t per = std::max<std::uint64_t>(1, (std::uint64_t{256} << 10) / in_es);
  while (count > 0) {
    const auto a = reinterpret_cast<std::uintptr_t>(src);
    const std::uintptr_t end = (a / huge_window_test::window + 1) * huge_window_test::window;
    // The elements that start in this window (the last one may run into the next).
    const std::uint64_t n = std::min<std::uint64_t>(count, (end - a + in_es - 1) / in_es);
    if (windows.huge(src, f.data(), f.size())) {
      convert_chunk(src, from, dst, to, static_cast<std::size_t>(n), true);
    } else {
      if (staging.size() < per * in_es) staging.resize(static_cast<std::size_t>(per * in_es));
      for (std::uint64_t b = 0; b < n; b += per) {
        const std::uint64_t m = std::min(per, n - b);
        pread_exact(f.fd(), staging.data(), static_cast<std::size_t>(m * in_es),
                    file_offset + b * in_es, f.path());
        convert_chunk(staging.data(), from, dst + b * out_es, to, static_cast<std::size_t>(m),
                      true);
      }
    }
    src += n * in_es;
    dst += n * out_es;
    file_offset += n * in_es;
    count -= n;
  }
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

/// The bitsandbytes `quantization_config` of the config.json next to a checkpoint (in the
/// folder, or beside the file / index); nullopt when there is none. A config.json that is not
/// JSON is not the loader's business and is ignored; a malformed quantization_config block is
/// a json_error naming the file.
inline std::optional<precision::bnb_config> checkpoint_quantization_config(
    const std::filesystem::path& ckpt) {
  std::error_code ec;
  const auto dir = std::filesystem::is_directory(ckpt, ec) ? ckpt : ckpt.parent_path();
  const auto path = dir / "config.json";
  if (!std::filesystem::is_regular_file(path, ec)) return std::nullopt;
  nlohmann::json j;
  {
    checkpoint::mapped_file f(path);
    const auto* b = reinterpret_cast<const char*>(f.data());
    j = nlohmann::json::parse(b, b + f.size(), nullptr, false);
  }
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  const auto q = j.find("quantization_config");
  if (q == j.end() || q->is_null()) return std::nullopt;
  return precision::bnb_config_from_json(*q, path.string() + ": quantization_config");
}

/// Whether two configs quantize the same way (what a weight's bytes depend on).
inline bool same_quantization(const precision::bnb_config& a, const precision::bnb_config& b) {
  if (a.load_in_8bit != b.load_in_8bit || a.load_in_4bit != b.load_in_4bit) return false;
  if (a.load_in_8bit) return true;
  return a.bnb_4bit_quant_type == b.bnb_4bit_quant_type &&
         a.bnb_4bit_use_double_quant == b.bnb_4bit_use_double_quant && a.blocksize == b.blocksize;
}

/// Quantizes elements [0, n) of one load chunk (`in`, dtype `in_type`) of a weight whose flat
/// chunk starts at `first` into `out` (packed bytes / int8 rows of the chunk) and `scales`
/// (the whole weight's absmax / SCB). The kernels are called on pieces of at most their
/// parallel grain (64 Ki elements, or one row), so they run inline on this worker: the load's
/// own threads are the parallelism, and no two workers contend for the kernel pool.
inline void quantize_chunk(const load_item& it, const precision::bnb_config& c, const std::byte* in,
                           dtype in_type, std::uint64_t first, std::uint64_t n, std::byte* out,
                           float* scales) {
  const std::size_t es = element_size(in_type);
  if (it.quant == load_item::quant_mode::four_bit) {
    const std::size_t bs = c.blocksize;
    const std::uint64_t piece = std::max<std::uint64_t>(bs, (std::uint64_t{1} << 16) / bs * bs);
    for (std::uint64_t p = 0; p < n; p += piece) {
      const std::uint64_t m = std::min(piece, n - p);
      precision::quantize_4bit_raw(
          in + p * es, in_type, static_cast<std::size_t>(m), c.bnb_4bit_quant_type, bs,
          reinterpret_cast<std::uint8_t*>(out) + p / 2, scales + (first + p) / bs);
    }
    return;
  }
  const auto cols = static_cast<std::uint64_t>(it.target.shape[1]);
  const std::uint64_t rows_per = std::max<std::uint64_t>(1, (std::uint64_t{1} << 16) / cols);
  const std::uint64_t rows = n / cols;
  for (std::uint64_t r = 0; r < rows; r += rows_per) {
    const std::uint64_t m = std::min(rows_per, rows - r);
    precision::quantize_int8_rowwise_raw(
        in + r * cols * es, in_type, static_cast<std::size_t>(m), static_cast<std::size_t>(cols),
        reinterpret_cast<std::int8_t*>(out) + r * cols, scales + first / cols + r);
  }
}

/// The state tensors of a weight quantized on load, once every chunk is done: bitsandbytes'
/// QuantState.as_dict(packed=True) under `<weight>.` (4-bit) or Linear8bitLt's SCB and
/// weight_format under `<module>.` (int8). Same calls as stowage-convert, same bytes.
inline void finish_quantized(load_item& it, const precision::bnb_config& c) {
  const stowage::shape& original = it.original_shape;
  std::vector<precision::state_tensor> st;
  std::string prefix;
  if (it.quant == load_item::quant_mode::four_bit) {
    precision::quant_state_4bit q;
    q.type = c.bnb_4bit_quant_type;
    q.blocksize = c.blocksize;
    q.original_dtype = it.quant_input;
    q.shape.assign(original.begin(), original.end());
    q.absmax = std::move(it.scales);
    if (c.bnb_4bit_use_double_quant) precision::double_quantize(q);
    st = precision::quant_state_tensors(q);
    prefix = it.name + ".";
  } else {
    precision::quantized_int8 q;
    q.rows = static_cast<std::size_t>(original[0]);
    q.cols = static_cast<std::size_t>(original[1]);
    q.scb = std::move(it.scales);
    st = precision::int8_state_tensors(q);
    prefix = it.name.substr(0, it.name.size() - 6);  // "<module>."
  }
  it.scales.clear();
  it.scales.shrink_to_fit();
  for (auto& t : st)
    it.states.push_back(
        {tensor_desc{prefix + t.suffix, stowage::shape(std::span<const std::int64_t>(t.shape)),
                     t.type},
         std::move(t.bytes),
         {},
         {}});
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
      // bitsandbytes statistics are skipped (accelerate), except a Linear8bitLt's own
      // `<module>.SCB`, which a quantized checkpoint needs.
      if (d.name.find("SCB") != std::string::npos &&
          !(d.name.ends_with(".SCB") &&
            model.count(d.name.substr(0, d.name.size() - 3) + "weight")))
        continue;
      std::string n = d.name;
      if (ckpt.insert_or_assign(n, ckpt_tensor{std::move(d), i}).second)
        ckpt_order.push_back(std::move(n));
    }
  }

  // ---- 3b. Quantization: weights the checkpoint holds quantized (loaded as they are, with
  // their state tensors), and the Linear weights to quantize on the way in. -------------------
  std::optional<precision::bnb_config> qcfg = opts.quantization;
  if (opts.read_quantization_config)
    if (auto c = detail::checkpoint_quantization_config(checkpoint_path)) {
      if (qcfg && !detail::same_quantization(*qcfg, *c)) {
        std::string s = "load: a quantization config was passed but the checkpoint at " +
                        checkpoint_path.string() +
                        " has its own quantization_config (config.json); the checkpoint's is used";
        warn(s);
        report.warnings.push_back(std::move(s));
      }
      qcfg = *c;
    }
  if (qcfg) qcfg->validate();
  report.quantization = qcfg;
  std::unordered_set<std::string> as_stored;  // loaded byte for byte as the checkpoint has them
  std::unordered_map<std::string, detail::load_item::quant_mode> to_quantize;
  {
    std::vector<std::string> new_order;
    auto has = [&](const std::string& k) { return ckpt.count(k) != 0; };
    for (const auto& n : order) {
      new_order.push_back(n);
      auto& mt = model.at(n);
      const auto cw = ckpt.find(n);
      if (mt.is_buffer || cw == ckpt.end()) continue;
      const auto& wd = cw->second.desc;
      const std::string file = reader.files().files[cw->second.shard].string();
      std::vector<std::string> companions;
      const std::string js = detail::quant_state_key(n, has);
      const std::string scb = detail::scb_key(n);
      if (!js.empty()) {
        const auto h = detail::parse_quant_state_json(
            reader.files().files[ckpt.at(js).shard].string(), js, reader.view(js).bytes);
        if (stowage::shape(std::span<const std::int64_t>(h.shape)) != mt.entry.shape)
          throw model_error("checkpoint " + file + ": quantized `" + n + "` has shape " +
                            stowage::shape(std::span<const std::int64_t>(h.shape)).to_string() +
                            " (its QuantState), the model's is " + mt.entry.shape.to_string());
        if (wd.nbytes() != (h.numel() + 1) / 2)
          throw checkpoint_error(file, n, std::nullopt,
                                 "packed 4-bit weight holds " + std::to_string(wd.nbytes()) +
                                     " bytes, its shape needs " +
                                     std::to_string((h.numel() + 1) / 2));
        for (auto suffix : precision::quant_state_suffixes)
          if (has(n + "." + std::string(suffix)))
            companions.push_back(n + "." + std::string(suffix));
        for (const char* required : {"absmax", "quant_map"})
          if (!has(n + "." + required))
            throw checkpoint_error(file, n + "." + required, std::nullopt,
                                   "bitsandbytes 4-bit state tensor missing");
      } else if (!scb.empty() && has(scb) && wd.dtype == dtype::int8) {
        if (wd.shape != mt.entry.shape)
          throw model_error("checkpoint " + file + ": int8 `" + n + "` has shape " +
                            wd.shape.to_string() + ", the model's is " +
                            mt.entry.shape.to_string());
        const auto& sd = ckpt.at(scb).desc;
        if (sd.dtype != dtype::float32 || sd.shape != stowage::shape{wd.shape[0]})
          throw checkpoint_error(file, scb, std::nullopt,
                                 "LLM.int8 SCB must be float32 [" + std::to_string(wd.shape[0]) +
                                     "], got " + std::string(name(sd.dtype)) + " " +
                                     sd.shape.to_string());
        companions.push_back(scb);
        const std::string fmt = n.substr(0, n.size() - 6) + "weight_format";
        if (has(fmt)) companions.push_back(fmt);
      } else {
        continue;
      }
      ++report.prequantized;
      as_stored.insert(n);
      mt.entry.shape = wd.shape;
      mt.entry.dtype = wd.dtype;
      for (auto& c : companions) {
        if (model.count(c)) continue;
        const auto& cd = ckpt.at(c).desc;
        model.emplace(c, model_tensor{tensor_entry{c, cd.shape, cd.dtype, true}, false});
        as_stored.insert(c);
        new_order.push_back(std::move(c));
      }
    }
    order = std::move(new_order);
    if (qcfg) {
      const auto kind = qcfg->load_in_4bit ? detail::load_item::quant_mode::four_bit
                                           : detail::load_item::quant_mode::int8;
      for (const auto& m : precision::modules_to_quantize(tree, *qcfg, opts.output_embeddings)) {
        std::string w = m + ".weight";
        if (as_stored.count(w) || !model.count(w) || !ckpt.count(w)) continue;
        if (detail::keep_in_fp32(opts.keep_in_fp32_modules, w)) continue;
        // llm_int8_enable_fp32_cpu_offload: Transformers keeps offloaded modules unquantized.
        if (qcfg->llm_int8_enable_fp32_cpu_offload)
          if (const auto d = map.device_for(w);
              d && (d->is_disk() || (d->is_cpu() && main_dev.is_gpu())))
            continue;
        const auto& cd = ckpt.at(w);
        const std::string file = reader.files().files[cd.shard].string();
        if (!is_floating_point(cd.desc.dtype))
          throw checkpoint_error(file, w, std::nullopt,
                                 "quantize on load: weight is " + std::string(name(cd.desc.dtype)) +
                                     ", not floating point (and not a bitsandbytes-quantized "
                                     "weight: no QuantState / SCB found)");
        if (cd.desc.shape.rank() != 2)
          throw checkpoint_error(
              file, w, std::nullopt,
              "quantize on load: a Linear weight must be 2-D, got " + cd.desc.shape.to_string());
        to_quantize.emplace(std::move(w), kind);
      }
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
    const auto quant = to_quantize.find(c);
    if (as_stored.count(c)) {
      to = from;  // packed weights and state tensors are never converted
    } else if (quant != to_quantize.end()) {
      // Converted to this float dtype first, then quantized (QuantState's `dtype`).
      to = opts.dtype && is_floating_point(*opts.dtype) ? *opts.dtype
           : is_floating_point(mt.entry.dtype)          ? mt.entry.dtype
                                                        : from;
      if (to != dtype::float32 && to != dtype::float16 && to != dtype::bfloat16)
        throw model_error("checkpoint " + reader.files().files[cd.shard].string() + ": `" + c +
                          "` would be quantized from " + std::string(name(to)) +
                          " (float32/float16/bfloat16 only)");
    } else if (is_floating_point(from) && opts.dtype) {
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
    if (quant != to_quantize.end()) {
      item->quant = quant->second;
      item->quant_input = to;
      item->original_shape = mt.entry.shape;
      const auto numel = static_cast<std::uint64_t>(mt.entry.shape.numel());
      if (item->quant == detail::load_item::quant_mode::four_bit) {
        const auto ps = precision::packed_shape(numel);
        item->target =
            tensor_desc{c, stowage::shape(std::span<const std::int64_t>(ps)), dtype::uint8};
      } else {
        item->target = tensor_desc{c, mt.entry.shape, dtype::int8};
      }
      ++report.quantized_on_load;
    }
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
                           it->source.desc.dtype == it->target.dtype &&
                           it->quant == detail::load_item::quant_mode::none;
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
  fs::path state_dir;  // where state tensors of weights quantized on load are written
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
      // A weight quantized on load is always rewritten (with its state tensors).
      if (e && it->quant == detail::load_item::quant_mode::none &&
          detail::entry_matches(*e, *it, *folder))
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
      state_dir = write_dir;
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
  // Host tensors are carved from one arena (2 MiB-aligned, huge pages on all of it), freed when
  // the last of them goes; an exception before the result exists frees it with `stores`.
  std::shared_ptr<storage::host_arena> arena;
  {
    std::size_t host_bytes = 0;
    for (const auto& it : items)
      if (it->kind == storage_kind::host)
        host_bytes += (std::max<std::size_t>(storage::tensor_storage::byte_count(it->target), 1) +
                       storage::default_alignment - 1) /
                      storage::default_alignment * storage::default_alignment;
    if (host_bytes) {
      arena = std::make_shared<storage::host_arena>(host_bytes, opts.transparent_huge_pages);
      // Off means 4 KiB pages even where THP is `always` (the arena is 2 MiB-aligned).
      if (!opts.transparent_huge_pages) arena->advise_huge_pages(false);
    }
  }
  std::vector<storage::tensor_storage> stores(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto& it = *items[i];
    switch (it.kind) {
      case storage_kind::host:
        stores[i] = storage::tensor_storage::allocate_host(it.target, arena);
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
  detail::huge_page_probe huge_probe;
  huge_probe.active.store(opts.transparent_huge_pages);
  const detail::huge_window_test windows;
  // Populates a host destination chunk; while the probe runs, times it, and on a slow verdict
  // turns huge pages off for every host storage (what is already faulted in stays as it is).
  auto populate_host = [&](std::byte* p, std::size_t n) {
    if (!huge_probe.active.load(std::memory_order_relaxed) || n < (std::size_t{2} << 20)) {
      detail::populate_write(p, n);
      return;
    }
    const double c0 = detail::huge_page_probe::thread_cpu_seconds();
    detail::populate_write(p, n);
    if (huge_probe.record(n, detail::huge_page_probe::thread_cpu_seconds() - c0) && arena)
      arena->advise_huge_pages(false);
  };
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
    const auto numel = static_cast<std::uint64_t>(it.source.desc.numel());
    std::uint64_t per = std::max<std::uint64_t>(1, chunk_bytes / std::max<std::size_t>(es, 1));
    if (it.quant != detail::load_item::quant_mode::none) {
      // Chunks hold whole blocks (4-bit) or whole rows (int8): each is quantized on its own.
      const std::uint64_t unit = it.quant == detail::load_item::quant_mode::four_bit
                                     ? qcfg->blocksize
                                     : static_cast<std::uint64_t>(it.original_shape[1]);
      per = std::max<std::uint64_t>(unit, per / unit * unit);
      it.scales.assign(it.quant == detail::load_item::quant_mode::four_bit
                           ? static_cast<std::size_t>(precision::blocks_4bit(numel, unit))
                           : static_cast<std::size_t>(it.original_shape[0]),
                       0.0f);
    }
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
    std::vector<std::byte> staging, qstaging;
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
        const bool quantized = it.quant != detail::load_item::quant_mode::none;
        const bool four_bit = it.quant == detail::load_item::quant_mode::four_bit;
        // Memory destinations of tensors copied unchanged read the checkpoint with pread,
        // straight into the destination: one copy, no source page mapped. A conversion reads
        // the mapping instead (and drops each chunk's pages after it): the page cache's large
        // folios map as 2 MiB pages, so that costs a fault per 2 MiB, where pread would add a
        // kernel copy of every source byte (the largest CPU cost of an fp32 -> bf16 load after
        // faulting in the destination).
        const bool streamed =
            !quantized && from == to && it.source.zero_copy() && it.source.file &&
            it.source.file->fd() >= 0 &&
            (it.kind == storage_kind::host || it.kind == storage_kind::pinned_host);
        const auto in_n = static_cast<std::size_t>(t.count * in_es);
        const auto out_n =
            static_cast<std::size_t>(four_bit ? (t.count + 1) / 2 : t.count * out_es);
        // Read ahead: the next chunk this worker is likely to take, unless its first and last
        // pages are in the page cache already (a warm checkpoint: the hint would only walk the
        // cache, ~13% of a warm load's CPU).
        if (k + threads < tasks.size()) {
          const auto& nt = tasks[k + threads];
          const auto& ni = *items[nt.item];
          if (ni.source.zero_copy() && ni.source.file && nt.count > 0) {
            const std::size_t nes = element_size(ni.source.desc.dtype);
            const std::uint64_t first = ni.source.file_offset + nt.begin * nes;
            const auto bytes = static_cast<std::size_t>(nt.count * nes);
            const int nfd = ni.source.file->fd();
            if (nfd < 0 || !detail::byte_cached(nfd, first) ||
                !detail::byte_cached(nfd, first + bytes - 1))
              ni.source.file->advise(checkpoint::access_hint::will_need, first, bytes);
          }
        }
        if (quantized) {
          // Convert the chunk to the float dtype the weight is quantized from (as Transformers
          // does: the weight is `dtype` before Linear4bit/Int8Params quantizes it), then
          // quantize straight into the packed storage (or a staging buffer for disk / GPU).
          const dtype qin = it.quant_input;
          const std::byte* in = src;
          if (it.source.zero_copy()) detail::populate_read(src, in_n);
          if (from != qin) {
            const auto need = static_cast<std::size_t>(t.count * element_size(qin));
            if (staging.size() < need) staging.resize(need);
            detail::convert_chunk(src, from, staging.data(), qin,
                                  static_cast<std::size_t>(t.count));
            in = staging.data();
          }
          const std::uint64_t out_off = four_bit ? t.begin / 2 : t.begin;
          std::byte* dst = nullptr;
          if (it.kind == storage_kind::host || it.kind == storage_kind::pinned_host) {
            dst = static_cast<std::byte*>(stores[t.item].mutable_data()) + out_off;
            populate_host(dst, out_n);
          } else {
            if (qstaging.size() < out_n) qstaging.resize(out_n);
            dst = qstaging.data();
          }
          detail::quantize_chunk(it, *qcfg, in, qin, t.begin, t.count, dst, it.scales.data());
          if (it.kind == storage_kind::file) {
            detail::write_all_at(it.fd, dst, out_n, out_off, it.write_path, opts);
            written.fetch_add(out_n, std::memory_order_relaxed);
          }
#if defined(STOWAGE_WITH_CUDA)
          if (it.kind == storage_kind::device)
            storage::cuda_check(
                cudaMemcpy(static_cast<std::byte*>(stores[t.item].mutable_data()) + out_off, dst,
                           out_n, cudaMemcpyHostToDevice),
                "load: cudaMemcpy to GPU");
#endif
        } else
          switch (it.kind) {
            case storage_kind::host:
            case storage_kind::pinned_host: {
              auto* dst = static_cast<std::byte*>(stores[t.item].mutable_data()) + t.begin * out_es;
              populate_host(dst, out_n);
              if (streamed) {
                // pread the checkpoint bytes straight into the destination (no page-table work
                // for the source, nothing of it resident).
                detail::pread_exact(it.source.file->fd(), dst, in_n,
                                    it.source.file_offset + t.begin * in_es,
                                    it.source.file->path());
              } else if (it.source.zero_copy() && it.source.file && it.source.file->fd() >= 0 &&
                         windows.available()) {
                detail::check_still_mapped(it.source.file->fd(), in_n,
                                           it.source.file_offset + t.begin * in_es,
                                           it.source.file->path());
                detail::convert_mapped_chunk(*it.source.file, src,
                                             it.source.file_offset + t.begin * in_es, from, dst, to,
                                             t.count, windows, staging);
              } else {
                if (it.source.zero_copy() && it.source.file)
                  detail::check_still_mapped(it.source.file->fd(), in_n,
                                             it.source.file_offset + t.begin * in_es,
                                             it.source.file->path());
                detail::convert_chunk(src, from, dst, to, static_cast<std::size_t>(t.count), true);
              }
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
              storage::cuda_check(
                  cudaMemcpy(
                      static_cast<std::byte*>(stores[t.item].mutable_data()) + t.begin * out_es,
                      pinned.get(), out_n, cudaMemcpyHostToDevice),
                  "load: cudaMemcpy to GPU");
#endif
              break;
            }
          }
        if (it.source.zero_copy() && !streamed) detail::drop_pages(src, in_n);
        stored.fetch_add(out_n, std::memory_order_relaxed);
        bar.add_bytes(in_n);
        if (it.chunks_left.fetch_sub(1) == 1) {
          if (quantized) {
            detail::finish_quantized(it, *qcfg);
            if (it.kind == storage_kind::file)
              for (auto& st : it.states) {
                // State tensors go next to the packed weight, committed with the folder.
                if (st.desc.name.find('/') != std::string::npos)
                  throw io_error(folder->string(),
                                 "tensor `" + st.desc.name + "` cannot be used as a file name");
                st.final_path = *folder / (st.desc.name + ".dat");
                st.write_path = merge ? *folder / (st.desc.name + ".dat.stowage-tmp-" +
                                                   std::to_string(::getpid()))
                                      : state_dir / (st.desc.name + ".dat");
                const int fd =
                    ::open(st.write_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd < 0)
                  throw io_error(st.write_path.string(),
                                 std::string("cannot create: ") + std::strerror(errno));
                try {
                  detail::write_all_at(fd, reinterpret_cast<const std::byte*>(st.bytes.data()),
                                       st.bytes.size(), 0, st.write_path, opts);
                  if (::fsync(fd) != 0)
                    throw io_error(st.write_path.string(),
                                   std::string("cannot fsync: ") + std::strerror(errno));
                } catch (...) {
                  ::close(fd);
                  throw;
                }
                if (::close(fd) != 0)
                  throw io_error(st.write_path.string(),
                                 std::string("cannot close: ") + std::strerror(errno));
                written.fetch_add(st.bytes.size(), std::memory_order_relaxed);
              }
          }
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
      for (const auto& st : it.states) {
        nlohmann::ordered_json se = nlohmann::ordered_json::object();
        se["dtype"] = storage::detail::offload_dtype_name(st.desc.dtype);
        se["shape"] = nlohmann::ordered_json::array();
        for (auto x : st.desc.shape) se["shape"].push_back(x);
        if (index.contains(st.desc.name) && index[st.desc.name] != se)
          replaced.push_back(st.desc.name);
        index[st.desc.name] = std::move(se);
      }
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
        for (auto& st : it->states) {
          if (st.write_path.empty() || st.write_path == st.final_path) continue;
          if (::rename(st.write_path.c_str(), st.final_path.c_str()) != 0)
            throw io_error(st.final_path.string(),
                           std::string("cannot rename into place: ") + std::strerror(errno));
          st.write_path = st.final_path;
        }
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
  for (std::size_t i = 0; i < items.size(); ++i) {
    out.weights.add(std::move(stores[i]));
    // A weight quantized on load: its state tensors, in bitsandbytes' state-dict order, in the
    // same backend as the packed weight.
    auto& it = *items[i];
    for (auto& st : it.states) {
      storage::tensor_storage s;
      switch (it.kind) {
        case storage_kind::file:
          s = storage::tensor_storage::from_file(
              st.desc, storage::file_region(*folder / (st.desc.name + ".dat"), 0, st.bytes.size()));
          break;
        case storage_kind::device:
#if defined(STOWAGE_WITH_CUDA)
          s = storage::tensor_storage::allocate_device(
              st.desc, it.placement.is_gpu() ? it.placement.index() : main_dev.index());
          storage::cuda_check(cudaMemcpy(s.mutable_data(), st.bytes.data(), st.bytes.size(),
                                         cudaMemcpyHostToDevice),
                              "load: cudaMemcpy to GPU");
#endif
          break;
        case storage_kind::pinned_host:
        case storage_kind::host:
          s = it.kind == storage_kind::host ? storage::tensor_storage::allocate_host(st.desc)
                                            : storage::tensor_storage::allocate_pinned(st.desc);
          if (!st.bytes.empty()) std::memcpy(s.mutable_data(), st.bytes.data(), st.bytes.size());
          break;
      }
      ++report.tensors_loaded;
      out.weights.add(std::move(s));
      std::vector<std::uint8_t>().swap(st.bytes);
    }
  }
  for (const auto& it : items)
    for (const auto& a : it->aliases) out.weights.alias(a, it->name);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.report = std::move(report);
  return out;
}

namespace detail {

/// A typed model whose precision policy is quantized (llama_for_causal_lm<precision::nf4<>>):
/// unless the caller says otherwise, the policy drives quantize-on-load (bnb_config_for<P>)
/// and floating tensors take its compute dtype (Transformers' from_pretrained(dtype=compute,
/// quantization_config=...)).
template <class Model>
load_options typed_load_options(const load_options& opts) {
  if constexpr (requires { typename Model::precision_type; }) {
    using P = typename Model::precision_type;
    if constexpr (stowage::is_quantized_v<P>) {
      load_options o = opts;
      if (!o.quantization) o.quantization = bnb_config_for<P>();
      if (!o.dtype) o.dtype = P::compute_dtype;
      return o;
    }
  }
  return opts;
}

}  // namespace detail

/// Typed models: the same, on to_module_tree(model); a quantized precision policy quantizes
/// on load (see detail::typed_load_options).
template <module_type Model>
loaded_weights load_checkpoint_in_model(const Model& model,
                                        const std::filesystem::path& checkpoint_path,
                                        const device_map& map, const load_options& opts = {}) {
  return load_checkpoint_in_model(to_module_tree(model), checkpoint_path, map,
                                  detail::typed_load_options<Model>(opts));
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
  return load_checkpoint_and_dispatch(to_module_tree(model), checkpoint_path, map,
                                      detail::typed_load_options<Model>(opts));
}

}  // namespace stowage
