// bench/load_bench.cpp: the stowage half of bench/load_side_by_side.py. Two modes, each printing
// one JSON line so the script can compare runs made in one session on one machine:
//   load_bench --memcpy BYTES [--threads N]
//       this machine's memcpy bandwidth: N threads each copy its share of a BYTES buffer, best
//       of 5; GB/s counts the bytes copied (= bytes read). "gbps": destination pages touched
//       first (the reference); "fresh_gbps" / "fresh_huge_gbps": into new anonymous memory
//       (4 KiB pages / MADV_HUGEPAGE), page faults and zeroing included.
//   load_bench CHECKPOINT_DIR [--dtype bfloat16] [--threads N] [--window BYTES] [--thp 0|1]
//       load_checkpoint_and_dispatch of the Llama in CHECKPOINT_DIR (config.json + shards) with
//       device_map {"": "cpu"}; reports seconds, checkpoint bytes read, GB/s, the bytes of
//       resident weights and this process's peak RSS (getrusage) before and after loading;
//       --thp 0 turns load_options::transparent_huge_pages off.
//   load_bench --phases CHECKPOINT_DIR [--threads N]
//       the physical pieces of a converting load, each alone, best of 5 on N threads: faulting
//       in fresh huge pages for half the checkpoint's bytes (what a bf16 load of an fp32
//       checkpoint allocates; MADV_POPULATE_WRITE, zeroing included), and reading every
//       safetensors file once through its mapping (16 MiB chunks, dropped after each) and with
//       pread into a 256 KiB buffer; seconds and GB/s of the bytes each handles; and how many of
//       the files' bytes the page cache maps as 2 MiB pages (FilePmdMapped).
// Google Benchmark's runner is not used: each measurement is one cold-process run, which is
// what peak RSS needs.
#include <stowage/dispatch/load.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/precision/floating.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

namespace {

long peak_rss_kib() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

/// Best of 5 of `threads` threads each memcpy'ing its share of `src` into `dst(rep)`.
template <class Dst>
double best_copy(const std::vector<char>& src, unsigned threads, Dst&& dst) {
  const std::size_t bytes = src.size();
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    char* d = dst(rep);  // mapping a fresh destination (and unmapping the last) is not timed
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    const std::size_t share = bytes / threads;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        const std::size_t b = t * share, n = t + 1 == threads ? bytes - b : share;
        std::memcpy(d + b, src.data() + b, n);
      });
    for (auto& th : pool) th.join();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

/// memcpy bandwidth three ways: into a destination already faulted in ("warm", the issue's
/// reference), into fresh anonymous memory (4 KiB pages: every page faulted, zeroed and charged
/// during the copy, as a load into new storage must) and into fresh memory with MADV_HUGEPAGE.
int memcpy_bench(std::size_t bytes, unsigned threads) {
  std::vector<char> src(bytes, 1), warm_dst(bytes, 2);
  const double warm = best_copy(src, threads, [&](int) { return warm_dst.data(); });
  char check = warm_dst[bytes / 2];
  auto fresh = [&](bool huge) {
    void* cur = nullptr;
    const double secs = best_copy(src, threads, [&](int) {
      if (cur) {
        check = static_cast<char>(check + static_cast<char*>(cur)[bytes / 2]);
        ::munmap(cur, bytes);
      }
      cur = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (cur == MAP_FAILED) std::abort();
      if (huge) ::madvise(cur, bytes, MADV_HUGEPAGE);
      return static_cast<char*>(cur);
    });
    ::munmap(cur, bytes);
    return secs;
  };
  // Time-to-fault the destination is part of the fresh figures (the mmap itself is ~free).
  const double fresh4k = fresh(false), fresh_huge = fresh(true);
  std::printf(
      "{\"mode\": \"memcpy\", \"bytes\": %zu, \"threads\": %u, \"seconds\": %.6f, \"gbps\": %.3f, "
      "\"fresh_gbps\": %.3f, \"fresh_huge_gbps\": %.3f, \"check\": %d}\n",
      bytes, threads, warm, static_cast<double>(bytes) / warm / 1e9,
      static_cast<double>(bytes) / fresh4k / 1e9, static_cast<double>(bytes) / fresh_huge / 1e9,
      check);
  return 0;
}

