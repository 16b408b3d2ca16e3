// stowage/precision/cuda/quant_kernels.cuh: CUDA kernels for the bitsandbytes layouts: NF4/FP4
// dequantization (bit-identical to the CPU path: f32(code * absmax), then RNE to the output
// type), LLM.int8 dequantization, and a fused 4-bit gemv (one warp per output row, float32
// accumulation). Host launchers return cudaError_t; they never throw.
#pragma once

#include <stowage/config.hpp>
#include <stowage/precision/quant_state.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace stowage::precision::cuda {

namespace detail {

// The NF4 / FP4 dequantization tables (same values as code_table()).
__device__ __forceinline__ float code_value(int type, unsigned nibble) {
  const float nf4[16] = {-1.0f,
                         -0.6961928009986877f,
                         -0.5250730514526367f,
                         -0.39491748809814453f,
                         -0.28444138169288635f,
                         -0.18477343022823334f,
                         -0.09105003625154495f,
                         0.0f,
                         0.07958029955625534f,
                         0.16093020141124725f,
                         0.24611230194568634f,
                         0.33791524171829224f,
                         0.44070982933044434f,
                         0.5626170039176941f,
                         0.7229568362236023f,
                         1.0f};
  const float fp4[16] = {
      0.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  1.0f,  4.0f / 12.0f,  0.5f,  2.0f / 12.0f,  0.25f,
      -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -1.0f, -4.0f / 12.0f, -0.5f, -2.0f / 12.0f, -0.25f};
  return type == 0 ? nf4[nibble] : fp4[nibble];
}

template <class Out>
__device__ __forceinline__ Out from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <class Out>
__global__ void dequantize_4bit_kernel(const std::uint8_t* packed, const float* absmax,
                                       std::size_t numel, int type, std::size_t blocksize,
                                       Out* out) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t k = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       k < (numel + 1) / 2; k += stride) {
    const std::uint8_t byte = packed[k];
    const std::size_t i = 2 * k;
    const float a = absmax[i / blocksize];  // blocksize is even: both nibbles share a block
    // __fmul_rn: never contracted into an FMA, so the product rounds exactly as on the CPU.
    out[i] = from_float<Out>(__fmul_rn(code_value(type, byte >> 4), a));
    if (i + 1 < numel) out[i + 1] = from_float<Out>(__fmul_rn(code_value(type, byte & 15), a));
  }
}

__global__ void dequantize_int8_kernel(const std::int8_t* cb, const float* scb, std::size_t rows,
                                       std::size_t cols, float* out) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < rows * cols; i += stride)
    out[i] = __fmul_rn(__fmul_rn(static_cast<float>(cb[i]), scb[i / cols]), 7.874015718698502e-3f);
}

// y[n] = sum_k x[k] * W[n, k]; one warp per row, lanes stride over k.
__global__ void gemv_4bit_kernel(const float* x, const std::uint8_t* packed, const float* absmax,
                                 int type, std::size_t blocksize, std::size_t N, std::size_t K,
                                 float* y) {
  const std::size_t warp = (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const unsigned lane = threadIdx.x % 32;
  if (warp >= N) return;
  float acc = 0.0f;
  for (std::size_t k = lane; k < K; k += 32) {
    const std::size_t flat = warp * K + k;
    const std::uint8_t byte = packed[flat / 2];
    const unsigned nib = (flat % 2) ? (byte & 15u) : (byte >> 4);
    acc = fmaf(x[k], __fmul_rn(code_value(type, nib), absmax[flat / blocksize]), acc);
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) y[warp] = acc;
}

inline unsigned grid_for(std::size_t work, unsigned threads) {
  const std::size_t g = (work + threads - 1) / threads;
  return static_cast<unsigned>(g < 65535 ? (g == 0 ? 1 : g) : 65535);
}

}  // namespace detail

/// Dequantizes 4-bit data on the device; Out is float, __half or __nv_bfloat16.
template <class Out>
cudaError_t dequantize_4bit(const std::uint8_t* packed, const float* absmax, std::size_t numel,
                            quant_type type, std::size_t blocksize, Out* out,
                            cudaStream_t stream = nullptr) {
  if (blocksize == 0 || blocksize % 2) return cudaErrorInvalidValue;
  detail::dequantize_4bit_kernel<Out><<<detail::grid_for((numel + 1) / 2, 256), 256, 0, stream>>>(
      packed, absmax, numel, type == quant_type::nf4 ? 0 : 1, blocksize, out);
  return cudaGetLastError();
}

/// Dequantizes an LLM.int8 weight: f32(f32(CB * SCB) * f32(1/127)).
inline cudaError_t dequantize_int8(const std::int8_t* cb, const float* scb, std::size_t rows,
                                   std::size_t cols, float* out, cudaStream_t stream = nullptr) {
  detail::dequantize_int8_kernel<<<detail::grid_for(rows * cols, 256), 256, 0, stream>>>(
      cb, scb, rows, cols, out);
  return cudaGetLastError();
}

/// Fused 4-bit gemv: y [N] = W [N, K] x [K] with float32 accumulation.
inline cudaError_t gemv_4bit(const float* x, const std::uint8_t* packed, const float* absmax,
                             quant_type type, std::size_t blocksize, std::size_t N, std::size_t K,
                             float* y, cudaStream_t stream = nullptr) {
  if (blocksize == 0 || blocksize % 2) return cudaErrorInvalidValue;
  detail::gemv_4bit_kernel<<<detail::grid_for(N * 32, 256), 256, 0, stream>>>(
      x, packed, absmax, type == quant_type::nf4 ? 0 : 1, blocksize, N, K, y);
  return cudaGetLastError();
}

}  // namespace stowage::precision::cuda
