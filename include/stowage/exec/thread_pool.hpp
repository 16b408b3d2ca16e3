// stowage/exec/thread_pool.hpp: a small fixed-size std::thread pool with a blocking
// parallel_for, used by the CPU kernels (matmuls split by output rows, attention by heads).
// Why not Eigen's ThreadPool: decode issues many short parallel regions per token; a pool whose
// workers spin briefly before sleeping and whose caller takes a share of the work keeps the
// per-region overhead to a few microseconds, and the work split stays under our control (row
// blocks sized for memory bandwidth, see docs/performance.md "CPU decode").
#pragma once

#include <algorithm>
#include <atomic>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace stowage::exec {

/// A range body: called as body(begin, end) on disjoint sub-ranges of [0, n).
template <class F>
concept range_body = std::invocable<F&, std::size_t, std::size_t>;

class thread_pool {
 public:
  /// `threads` counts the calling thread too: thread_pool(1) runs everything inline.
  explicit thread_pool(std::size_t threads = default_threads()) {
    const std::size_t n = std::max<std::size_t>(threads, 1);
    workers_.reserve(n - 1);
    for (std::size_t i = 0; i + 1 < n; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  /// Threads that take part in a parallel_for (workers + the caller).
  std::size_t size() const noexcept { return workers_.size() + 1; }

  static std::size_t default_threads() noexcept {
    const unsigned h = std::thread::hardware_concurrency();
    return h == 0 ? 1 : h;
  }

  /// Splits [0, n) into chunks of at least `min_chunk` items and runs body(begin, end) on
  /// them; returns when all are done. Calls from inside a body (nesting) run inline, and
  /// concurrent callers from different threads take turns. Exceptions from a body are
  /// re-thrown in the caller (the first one wins).
  template <range_body F>
  void parallel_for(std::size_t n, std::size_t min_chunk, F&& body) {
    if (n == 0) return;
    min_chunk = std::max<std::size_t>(min_chunk, 1);
    std::size_t chunks = std::min(size(), (n + min_chunk - 1) / min_chunk);
    if (chunks <= 1 || in_worker()) {
      body(std::size_t{0}, n);
      return;
    }
    std::unique_lock call_lock(call_m_);
    job j;
    j.ctx = &body;
    j.call = [](void* ctx, std::size_t b, std::size_t e) {
      (*static_cast<std::remove_reference_t<F>*>(ctx))(b, e);
    };
    j.n = n;
    j.chunks = chunks;
    j.pending.store(static_cast<std::int64_t>(chunks), std::memory_order_relaxed);
    {
      std::lock_guard lk(m_);
      job_ = &j;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    in_worker() = true;
    run_chunks(j);
    in_worker() = false;
    // Wait for the workers' chunks (spin: they are short and already running), then for every
    // worker that picked the job up to let go of it, so `j` may die.
    while (j.pending.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    {
      std::lock_guard lk(m_);
      job_ = nullptr;
    }
    while (j.refs.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    if (j.error) std::rethrow_exception(j.error);
  }

 private:
  struct job {
    void* ctx = nullptr;
    void (*call)(void*, std::size_t, std::size_t) = nullptr;
    std::size_t n = 0, chunks = 0;
    std::atomic<std::size_t> next{0};
    std::atomic<std::int64_t> pending{0};
    std::atomic<int> refs{0};
    std::mutex error_m;
    std::exception_ptr error;
  };

  static bool& in_worker() noexcept {
    thread_local bool flag = false;
    return flag;
  }

  void run_chunks(job& j) noexcept {
    for (;;) {
      const std::size_t c = j.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= j.chunks) return;
      const std::size_t b = j.n * c / j.chunks, e = j.n * (c + 1) / j.chunks;
      try {
        j.call(j.ctx, b, e);
      } catch (...) {
        std::lock_guard lk(j.error_m);
        if (!j.error) j.error = std::current_exception();
      }
      j.pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void worker_loop() {
    in_worker() = true;
    std::uint64_t seen = 0;
    for (;;) {
      // Spin a little before sleeping: the next region usually follows within microseconds.
      std::uint64_t g = generation_.load(std::memory_order_acquire);
      for (int i = 0; i < 2000 && g == seen; ++i) {
        std::this_thread::yield();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock lk(m_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      job* j = nullptr;
      {
        std::lock_guard lk(m_);
        if (stop_) return;
        // Taking a reference under the lock: the caller clears job_ under the same lock and
        // then waits for refs to drop, so `j` outlives this worker's use of it.
        j = job_;
        if (j) j->refs.fetch_add(1, std::memory_order_acq_rel);
      }
      if (j) {
        run_chunks(*j);
        j->refs.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_, call_m_;
  std::condition_variable cv_;
  std::atomic<std::uint64_t> generation_{0};
  job* job_ = nullptr;  // guarded by m_
  bool stop_ = false;
};

/// A process-wide pool sized to the hardware, created on first use.
inline thread_pool& default_thread_pool() {
  static thread_pool pool;
  return pool;
}

}  // namespace stowage::exec
