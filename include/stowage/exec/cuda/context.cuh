// stowage/exec/cuda/context.cuh: the CUDA resources the GPU forward runs on, each owned by an
// RAII type: a device buffer, a pinned host buffer, an event, and the execution context (a
// compute stream that every kernel and cuBLAS call is issued on, a copy stream for weight
// uploads that overlap compute, and one cuBLAS handle bound to the compute stream). Every
// CUDA / cuBLAS return code is checked; a failure throws stowage::error naming the call and
// the driver's error text, so no failure is silently dropped.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace stowage::exec::cuda {

/// Throws stowage::error("<what>: <CUDA error text>") when `rc` is not cudaSuccess.
inline void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw error(std::string(what) + ": " + cudaGetErrorName(rc) + " (" + cudaGetErrorString(rc) +
                ")");
}

/// Throws stowage::error("<what>: <cuBLAS status>") when `st` is not CUBLAS_STATUS_SUCCESS.
inline void check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw error(std::string(what) + ": " + cublasGetStatusName(st) + " (" +
                cublasGetStatusString(st) + ")");
}

/// Checks that the last kernel launch was accepted (bad configuration, missing image, ...).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

/// Device memory of `n` elements of T (cudaMalloc, 256-byte aligned); move-only.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n) { resize(n); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~device_buffer() { reset(); }

  /// Reallocates (contents are lost) when `n` differs from the current size.
  void resize(std::size_t n) {
    if (n == n_) return;
    reset();
    if (n == 0) return;
    void* p = nullptr;
    check(cudaMalloc(&p, n * sizeof(T)),
          ("cudaMalloc of " + std::to_string(n * sizeof(T)) + " bytes").c_str());
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  /// Grows to at least `n` elements (contents are lost when it grows).
  void reserve(std::size_t n) {
    if (n > n_) resize(n);
  }
  void reset() noexcept {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }

  T* data() noexcept { return p_; }
  const T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }
  std::size_t bytes() const noexcept { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// Page-locked host memory of `bytes` bytes (cudaHostAlloc): the source of asynchronous
/// host-to-device copies; move-only.
class pinned_buffer {
 public:
  pinned_buffer() = default;
  explicit pinned_buffer(std::size_t bytes) {
    if (bytes == 0) return;
    check(cudaHostAlloc(&p_, bytes, cudaHostAllocPortable),
          ("cudaHostAlloc of " + std::to_string(bytes) + " bytes").c_str());
    n_ = bytes;
  }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;
  pinned_buffer(pinned_buffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      if (p_ != nullptr) cudaFreeHost(p_);
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~pinned_buffer() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  std::byte* data() noexcept { return static_cast<std::byte*>(p_); }
  const std::byte* data() const noexcept { return static_cast<const std::byte*>(p_); }
  std::size_t size() const noexcept { return n_; }

 private:
  void* p_ = nullptr;
  std::size_t n_ = 0;
};

/// A CUDA event without timing (cheapest for stream ordering) or with timing; move-only.
class event {
 public:
  explicit event(bool timing = false) {
    check(cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming),
          "cudaEventCreateWithFlags");
  }
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  event(event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  event& operator=(event&& o) noexcept {
    if (this != &o) {
      if (e_ != nullptr) cudaEventDestroy(e_);
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  ~event() {
    if (e_ != nullptr) cudaEventDestroy(e_);
  }
  cudaEvent_t get() const noexcept { return e_; }
  void record(cudaStream_t s) { check(cudaEventRecord(e_, s), "cudaEventRecord"); }
  void synchronize() { check(cudaEventSynchronize(e_), "cudaEventSynchronize"); }
  /// Milliseconds between two recorded timing events.
  static float elapsed_ms(const event& start, const event& stop) {
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start.e_, stop.e_), "cudaEventElapsedTime");
    return ms;
  }

 private:
  cudaEvent_t e_ = nullptr;
};

/// Makes `waiter` wait (on the device, without blocking the host) for `e`'s last record.
inline void stream_wait(cudaStream_t waiter, const event& e) {
  check(cudaStreamWaitEvent(waiter, e.get(), 0), "cudaStreamWaitEvent");
}

/// The device, its two streams and the cuBLAS handle of one GPU forward. Move-only; the
/// device is made current at construction (and by activate()).
class context {
 public:
  explicit context(int device = 0) : device_(device) {
    activate();
    check(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking),
          "cudaStreamCreateWithFlags (compute)");
    if (auto rc = cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking); rc != cudaSuccess) {
      cudaStreamDestroy(compute_);
      check(rc, "cudaStreamCreateWithFlags (copy)");
    }
    if (auto st = cublasCreate(&blas_); st != CUBLAS_STATUS_SUCCESS) {
      destroy_streams();
      check(st, "cublasCreate");
    }
    try {
      check(cublasSetStream(blas_, compute_), "cublasSetStream");
      // Plain fp32 SGEMM (no TF32 tensor-op rounding of the inputs): the fp32 path must agree
      // with the CPU forward to fp32 summation-order accuracy.
      check(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    } catch (...) {
      cublasDestroy(blas_);
      destroy_streams();
      throw;
    }
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  context(context&& o) noexcept
      : device_(o.device_),
        compute_(std::exchange(o.compute_, nullptr)),
        copy_(std::exchange(o.copy_, nullptr)),
        blas_(std::exchange(o.blas_, nullptr)) {}
  context& operator=(context&&) = delete;
  ~context() {
    if (blas_ != nullptr) cublasDestroy(blas_);
    destroy_streams();
  }

  int device() const noexcept { return device_; }
  cudaStream_t compute() const noexcept { return compute_; }
  cudaStream_t copy() const noexcept { return copy_; }
  cublasHandle_t blas() const noexcept { return blas_; }

  void activate() const {
    check(cudaSetDevice(device_), ("cudaSetDevice(" + std::to_string(device_) + ")").c_str());
  }
  void sync_compute() const { check(cudaStreamSynchronize(compute_), "cudaStreamSynchronize"); }
  void sync_copy() const { check(cudaStreamSynchronize(copy_), "cudaStreamSynchronize (copy)"); }

 private:
  void destroy_streams() noexcept {
    if (compute_ != nullptr) cudaStreamDestroy(compute_);
    if (copy_ != nullptr) cudaStreamDestroy(copy_);
    compute_ = copy_ = nullptr;
  }

  int device_ = 0;
  cudaStream_t compute_ = nullptr;
  cudaStream_t copy_ = nullptr;
  cublasHandle_t blas_ = nullptr;
};

/// Host -> device copy of `n` elements on `s` (asynchronous only from pinned memory).
template <class T>
void upload(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  if (n == 0) return;
  check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, s),
        "cudaMemcpyAsync (host to device)");
}

/// Device -> host copy of `n` elements on `s`; the caller synchronises before reading.
template <class T>
void download(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  if (n == 0) return;
  check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, s),
        "cudaMemcpyAsync (device to host)");
}

}  // namespace stowage::exec::cuda
