// stowage/dispatch/offload.hpp: running a dispatched model. Three pieces, all over the
// dispatched_weights that load_checkpoint_and_dispatch returns:
//   - the hook table (accelerate-spec §7.1-§7.3): one hook per placed block with its execution
//     device (its GPU, else the main device = first GPU of the map, else "cpu"), whether its
//     weights are offloaded (brought in before each call), and io_same_device on the root, so
//     outputs come back on the input's device;
//   - block_prefetcher: brings file-backed blocks in AHEAD of use. While block i computes,
//     background reader threads read the next blocks with large pread()s (O_DIRECT for bytes
//     not in the page cache) into a ring of reusable buffers, one per block in flight: no page
//     faults, no mapping and unmapping, no page-cache copy when cold. (The mapped alternative:
//     MADV_WILLNEED + MADV_POPULATE_READ on the file mapping, pages released after use.) At
//     most `blocks_in_flight` blocks are requested-and-not-released at any time, so disk reads
//     overlap compute and memory stays bounded whatever the model size. accelerate has no
//     prefetch at all (§9.17);
//   - offloaded_llama_weights: the llama_weights_source the CPU forward reads, giving each
//     decoder layer its weights on its execution device through the prefetcher. Tied
//     parameters share one storage (the weight_store's alias), so they are one copy wherever
//     they live.
// And the tutorial entry points on the same machinery: dispatch_model (re-place a loaded
// model by a new device map), cpu_offload and disk_offload.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/dispatch/load.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/exec/cpu/weight_ref.hpp>
#include <stowage/exec/llama_forward.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/placement/devices.hpp>
#include <stowage/placement/max_memory.hpp>
#include <stowage/storage/file.hpp>
#include <stowage/storage/offload_folder.hpp>
#include <stowage/storage/tensor_storage.hpp>
#if defined(STOWAGE_WITH_CUDA)
#include <stowage/storage/device.hpp>
#endif

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace stowage {

// ---------------------------------------------------------------------------------------------
// Hooks (accelerate §7.3, dict form as dispatch_model uses it).

/// One hook: what accelerate's AlignDevicesHook on a placed block would do.
struct block_hook {
  std::string module;                       ///< the device-map key it serves ("" = the whole model)
  device placement = device::cpu();         ///< the map's value for it
  device execution_device = device::cpu();  ///< where it computes
  bool offload = false;              ///< its weights are brought to the execution device per call
  bool io_same_device = false;       ///< outputs are sent back to the input's device (root hook)
  std::vector<std::string> tensors;  ///< every tensor name it covers (aliases included)
};

/// The hooks of a dispatched model, in the device map's order, then the root hook when the
/// map has no "" key (accelerate adds hook(main device, io_same_device) on the root).
struct hook_table {
  device main_device = device::cpu();
  std::vector<block_hook> hooks;
  /// Tie groups: each lists names that share ONE storage (materialised once per device).
  std::vector<std::vector<std::string>> tied_groups;

  const block_hook* find(std::string_view module) const {
    for (const auto& h : hooks)
      if (h.module == module) return &h;
    return nullptr;
  }
  /// The hook whose block covers tensor `name` (longest key), nullptr when none does.
  const block_hook* hook_for_tensor(std::string_view name) const {
    const block_hook* best = nullptr;
    for (const auto& h : hooks) {
      if (h.tensors.empty()) continue;
      if (covers(h.module, name) && (!best || h.module.size() > best->module.size())) best = &h;
    }
    return best;
  }
};

/// Builds the hooks accelerate's dispatch_model attaches (§7.1 step 3, §7.3). `main_override`
/// replaces the main device (cpu_offload / disk_offload name their execution device).
inline hook_table make_hooks(const dispatched_weights& w,
                             std::optional<device> main_override = std::nullopt) {
  hook_table t;
  t.main_device = main_override ? *main_override : w.main_device();
  // Offloaded set: {"disk"} when the main device is the CPU, else {"cpu", "disk"} (§7.1).
  auto offloaded = [&](device d) { return d.is_disk() || (d.is_cpu() && !t.main_device.is_cpu()); };
  std::unordered_map<std::string, std::size_t> by_key;
  for (const auto& [k, d] : w.map()) {
    block_hook h;
    h.module = k;
    h.placement = d;
    h.execution_device = d.is_accelerator() ? d : t.main_device;
    h.offload = offloaded(d);
    h.io_same_device = k.empty();
    by_key.emplace(k, t.hooks.size());
    t.hooks.push_back(std::move(h));
  }
  // Every stored name goes to the hook of the longest key covering it.
  for (const auto& n : w.weights().names()) {
    std::size_t best = t.hooks.size(), best_len = 0;
    for (std::size_t i = 0; i < t.hooks.size(); ++i) {
      const auto& k = t.hooks[i].module;
      if (covers(k, n) && (best == t.hooks.size() || k.size() > best_len)) {
        best = i;
        best_len = k.size();
      }
    }
    if (best < t.hooks.size()) t.hooks[best].tensors.push_back(n);
  }
  if (!by_key.count("")) {
    block_hook root;
    root.module = "";
    root.placement = t.main_device;
    root.execution_device = t.main_device;
    root.io_same_device = true;
    t.hooks.push_back(std::move(root));
  }
  // Tie groups from the store: names sharing one storage.
  std::unordered_map<const storage::tensor_storage*, std::vector<std::string>> groups;
  std::vector<const storage::tensor_storage*> order;
  for (const auto& n : w.weights().names()) {
    const auto* s = w.weights().find(n);
    auto& g = groups[s];
    if (g.empty()) order.push_back(s);
    g.push_back(n);
  }
  for (const auto* s : order)
    if (groups[s].size() > 1) t.tied_groups.push_back(groups[s]);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Prefetch.

/// How offloaded blocks are brought in.
struct offload_options {
  /// Blocks requested and not yet released at once (the one computing included); >= 1.
  /// 2 = double buffering: block i + 1 is read while block i computes; 3 (the default) keeps
  /// one more block's reads queued at the disk: slack for one slow read, for one more block of
  /// memory (cold forwards with 2-6 measured within noise, 1 ~40% slower: docs/performance.md
  /// "Disk offload").
  std::size_t blocks_in_flight = 3;
  /// Read ahead on a background thread (MADV_WILLNEED + MADV_POPULATE_READ); false: only
  /// MADV_WILLNEED from the calling thread, pages fault in during compute.
  bool background_reader = true;
  /// Drop a finished block's pages from the resident set (they stay in the page cache).
  bool release_after_use = true;
  /// After the last block, start on the first again (the next forward's first block arrives
  /// during this one's tail): decode reads every block every token.
  bool wrap_around = true;
  /// With the background reader: read each block with large pread()s into one of
  /// blocks_in_flight reusable buffers (a block's regions coalesced where they are adjacent in
  /// a file) instead of mapping the file: no page faults, no mapping or unmapping, and bytes
  /// not already in the page cache are read with O_DIRECT (no page-cache copy; buffered
  /// pread where the file system refuses it). false: the pages of the file mapping are
  /// populated and released (MADV_POPULATE_READ / MADV_DONTNEED).
  bool read_into_buffers = true;
  /// Reader threads of read_into_buffers: each block is read in `read_chunk_bytes` pieces by
  /// this many threads at once, so the disk always has several pieces queued (cold O_DIRECT
  /// reads of the 803 MB bench checkpoint on the dev VM, busy: 4 x 8 MiB 0.39-0.44 s, 2 x 16
  /// MiB 0.56-0.64 s, one 64 MiB read at a time 0.61 s). The threads sleep in the reads.
  std::size_t reader_threads = 4;
  std::size_t read_chunk_bytes = std::size_t{8} << 20;
  /// read_into_buffers: true: bytes not in the page cache are read with O_DIRECT (no
  /// page-cache copy, nothing evicted to make room; every forward reads them from the disk
  /// again). false: buffered pread (the page cache keeps them for the next forward). Unset
  /// (the default): O_DIRECT only when the file-backed blocks together exceed half of the RAM
  /// available now — then the page cache could not keep them from one forward to the next
  /// anyway (a cyclic scan larger than the cache never hits), so caching would only cost a copy
  /// and evict other memory; smaller offloaded weights stay cached and later tokens read RAM.
  std::optional<bool> direct_io = std::nullopt;
};

/// What the prefetcher did (tests prove the bound on blocks in flight with these).
struct prefetch_stats {
  std::size_t max_in_flight = 0;  ///< most blocks requested-and-not-released at once
  std::size_t requests = 0;       ///< block fetches started
  std::size_t waits = 0;          ///< acquires that had to wait for the reader
  std::size_t releases = 0;       ///< blocks whose pages were released
  std::uint64_t bytes_requested = 0;
};

namespace detail {
/// Page-aligned cover of a region's bytes.
inline std::pair<void*, std::size_t> region_pages(const storage::file_region& r) noexcept {
  if (r.size() == 0) return {nullptr, 0};
  const auto page = static_cast<std::uintptr_t>(storage::detail::page_size());
  const auto b = reinterpret_cast<std::uintptr_t>(r.data());
  const std::uintptr_t lo = b / page * page;
  const std::uintptr_t hi = (b + r.size() + page - 1) / page * page;
  return {reinterpret_cast<void*>(lo), hi - lo};
}

/// Brings a region's pages into memory and maps them: one MADV_POPULATE_READ (the kernel
/// reads in large requests), else one read per page.
inline void populate_region(const storage::file_region& r) noexcept {
  const auto [p, n] = region_pages(r);
  if (!p) return;
#if defined(MADV_POPULATE_READ)
  if (::madvise(p, n, MADV_POPULATE_READ) == 0) return;
#endif
  const std::size_t page = storage::detail::page_size();
  volatile std::uint8_t sink = 0;
  for (std::size_t off = 0; off < r.size(); off += page)
    sink = static_cast<std::uint8_t>(sink ^ std::to_integer<std::uint8_t>(r.data()[off]));
  (void)sink;
}

/// Alignment of the reads into block buffers: O_DIRECT needs offsets, lengths and buffer
/// addresses on the device's logical block size (4096 covers every common one). A region's
/// bytes keep their file offset modulo 4096 in the buffer, so the kernels see the same
/// alignment as through the page-aligned mapping.
inline constexpr std::uint64_t read_align = 4096;

/// One read of a block: [offset, offset + length) of `path` into the block's buffer at
/// `buffer_offset`; offset, length and buffer_offset are multiples of read_align, and the
/// file must hold at least `needed` bytes from offset (the rest may lie past its end).
struct block_read {
  std::filesystem::path path;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::uint64_t needed = 0;
  std::size_t buffer_offset = 0;
};

/// Where a block's regions land in its buffer.
struct block_layout {
  std::vector<block_read> reads;
  std::vector<std::size_t> region_offset;  ///< per region (the block's order): first byte
  std::size_t bytes = 0;                   ///< buffer size the block needs
};

/// Coalesces a block's regions: sorted by file and offset, regions whose aligned covers touch
/// or lie within `merge_gap` bytes of each other become one read (a decoder layer's tensors
/// are adjacent in a safetensors file: one read per layer).
inline block_layout plan_block_reads(const std::vector<const storage::file_region*>& regions,
                                     std::uint64_t merge_gap = 64 * 1024) {
  block_layout l;
  l.region_offset.assign(regions.size(), 0);
  std::vector<std::size_t> order(regions.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (regions[a]->path() != regions[b]->path()) return regions[a]->path() < regions[b]->path();
    return regions[a]->offset() < regions[b]->offset();
  });
  std::vector<std::size_t> read_of(regions.size(), 0);
  for (std::size_t i : order) {
    const auto* r = regions[i];
    const std::uint64_t lo = r->offset() / read_align * read_align;
    const std::uint64_t end = r->offset() + r->size();
    const std::uint64_t hi = (end + read_align - 1) / read_align * read_align;
    if (!l.reads.empty() && l.reads.back().path == r->path() &&
        lo <= l.reads.back().offset + l.reads.back().length + merge_gap) {
      auto& cur = l.reads.back();
      cur.length = std::max(cur.offset + cur.length, hi) - cur.offset;
      cur.needed = std::max(cur.needed, end - cur.offset);
    } else {
      const std::size_t at = l.reads.empty() ? 0
                                             : l.reads.back().buffer_offset +
                                                   static_cast<std::size_t>(l.reads.back().length);
      l.reads.push_back(block_read{r->path(), lo, hi - lo, end - lo, at});
    }
    read_of[i] = l.reads.size() - 1;
  }
  for (std::size_t i = 0; i < regions.size(); ++i) {
    const auto& rd = l.reads[read_of[i]];
    l.region_offset[i] =
        rd.buffer_offset + static_cast<std::size_t>(regions[i]->offset() - rd.offset);
  }
  if (!l.reads.empty())
    l.bytes = l.reads.back().buffer_offset + static_cast<std::size_t>(l.reads.back().length);
  return l;
}

/// A page-aligned anonymous buffer, its pages faulted in once when made (a reused block
/// buffer never faults again). Move-only.
class read_buffer {
 public:
  read_buffer() = default;
  explicit read_buffer(std::size_t bytes) {
    if (bytes == 0) return;
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw io_error("(block buffer)",
                     "cannot allocate " + std::to_string(bytes) +
                         " bytes for an offloaded block: " + std::strerror(errno));
    data_ = static_cast<std::byte*>(p);
    size_ = bytes;
    // Huge pages where the system allows them (fewer faults to make it, fewer TLB misses for
    // the kernels reading it), then every page made now rather than on the first read.
#if defined(MADV_HUGEPAGE)
    ::madvise(p, bytes, MADV_HUGEPAGE);
#endif
#if defined(MADV_POPULATE_WRITE)
    if (::madvise(p, bytes, MADV_POPULATE_WRITE) == 0) return;
#endif
    const std::size_t page = storage::detail::page_size();
    for (std::size_t off = 0; off < bytes; off += page) data_[off] = std::byte{0};
  }
  read_buffer(const read_buffer&) = delete;
  read_buffer& operator=(const read_buffer&) = delete;
  read_buffer(read_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  read_buffer& operator=(read_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~read_buffer() { reset(); }
  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  void reset() noexcept {
    if (data_) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Whether every page of [offset, offset + length) of the open file is in the page cache
/// (Linux cachestat, 6.5+); false when it cannot tell.
inline bool range_cached(int fd, std::uint64_t offset, std::uint64_t length) noexcept {
#if defined(__linux__)
  struct range_arg {
    std::uint64_t off, len;
  } range{offset, length};
  struct stat_out {
    std::uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
  } st{};
  constexpr long sys_cachestat = 451;  // the same number on every Linux architecture
  if (::syscall(sys_cachestat, fd, &range, &st, 0) != 0) return false;
  const std::uint64_t page = storage::detail::page_size();
  return st.nr_cache >= (length + page - 1) / page;
#else
  (void)fd, (void)offset, (void)length;
  return false;
#endif
}

/// The automatic direct_io rule: O_DIRECT pays when the file-backed blocks exceed half of the
/// RAM available now (the page cache could not keep them between forwards). Unknown RAM: no.
inline bool direct_io_pays(std::uint64_t file_bytes) {
  const auto avail = available_host_memory();
  return avail && *avail > 0 && file_bytes > static_cast<std::uint64_t>(*avail) / 2;
}

/// The files a prefetcher reads, each opened once (a buffered descriptor, and an O_DIRECT one
/// when wanted) and shared by its reader threads, instead of two open() and close() per
/// piece: pread needs no descriptor of its own per thread. Closed when the prefetcher goes.
class read_files {
 public:
  struct handles {
    int buffered = -1;
    int direct = -1;  ///< -1: not wanted, refused by the file system, or refused at read time
  };
  read_files() = default;
  read_files(const read_files&) = delete;
  read_files& operator=(const read_files&) = delete;
  ~read_files() {
    for (auto& [path, e] : files_) {
      if (e.direct >= 0) ::close(e.direct);
      if (e.buffered >= 0) ::close(e.buffered);
    }
  }

  /// path's descriptors, opened at first use; io_error naming the file when it cannot be.
  handles get(const std::filesystem::path& path, bool want_direct) {
    std::lock_guard lock(m_);
    auto it = files_.find(path.native());
    if (it == files_.end()) {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0)
        throw io_error(path.string(), std::string("cannot open: ") + std::strerror(errno));
      it = files_.emplace(path.native(), entry{fd, -1, false, false}).first;
    }
    entry& e = it->second;
#if defined(O_DIRECT)
    if (want_direct && !e.direct_tried) {
      e.direct_tried = true;  // a file system without O_DIRECT (tmpfs) refuses it at open
      e.direct = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    }
#endif
    return {e.buffered, want_direct && !e.direct_refused ? e.direct : -1};
  }
  /// The file system refused an O_DIRECT read of path: buffered reads from now on (the
  /// descriptor stays open until the end: another reader may be using it right now).
  void refuse_direct(const std::filesystem::path& path) {
    std::lock_guard lock(m_);
    if (const auto it = files_.find(path.native()); it != files_.end())
      it->second.direct_refused = true;
  }

 private:
  struct entry {
    int buffered, direct;
    bool direct_tried, direct_refused;
  };
  std::mutex m_;
  std::unordered_map<std::filesystem::path::string_type, entry> files_;
};

/// Reads [offset, offset + length) of `path` into `dst` (length and offset multiples of
/// read_align, dst aligned to it): with O_DIRECT unless the range is already in the page cache
/// or the file system refuses it, then buffered. Stops at the end of the file; io_error when
/// the file holds fewer than `needed` bytes from offset, or on a read error.
inline void read_piece(read_files& files, const std::filesystem::path& path, std::uint64_t offset,
                       std::uint64_t length, std::uint64_t needed, std::byte* dst,
                       bool direct_io = true) {
  const auto h = files.get(path, direct_io);
  const int direct = h.direct >= 0 && !range_cached(h.buffered, offset, length) ? h.direct : -1;
  bool use_direct_fd = direct >= 0;
  std::uint64_t done = 0;
  int err = 0;
  while (done < length) {
    const bool use_direct = use_direct_fd && done % read_align == 0;
    const ssize_t n =
        ::pread(use_direct ? direct : h.buffered, dst + done,
                static_cast<std::size_t>(length - done), static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (use_direct && errno == EINVAL) {  // refused at read time: buffered from here on
        files.refuse_direct(path);
        use_direct_fd = false;
        continue;
      }
      err = errno;
      break;
    }
    if (n == 0) break;  // end of file
    done += static_cast<std::uint64_t>(n);
  }
  if (err != 0)
    throw io_error(path.string(), "cannot read " + std::to_string(length) + " bytes at offset " +
                                      std::to_string(offset) + ": " + std::strerror(err));
  if (done < needed)
    throw io_error(path.string(), "file ends " + std::to_string(offset + done) +
                                      " bytes in; an offloaded block needs bytes up to " +
                                      std::to_string(offset + needed));
}
}  // namespace detail

/// Brings a ring of blocks (each a list of file regions) in ahead of use, bounded.
/// acquire(u) before block u computes, release(u) after; while u is acquired, data(u, p) says
/// where the byte a region's mapping has at p is to be read (in u's buffer when the block was
/// read into one, else p itself). Blocks with no file regions are resident and cost nothing.
/// Thread-safe for one consumer.
class block_prefetcher {
 public:
  block_prefetcher(std::vector<std::vector<const storage::file_region*>> blocks,
                   offload_options o = {})
      : blocks_(std::move(blocks)),
        opts_(o),
        state_(blocks_.size(), state::idle),
        advised_(blocks_.size(), false) {
    if (opts_.blocks_in_flight == 0)
      throw invalid_config("offload_options::blocks_in_flight must be at least 1");
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      if (!blocks_[i].empty()) file_blocks_.push_back(i);
    if (!opts_.background_reader || file_blocks_.empty()) return;
    if (!opts_.read_into_buffers) {
      readers_.emplace_back([this] { run(); });
      return;
    }
    if (opts_.reader_threads == 0)
      throw invalid_config(
          "offload_options::reader_threads must be at least 1 with "
          "read_into_buffers");
    if (opts_.read_chunk_bytes < detail::read_align)
      throw invalid_config("offload_options::read_chunk_bytes must be at least " +
                           std::to_string(detail::read_align));
    buffered_ = true;
    chunk_ = opts_.read_chunk_bytes / detail::read_align * detail::read_align;
    layouts_.resize(blocks_.size());
    std::vector<std::size_t> sizes;
    for (std::size_t b : file_blocks_) {
      layouts_[b] = detail::plan_block_reads(blocks_[b]);
      sizes.push_back(layouts_[b].bytes);
    }
    // One buffer per block in flight, sized to the largest blocks: any blocks_in_flight blocks
    // fit (the memory the mapped pages of those blocks would take), made once, reused.
    std::uint64_t file_bytes = 0;
    for (std::size_t sz : sizes) file_bytes += sz;
    direct_io_ = opts_.direct_io.value_or(detail::direct_io_pays(file_bytes));
    std::sort(sizes.begin(), sizes.end(), std::greater<>());
    sizes.resize(std::min(sizes.size(), opts_.blocks_in_flight));
    for (std::size_t s : sizes) slots_.emplace_back(s);
    slot_free_.assign(slots_.size(), true);
    slot_of_.assign(blocks_.size(), no_slot);
    pending_.assign(blocks_.size(), 0);
    errors_.resize(blocks_.size());
    try {
      for (std::size_t t = 0; t < opts_.reader_threads; ++t)
        readers_.emplace_back([this] { read_loop(); });
    } catch (...) {
      stop_readers();
      throw;
    }
  }
  block_prefetcher(const block_prefetcher&) = delete;
  block_prefetcher& operator=(const block_prefetcher&) = delete;
  ~block_prefetcher() { stop_readers(); }

  std::size_t size() const noexcept { return blocks_.size(); }
  bool file_backed(std::size_t u) const { return !blocks_.at(u).empty(); }
  /// Whether blocks are read into buffers (else served from the file mappings).
  bool reads_into_buffers() const noexcept { return buffered_; }
  /// Whether uncached bytes are read with O_DIRECT (offload_options::direct_io, resolved).
  bool direct_io() const noexcept { return buffered_ && direct_io_; }

  /// Block u is about to compute: make sure it and the next file-backed blocks (up to
  /// blocks_in_flight in all) are requested, then wait until u's bytes are in. io_error when
  /// reading u failed (u is then released; a later acquire reads it again).
  void acquire(std::size_t u) {
    check(u);
    std::unique_lock lock(m_);
    std::vector<std::size_t> want;
    for (std::size_t step = 0; step < blocks_.size() && want.size() < opts_.blocks_in_flight;
         ++step) {
      const std::size_t v = u + step;
      if (v >= blocks_.size() && !opts_.wrap_around) break;
      const std::size_t b = v % blocks_.size();
      if (!blocks_[b].empty()) want.push_back(b);
    }
    for (std::size_t b : want)
      if (state_[b] == state::idle) request(b, lock);
    if (blocks_[u].empty()) return;
    if (state_[u] != state::ready) {
      ++stats_.waits;
      cv_done_.wait(lock, [&] { return state_[u] == state::ready; });
    }
    if (buffered_ && errors_[u]) {
      const auto e = std::exchange(errors_[u], nullptr);
      free_block(u);
      std::rethrow_exception(e);
    }
  }

  /// Block u is done: its pages leave the resident set (or its buffer is free again) and its
  /// slot is free.
  void release(std::size_t u) {
    check(u);
    std::unique_lock lock(m_);
    if (blocks_[u].empty() || state_[u] == state::idle) return;
    // A block still being read is released after the reader is done with it.
    cv_done_.wait(lock, [&] { return state_[u] != state::requested; });
    if (buffered_) errors_[u] = nullptr;
    if (opts_.release_after_use && !buffered_)
      for (const auto* r : blocks_[u]) r->release_pages();
    free_block(u);
    ++stats_.releases;
  }

  /// Where to read the byte that block u's region mappings hold at `p`, while u is acquired:
  /// in u's buffer when it was read into one, else `p` itself (the mapping stays valid, so a
  /// pointer outside u's regions, or a block not read into a buffer, is served from there).
  const std::byte* data(std::size_t u, const std::byte* p) const {
    check(u);
    std::lock_guard lock(m_);
    if (!buffered_ || !p || state_[u] != state::ready || slot_of_[u] == no_slot) return p;
    const auto at = reinterpret_cast<std::uintptr_t>(p);
    for (std::size_t i = 0; i < blocks_[u].size(); ++i) {
      const auto* r = blocks_[u][i];
      const auto lo = reinterpret_cast<std::uintptr_t>(r->data());
      if (r->size() == 0 || at < lo || at - lo >= r->size()) continue;
      return slots_[slot_of_[u]].data() + layouts_[u].region_offset[i] + (at - lo);
    }
    return p;
  }

  /// Blocks requested and not released now.
  std::size_t in_flight() const {
    std::lock_guard lock(m_);
    return in_flight_;
  }
  prefetch_stats stats() const {
    std::lock_guard lock(m_);
    return stats_;
  }
  const offload_options& options() const noexcept { return opts_; }

 private:
  enum class state : std::uint8_t { idle, requested, ready };
  static constexpr std::size_t no_slot = static_cast<std::size_t>(-1);
  /// A piece of one read of a block, for one reader thread.
  struct read_job {
    std::size_t block = 0, read = 0;
    std::uint64_t offset = 0, length = 0, needed = 0;  // within the read
  };

  void check(std::size_t u) const {
    if (u >= blocks_.size())
      throw invalid_size("block_prefetcher: block " + std::to_string(u) + " of " +
                         std::to_string(blocks_.size()));
  }
  void stop_readers() noexcept {
    {
      std::lock_guard lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : readers_)
      if (t.joinable()) t.join();
  }
  void free_block(std::size_t u) {
    if (buffered_ && slot_of_[u] != no_slot) {
      slot_free_[slot_of_[u]] = true;
      slot_of_[u] = no_slot;
    }
    state_[u] = state::idle;
    --in_flight_;
  }
  /// The free buffer that fits `bytes` best; a free one is regrown (or one more made) when
  /// none fits, which only a consumer holding more than blocks_in_flight blocks can cause.
  std::size_t take_slot(std::size_t bytes) {
    std::size_t best = no_slot, largest = no_slot;
    for (std::size_t s = 0; s < slots_.size(); ++s) {
      if (!slot_free_[s]) continue;
      if (slots_[s].size() >= bytes && (best == no_slot || slots_[s].size() < slots_[best].size()))
        best = s;
      if (largest == no_slot || slots_[s].size() > slots_[largest].size()) largest = s;
    }
    if (best == no_slot) {
      if (largest == no_slot) {
        largest = slots_.size();
        slots_.emplace_back();
        slot_free_.push_back(true);
      }
      slots_[largest] = detail::read_buffer(bytes);
      best = largest;
    }
    slot_free_[best] = false;
    return best;
  }
  void request(std::size_t b, std::unique_lock<std::mutex>& lock) {
    if (buffered_) slot_of_[b] = take_slot(layouts_[b].bytes);  // may throw: b stays idle
    state_[b] = state::requested;
    ++in_flight_;
    ++stats_.requests;
    stats_.max_in_flight = std::max(stats_.max_in_flight, in_flight_);
    for (const auto* r : blocks_[b]) stats_.bytes_requested += r->size();
    if (buffered_) {
      // Pieces of read_chunk_bytes, in file order: the reader threads each take the next one,
      // so the disk has a piece queued while another completes.
      std::size_t jobs = 0;
      const auto& reads = layouts_[b].reads;
      for (std::size_t i = 0; i < reads.size(); ++i)
        for (std::uint64_t off = 0; off < reads[i].length; off += chunk_) {
          const std::uint64_t len = std::min<std::uint64_t>(chunk_, reads[i].length - off);
          const std::uint64_t need =
              reads[i].needed > off ? std::min(len, reads[i].needed - off) : 0;
          jobs_.push_back(read_job{b, i, off, len, need});
          ++jobs;
        }
      pending_[b] = jobs;
      if (jobs == 0) state_[b] = state::ready;
      cv_.notify_all();
    } else if (!readers_.empty()) {
      queue_.push_back(b);
      cv_.notify_one();
    } else {
      // No reader: ask the kernel to read ahead and let compute fault the pages in.
      lock.unlock();
      for (const auto* r : blocks_[b]) r->will_need();
      lock.lock();
      state_[b] = state::ready;
    }
  }
  /// A reader thread of read_into_buffers: one piece at a time, straight into the block's
  /// buffer; the block is ready when its last piece is in (or failed: acquire rethrows).
  void read_loop() {
    std::unique_lock lock(m_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      const read_job j = jobs_.front();
      jobs_.pop_front();
      const auto& rd = layouts_[j.block].reads[j.read];
      std::byte* dst = slots_[slot_of_[j.block]].data() + rd.buffer_offset + j.offset;
      const bool skip = errors_[j.block] != nullptr;  // the block already failed
      lock.unlock();
      std::exception_ptr err;
      if (!skip) try {
          detail::read_piece(files_, rd.path, rd.offset + j.offset, j.length, j.needed, dst,
                             direct_io_);
        } catch (...) {
          err = std::current_exception();
        }
      lock.lock();
      if (err && !errors_[j.block]) errors_[j.block] = err;
      if (--pending_[j.block] == 0) {
        state_[j.block] = state::ready;
        cv_done_.notify_all();
      }
    }
  }
  /// The mapped reader (read_into_buffers false).
  void run() {
    std::unique_lock lock(m_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      // Readahead for EVERY queued block is asked for before the first one is mapped: the
      // disk's queue holds the next blocks' requests while this one's pages are mapped, so
      // reading never idles between blocks (with blocks_in_flight 3, block i + 2 is already
      // on its way when block i + 1 is being mapped).
      std::vector<std::size_t> advise;
      for (std::size_t q : queue_)
        if (!advised_[q]) {
          advised_[q] = true;
          advise.push_back(q);
        }
      const std::size_t b = queue_.front();
      queue_.pop_front();
      lock.unlock();
      for (std::size_t q : advise)
        for (const auto* r : blocks_[q]) r->will_need();
      // Then the block's pages are mapped region by region, in file order, by this thread:
      // compute waits for the whole block (acquire) and never faults on a page in flight.
      for (const auto* r : blocks_[b]) detail::populate_region(*r);
      lock.lock();
      advised_[b] = false;
      state_[b] = state::ready;
      cv_done_.notify_all();
    }
  }

  std::vector<std::vector<const storage::file_region*>> blocks_;
  std::vector<std::size_t> file_blocks_;
  offload_options opts_;
  mutable std::mutex m_;
  std::condition_variable cv_, cv_done_;
  std::deque<std::size_t> queue_;
  std::vector<state> state_;
  std::vector<bool> advised_;  // readahead asked for, block not mapped yet (mapped reader only)
  std::size_t in_flight_ = 0;
  prefetch_stats stats_;
  bool stop_ = false;
  // read_into_buffers: per block its reads, buffer and outstanding pieces; the buffers.
  bool buffered_ = false;
  bool direct_io_ = false;  // opts_.direct_io, resolved
  std::uint64_t chunk_ = 0;
  std::vector<detail::block_layout> layouts_;
  std::vector<detail::read_buffer> slots_;
  std::vector<bool> slot_free_;
  std::vector<std::size_t> slot_of_, pending_;
  std::vector<std::exception_ptr> errors_;
  std::deque<read_job> jobs_;
  detail::read_files files_;          // the files' descriptors, shared by the reader threads
  std::vector<std::thread> readers_;  // joined (stop_readers) before any member goes
};

// ---------------------------------------------------------------------------------------------
// The Llama source over dispatched weights.

/// Replaces the ref of a named weight (quantized layouts plug their row decoder and fused
/// product in here); nullopt keeps the stored one. The replacement may read the stored bytes
/// of the weight and of its companions under the same block (a quantized weight's state
/// tensors): those regions are prefetched like any other.
using weight_transform =
    std::function<std::optional<exec::weight_ref>(std::string_view name, const exec::weight_ref&)>;

namespace detail {
/// A stored tensor as the CPU kernels read it: [rows, cols] (1-D: one row).
inline exec::weight_ref ref_of(const weight_view& v) {
  if (!v.storage->host_accessible())
    throw device_map_error("tensor `" + v.desc.name + "` lives in " +
                           std::string(storage::to_string(v.kind)) +
                           " memory; the CPU forward reads host or file storage only (GPU "
                           "blocks run through exec/cuda)");
  return exec::weight_ref::of_tensor(static_cast<const std::byte*>(v.data()), v.desc.dtype,
                                     v.desc.shape, v.desc.name);
}
}  // namespace detail

/// The weights of a dispatched Llama-family model, one decoder layer (block) at a time on its
/// execution device. Resident blocks are served in place; file-backed blocks go through a
/// block_prefetcher (blocks 0..N-1, then the final norm + lm_head as one more block).
class offloaded_llama_weights final : public exec::llama_weights_source {
 public:
  offloaded_llama_weights(const dispatched_weights& w, const exec::llama_dims& d,
                          offload_options o = {}, const weight_transform& transform = {})
      : w_(w), dims_(d) {
    for (const auto& [k, dev] : w.map())
      if (dev.is_accelerator())
        throw device_map_error(
            "offloaded_llama_weights: the device map puts `" + (k.empty() ? std::string("") : k) +
            "` on " + dev.to_string() +
            "; the CPU forward runs blocks whose execution device is the CPU (a map with a GPU "
            "runs on the CUDA forward: dispatched_llama_device_weights in "
            "dispatch/cuda/device_llama_weights.cuh, or from_pretrained compiled by nvcc)");
    bool transformed = false;
    inner_ = std::make_unique<exec::named_llama_weights>(
        d, [&](std::string_view name) -> std::optional<exec::weight_ref> {
          if (!w.weights().contains(name)) return std::nullopt;
          auto ref = detail::ref_of(w.view(name));
          if (transform)
            if (auto t = transform(name, ref)) {
              transformed = true;
              return t;
            }
          return ref;
        });
    // A replaced ref (a quantized layout) reads the stored bytes through its own pointers
    // into the mappings: such a model's blocks are served from the mappings, not buffers.
    if (transformed) o.read_into_buffers = false;
    // Blocks: the file regions each one reads (a tie group's region once).
    const auto nl = static_cast<std::size_t>(d.num_layers);
    std::vector<std::vector<const storage::file_region*>> blocks(nl + 1);
    auto add = [&](std::size_t b, const std::string& name) {
      const auto* s = w.weights().find(name);
      if (!s || !s->region()) return;
      const auto* r = s->region();
      auto& list = blocks[b];
      if (std::find(list.begin(), list.end(), r) == list.end()) list.push_back(r);
    };
    for (std::size_t i = 0; i < nl; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      for (const auto& n : w.weights().names())
        if (n.starts_with(p)) add(i, n);
    }
    add(nl, "model.norm.weight");
    add(nl, d.tie_word_embeddings && !w.weights().contains("lm_head.weight")
                ? std::string("model.embed_tokens.weight")
                : std::string("lm_head.weight"));
    if (const auto* s = w.weights().find("model.embed_tokens.weight"); s && s->region())
      embed_region_ = s->region();
    prefetch_ = std::make_unique<block_prefetcher>(std::move(blocks), o);
  }

  exec::weight_ref embed_tokens() override {
    // A new forward: the previous one's head block is done.
    if (head_acquired_) {
      prefetch_->release(head_block());
      head_acquired_ = false;
    }
    return inner_->embed_tokens();
  }
  exec::llama_layer_weights layer(std::int64_t i) override {
    const auto u = block_index(i);
    if (i == 0 && embed_region_ && prefetch_->options().release_after_use &&
        !shares_head(embed_region_))
      embed_region_->release_pages();  // only the prompt's rows were read
    prefetch_->acquire(u);
    auto l = inner_->layer(i);
    for (auto* r : {&l.input_layernorm, &l.post_attention_layernorm, &l.q_proj, &l.k_proj,
                    &l.v_proj, &l.o_proj, &l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias, &l.gate_proj,
                    &l.up_proj, &l.down_proj, &l.gate_bias, &l.up_bias, &l.down_bias})
      in_block(u, *r);
    return l;
  }
  void release_layer(std::int64_t i) override { prefetch_->release(block_index(i)); }
  exec::weight_ref final_norm() override {
    acquire_head();
    return in_block(head_block(), inner_->final_norm());
  }
  exec::weight_ref lm_head() override {
    acquire_head();
    return in_block(head_block(), inner_->lm_head());
  }

  const block_prefetcher& prefetcher() const noexcept { return *prefetch_; }
  const dispatched_weights& weights() const noexcept { return w_; }

 private:
  std::size_t head_block() const noexcept { return static_cast<std::size_t>(dims_.num_layers); }
  std::size_t block_index(std::int64_t i) const {
    if (i < 0 || i >= dims_.num_layers)
      throw invalid_size("offloaded_llama_weights: layer " + std::to_string(i) + " of " +
                         std::to_string(dims_.num_layers));
    return static_cast<std::size_t>(i);
  }
  /// The ref as block u serves it now (its bytes in u's buffer when u was read into one).
  exec::weight_ref& in_block(std::size_t u, exec::weight_ref& r) const {
    if (r.decode == nullptr) r.data = prefetch_->data(u, r.data);
    return r;
  }
  exec::weight_ref in_block(std::size_t u, exec::weight_ref&& r) const {
    in_block(u, r);
    return std::move(r);
  }
  void acquire_head() {
    if (head_acquired_) return;
    prefetch_->acquire(head_block());
    head_acquired_ = true;
  }
  bool shares_head(const storage::file_region* r) const {
    const auto* h = w_.weights().find("lm_head.weight");
    return h && h->region() == r;
  }

  const dispatched_weights& w_;
  exec::llama_dims dims_;
  std::unique_ptr<exec::named_llama_weights> inner_;
  std::unique_ptr<block_prefetcher> prefetch_;
  const storage::file_region* embed_region_ = nullptr;
  bool head_acquired_ = false;
};

// ---------------------------------------------------------------------------------------------
// dispatch_model / cpu_offload / disk_offload (accelerate §7.1, §7.4).

/// Options of dispatch_model.
struct dispatch_options {
  /// Where "disk" entries are written (required when the map has any; an existing folder
  /// whose index.json already holds a tensor is reused for it, as accelerate does).
  std::optional<std::filesystem::path> offload_folder;
  /// The execution device of "cpu"/"disk" blocks (default: first GPU of the map, else "cpu").
  std::optional<device> main_device;
};

namespace detail {
inline storage::tensor_storage host_copy(const storage::tensor_storage& s) {
  auto out = storage::tensor_storage::allocate_host(s.desc());
  if (s.size() != 0) std::memcpy(out.mutable_data(), s.data(), s.size());
  return out;
}
}  // namespace detail

/// A dispatched model: its weights, the hooks that run it, and its hf_device_map.
struct dispatched_model {
  dispatched_weights weights;
  hook_table hooks;
  const device_map& hf_device_map() const noexcept { return weights.map(); }
};

/// accelerate's dispatch_model for a model whose weights are loaded (a weight_store, as
/// load_checkpoint_in_model returns): every tensor moves to the storage its new map entry
/// names — "disk" entries are written to the offload folder (atomically: temporary names, then
/// rename, index.json last) and then served from it; "cpu" entries stay in (or come back to)
/// host memory; GPU entries need a CUDA build. What already lives where the map says is not
/// copied. Ties stay one storage. device_map_error for a map that misses a tensor (named).
inline dispatched_model dispatch_model(const module_tree& tree, weight_store&& weights,
                                       const device_map& map, const dispatch_options& o = {}) {
  validate_device_map(tree, map);
  bool any_disk = false;
  for (const auto& [k, d] : map) {
    any_disk = any_disk || d.is_disk();
    if (d.is_mps()) throw device_map_error("device map puts `" + k + "` on \"mps\"");
#if !defined(STOWAGE_WITH_CUDA)
    if (d.is_gpu())
      throw device_map_error(
          "device map puts " + (k.empty() ? std::string("the whole model") : "`" + k + "`") +
          " on GPU " + std::to_string(d.index()) + " but stowage was built without CUDA");
#endif
  }
  std::optional<std::filesystem::path> folder;
  if (any_disk) {
    if (!o.offload_folder) {
      std::string mods;
      for (const auto& [k, d] : map)
        if (d.is_disk()) mods += (mods.empty() ? "" : ", ") + k;
      throw device_map_error(
          "We need an `offload_dir` to dispatch this model according to this `device_map`, the "
          "following submodules need to be offloaded: " +
          mods + ".");
    }
    folder = std::filesystem::absolute(*o.offload_folder).lexically_normal();
    if (folder->filename().empty()) folder = folder->parent_path();
  }
  auto parts = std::move(weights).extract();
  // 1. Write every "disk" tensor not already in the folder (nothing visible until commit).
  std::optional<storage::offload_folder> existing;
  if (folder && std::filesystem::is_regular_file(*folder / "index.json"))
    existing = storage::offload_folder::open(*folder);
  std::vector<char> to_disk(parts.size(), 0);
  {
    std::optional<storage::offload_folder_writer> writer;
    for (std::size_t i = 0; i < parts.size(); ++i) {
      auto& s = parts[i].storage;
      const auto d = map.device_for(s.desc().name);
      if (!d) throw device_map_error(s.desc().name + " doesn't have any device set.");
      if (!d->is_disk() || s.size() == 0) continue;  // empty tensors stay in memory (§9.13)
      to_disk[i] = 1;
      if (s.kind() == storage::storage_kind::file && s.region()->path().parent_path() == *folder)
        continue;
      if (existing && existing->find(s.desc().name)) {
        const auto* e = existing->find(s.desc().name);
        if (!e->safetensors_file && e->dtype == s.desc().dtype && e->shape == s.desc().shape)
          continue;
      }
      if (!writer) writer.emplace(*folder);
      writer->add(s.desc().name, s.desc().dtype, s.desc().shape, s.bytes());
    }
    if (writer) writer->commit();
  }
  // 2. Re-place.
  std::vector<std::string> canonical;
  for (const auto& p : parts) canonical.push_back(p.storage.desc().name);
  weight_store out;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    auto& s = parts[i].storage;
    const auto d = *map.device_for(s.desc().name);
    storage::tensor_storage placed;
    if (to_disk[i]) {
      if (s.kind() == storage::storage_kind::file && s.region()->path().parent_path() == *folder)
        placed = std::move(s);
      else
        placed = storage::tensor_storage::from_file(
            s.desc(), storage::file_region(*folder / (s.desc().name + ".dat"), 0, s.size()));
    } else if (d.is_gpu()) {
#if defined(STOWAGE_WITH_CUDA)
      placed = storage::tensor_storage::allocate_device(s.desc(), d.index());
      if (s.size() != 0) {
        if (s.kind() == storage::storage_kind::device)
          storage::cuda_check(
              cudaMemcpy(placed.mutable_data(), s.data(), s.size(), cudaMemcpyDeviceToDevice),
              "dispatch_model: cudaMemcpy between GPUs");
        else
          storage::cuda_check(
              cudaMemcpy(placed.mutable_data(), s.data(), s.size(), cudaMemcpyHostToDevice),
              "dispatch_model: cudaMemcpy to GPU");
      }
#endif
    } else if (s.kind() == storage::storage_kind::host ||
               s.kind() == storage::storage_kind::pinned_host) {
      placed = std::move(s);
    } else {
#if defined(STOWAGE_WITH_CUDA)
      if (s.kind() == storage::storage_kind::device) {
        placed = storage::tensor_storage::allocate_host(s.desc());
        if (s.size() != 0)
          storage::cuda_check(
              cudaMemcpy(placed.mutable_data(), s.data(), s.size(), cudaMemcpyDeviceToHost),
              "dispatch_model: cudaMemcpy to host");
      } else
#endif
        placed = detail::host_copy(s);
    }
    out.add(std::move(placed));
  }
  // Ties last, as the loader adds them: names keep their order.
  for (std::size_t i = 0; i < parts.size(); ++i)
    for (const auto& a : parts[i].aliases) out.alias(a, canonical[i]);
  dispatched_weights dw(std::move(out), map, folder, load_report{});
  auto hooks = make_hooks(dw, o.main_device);
  return dispatched_model{std::move(dw), std::move(hooks)};
}

/// Typed models.
template <module_type Model>
dispatched_model dispatch_model(const Model& model, weight_store&& weights, const device_map& map,
                                const dispatch_options& o = {}) {
  return dispatch_model(to_module_tree(model), std::move(weights), map, o);
}

/// accelerate's cpu_offload: every weight in host memory, the whole model offloaded to it and
/// computed on `execution_device` (weights brought there block by block when it is a GPU).
inline dispatched_model cpu_offload(const module_tree& tree, weight_store&& weights,
                                    device execution_device = device::cpu()) {
  auto m = dispatch_model(tree, std::move(weights), device_map{{"", device::cpu()}},
                          {.offload_folder = std::nullopt, .main_device = execution_device});
  for (auto& h : m.hooks.hooks) h.offload = true;  // cpu_offload hooks always offload
  return m;
}
template <module_type Model>
dispatched_model cpu_offload(const Model& model, weight_store&& weights,
                             device execution_device = device::cpu()) {
  return cpu_offload(to_module_tree(model), std::move(weights), execution_device);
}

/// accelerate's disk_offload: every weight written to `folder` (unless its index.json already
/// holds it) and served from there, computed on `execution_device`. Unlike accelerate (which
/// needs the whole state dict in RAM once, §9.17) each tensor is written from where it lives
/// and its memory handed back as the model is re-placed.
inline dispatched_model disk_offload(const module_tree& tree, weight_store&& weights,
                                     const std::filesystem::path& folder,
                                     device execution_device = device::cpu()) {
  return dispatch_model(tree, std::move(weights), device_map{{"", device::disk()}},
                        {.offload_folder = folder, .main_device = execution_device});
}
template <module_type Model>
dispatched_model disk_offload(const Model& model, weight_store&& weights,
                              const std::filesystem::path& folder,
                              device execution_device = device::cpu()) {
  return disk_offload(to_module_tree(model), std::move(weights), folder, execution_device);
}

}  // namespace stowage
