// stowage/dispatch/progress.hpp: the loading progress bar. One line on stderr, redrawn at most
// ten times a second: tensors done, bytes done, throughput (GB/s) and time left. Drawn only when
// stderr is a terminal (isatty), so logs and pipes stay clean; `progress_mode::always` forces it
// and `never` silences it. Thread-safe: workers call advance() concurrently.
#pragma once

#include <stowage/config.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>

#include <unistd.h>

namespace stowage {

/// When the progress bar is drawn.
enum class progress_mode : std::uint8_t { automatic, always, never };

/// Counts loaded tensors and bytes and draws the bar.
class progress_bar {
 public:
  using clock = std::chrono::steady_clock;

  progress_bar(std::uint64_t total_tensors, std::uint64_t total_bytes, progress_mode mode,
               std::FILE* out = stderr)
      : total_tensors_(total_tensors), total_bytes_(total_bytes), out_(out), start_(clock::now()) {
    enabled_ = mode == progress_mode::always ||
               (mode == progress_mode::automatic && out_ == stderr && ::isatty(STDERR_FILENO) == 1);
  }
  progress_bar(const progress_bar&) = delete;
  progress_bar& operator=(const progress_bar&) = delete;
  ~progress_bar() { finish(); }

  bool enabled() const noexcept { return enabled_; }
  std::uint64_t tensors_done() const noexcept { return tensors_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_done() const noexcept { return bytes_.load(std::memory_order_relaxed); }

  /// Adds `bytes` (of source data processed); redraws when due.
  void add_bytes(std::uint64_t bytes) {
    bytes_.fetch_add(bytes, std::memory_order_relaxed);
    maybe_draw(false);
  }
  /// One more tensor finished.
  void add_tensor() {
    tensors_.fetch_add(1, std::memory_order_relaxed);
    maybe_draw(false);
  }
  /// Draws the final state and ends the line (once).
  void finish() {
    if (!enabled_ || finished_.exchange(true)) return;
    maybe_draw(true);
    std::fputc('\n', out_);
    std::fflush(out_);
  }

  /// The bar's text for the given counters (exposed for tests).
  static std::string format(std::uint64_t tensors, std::uint64_t total_tensors, std::uint64_t bytes,
                            std::uint64_t total_bytes, double seconds) {
    const double gb = static_cast<double>(bytes) / 1e9,
                 total_gb = static_cast<double>(total_bytes) / 1e9;
    const double rate = seconds > 0 ? gb / seconds : 0.0;
    const double left = rate > 0 ? (total_gb - gb) / rate : 0.0;
    const double frac =
        total_bytes ? static_cast<double>(bytes) / static_cast<double>(total_bytes) : 1.0;
    constexpr int width = 24;
    const int filled = static_cast<int>(frac * width + 0.5);
    std::string bar(static_cast<std::size_t>(filled < 0       ? 0
                                             : filled > width ? width
                                                              : filled),
                    '#');
    bar.resize(width, '.');
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "loading [%s] %llu/%llu tensors  %.2f/%.2f GB  %.2f GB/s  %.1fs left",
                  bar.c_str(), static_cast<unsigned long long>(tensors),
                  static_cast<unsigned long long>(total_tensors), gb, total_gb, rate, left);
    return buf;
  }

 private:
  void maybe_draw(bool force) {
    if (!enabled_) return;
    const auto now = clock::now();
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock() && !force) return;
    if (!lock.owns_lock()) lock.lock();
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    const double secs = std::chrono::duration<double>(now - start_).count();
    std::fprintf(out_, "\r%s",
                 format(tensors_done(), total_tensors_, bytes_done(), total_bytes_, secs).c_str());
    std::fflush(out_);
  }

  std::uint64_t total_tensors_, total_bytes_;
  std::FILE* out_;
  clock::time_point start_;
  clock::time_point last_{};
  bool enabled_ = false;
  std::atomic<bool> finished_{false};
  std::atomic<std::uint64_t> tensors_{0}, bytes_{0};
  std::mutex mutex_;
};

}  // namespace stowage