/// Runs `work(task)` for tasks [0, n) on `threads` threads (shared counter); seconds.
template <class Work>
double run_tasks(std::size_t n, unsigned threads, Work&& work) {
  std::atomic<std::size_t> next{0};
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (std::size_t k; (k = next.fetch_add(1)) < n;) work(k);
    });
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int phases_bench(const std::string& dir, unsigned threads) {
  struct file {
    int fd;
    std::size_t size;
    const char* map;
  };
  std::vector<file> files;
  std::size_t total = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    const auto size = static_cast<std::size_t>(e.file_size());
    void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (fd < 0 || m == MAP_FAILED) return 1;
    files.push_back({fd, size, static_cast<const char*>(m)});
    total += size;
  }
  // How much of the checkpoint the page cache holds in 2 MiB folios (maps as PMDs): the state
  // that decides how cheaply a mapping reads it (a file written in large pieces is in 2 MiB
  // folios; one read back from disk after eviction may not be). Measured once, every page
  // mapped, then the mappings dropped again.
  std::size_t pmd_bytes = 0;
#if defined(MADV_POPULATE_READ)
  for (const auto& f : files) ::madvise(const_cast<char*>(f.map), f.size, MADV_POPULATE_READ);
#endif
  if (std::FILE* sm = std::fopen("/proc/self/smaps_rollup", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, sm))
      if (std::strncmp(line, "FilePmdMapped:", 14) == 0)
        pmd_bytes = std::strtoull(line + 14, nullptr, 10) * 1024;
    std::fclose(sm);
  }
  for (const auto& f : files) ::madvise(const_cast<char*>(f.map), f.size, MADV_DONTNEED);
  constexpr std::size_t chunk = std::size_t{16} << 20, piece = std::size_t{256} << 10;
  std::vector<std::pair<std::size_t, std::size_t>> tasks;  // file, offset
  for (std::size_t f = 0; f < files.size(); ++f)
    for (std::size_t o = 0; o < files[f].size; o += chunk) tasks.emplace_back(f, o);
  std::atomic<std::uint64_t> sink{0};
  auto sum = [](const char* p, std::size_t n) {
    std::uint64_t s = 0;
    for (std::size_t i = 0; i + 8 <= n; i += 8) {
      std::uint64_t v;
      std::memcpy(&v, p + i, 8);
      s += v;
    }
    return s;
  };
  double mapped = 1e30, preads = 1e30, fault = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    mapped = std::min(mapped, run_tasks(tasks.size(), threads, [&](std::size_t k) {
                        const auto& [f, o] = tasks[k];
                        const std::size_t n = std::min(chunk, files[f].size - o);
                        sink += sum(files[f].map + o, n);
                        ::madvise(const_cast<char*>(files[f].map + o), n, MADV_DONTNEED);
                      }));
    preads = std::min(preads, run_tasks(tasks.size(), threads, [&](std::size_t k) {
                        thread_local std::vector<char> buf(piece);
                        const auto& [f, o] = tasks[k];
                        const std::size_t n = std::min(chunk, files[f].size - o);
                        for (std::size_t b = 0; b < n; b += piece) {
                          const auto r = ::pread(files[f].fd, buf.data(), std::min(piece, n - b),
                                                 static_cast<off_t>(o + b));
                          if (r > 0) sink += sum(buf.data(), static_cast<std::size_t>(r));
                        }
                      }));
    // Fresh huge pages for half the bytes (bf16 of fp32), 8 MiB per populate as the loader.
    const std::size_t out = total / 2 / (std::size_t{2} << 20) * (std::size_t{2} << 20);
    char* d = static_cast<char*>(
        ::mmap(nullptr, out, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (d == MAP_FAILED) return 1;
    ::madvise(d, out, MADV_HUGEPAGE);
    const std::size_t step = std::size_t{8} << 20;
    fault = std::min(fault, run_tasks((out + step - 1) / step, threads, [&](std::size_t k) {
                       ::madvise(d + k * step, std::min(step, out - k * step), MADV_POPULATE_WRITE);
                     }));
    sink += static_cast<std::uint64_t>(d[out / 2]);
    ::munmap(d, out);
  }
  std::printf(
      "{\"mode\": \"phases\", \"bytes\": %zu, \"threads\": %u, \"read_mapped_seconds\": %.4f, "
      "\"read_mapped_gbps\": %.3f, \"read_pread_seconds\": %.4f, \"read_pread_gbps\": %.3f, "
      "\"fault_half_seconds\": %.4f, \"fault_gbps\": %.3f, \"pmd_mapped_bytes\": %zu, "
      "\"sink\": %llu}\n",
      total, threads, mapped, static_cast<double>(total) / mapped / 1e9, preads,
      static_cast<double>(total) / preads / 1e9, fault,
      static_cast<double>(total / 2) / fault / 1e9, pmd_bytes,
      static_cast<unsigned long long>(sink.load() & 1));
  for (const auto& f : files) {
    ::munmap(const_cast<char*>(f.map), f.size);
    ::close(f.fd);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: load_bench --memcpy BYTES [--threads N] | --phases CHECKPOINT_DIR "
                 "[--threads N] | CHECKPOINT_DIR [--dtype D] [--threads N] [--window B] "
                 "[--thp 0|1]\n");
    return 2;
  }
  unsigned threads = 2;
  std::string dtype_name = "bfloat16";
  std::size_t window = std::size_t{64} << 20;
  bool thp = true;
  // Options follow the mode's operands: one for a checkpoint, two for --memcpy / --phases.
  const bool two_operands = std::string(argv[1]).rfind("--", 0) == 0;
  if (two_operands && argc < 3) return 2;
  for (int i = two_operands ? 3 : 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--threads") threads = static_cast<unsigned>(std::stoul(argv[i + 1]));
    if (k == "--dtype") dtype_name = argv[i + 1];
    if (k == "--window") window = std::stoull(argv[i + 1]);
    if (k == "--thp") thp = std::string(argv[i + 1]) != "0";
  }
  if (std::string(argv[1]) == "--memcpy") return memcpy_bench(std::stoull(argv[2]), threads);
  if (std::string(argv[1]) == "--phases") return phases_bench(argv[2], threads);
  try {
    const std::string dir = argv[1];
    const auto cfg = stowage::models::llama_config::from_file(dir + "/config.json");
    const auto model =
        stowage::init_empty<stowage::models::llama_for_causal_lm<stowage::precision::fp32>>(cfg);
    stowage::load_options opts;
    opts.dtype = stowage::dtype_from_name(dtype_name);
    opts.threads = threads;
    opts.staging_window_bytes = window;
    opts.transparent_huge_pages = thp;
    opts.progress = stowage::progress_mode::never;
    const long rss_before = peak_rss_kib();
    const auto t0 = std::chrono::steady_clock::now();
    const auto res =
        stowage::load_checkpoint_and_dispatch(model, dir, stowage::device_map{{"", "cpu"}}, opts);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto resident = res.weights().bytes_in(stowage::storage::storage_kind::host);
    std::printf(
        "{\"mode\": \"load\", \"seconds\": %.4f, \"bytes_read\": %llu, \"gbps\": %.3f, "
        "\"resident_bytes\": %llu, "
        "\"tensors\": %zu, \"threads\": %u, \"window\": %zu, \"peak_rss_kib_before\": %ld, "
        "\"peak_rss_kib\": %ld}\n",
        secs, static_cast<unsigned long long>(res.report().bytes_read),
        static_cast<double>(res.report().bytes_read) / secs / 1e9,
        static_cast<unsigned long long>(resident), res.weights().size(), threads, window,
        rss_before, peak_rss_kib());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "load_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
