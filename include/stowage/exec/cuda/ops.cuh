// stowage/exec/cuda/ops.cuh: the Llama building blocks on device memory, each the GPU twin of
// an exec/cpu/* function with the same arithmetic: embedding gather, RMSNorm (float32 sums),
// rotary embedding (cos/sin computed on the host by cpu::rotary_embedding, so the angles are
// the CPU's bit for bit), grouped-query attention over a device KV cache (causal, optional
// sliding window; one block per query with a streaming softmax, so it needs no scratch of
// size seq x context), the SiLU gate, residual and bias adds, argmax / softmax over logits, and
// y = x W^T through cuBLAS. Weights stay in the checkpoint's row-major [out, in] layout and
// dtype (float32, bfloat16, float16). Kernels are deliberately plain (correctness first);
// every host launcher checks its launch and throws stowage::error on failure.
#pragma once

#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/exec/cuda/context.cuh>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace stowage::exec::cuda {

/// A weight in device memory: row-major rows x cols (1-D: rows = 1), float32 / bfloat16 /
/// float16. Non-owning; `data` stays valid while the weight is used.
struct device_weight {
  const void* data = nullptr;
  stowage::dtype type = dtype::float32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::string name;  ///< for messages

  bool empty() const noexcept { return data == nullptr; }
  std::int64_t numel() const noexcept { return rows * cols; }
};

/// Whether the kernels read `t` (the 16-bit ones are widened exactly to float32).
constexpr bool device_readable(stowage::dtype t) noexcept {
  return t == dtype::float32 || t == dtype::bfloat16 || t == dtype::float16;
}

namespace detail {

// Element type codes passed to kernels.
enum : int { k_f32 = 0, k_bf16 = 1, k_f16 = 2 };

inline int type_code(const device_weight& w) {
  switch (w.type) {
    case dtype::float32:
      return k_f32;
    case dtype::bfloat16:
      return k_bf16;
    case dtype::float16:
      return k_f16;
    default:
      throw invalid_dtype("cuda op: weight '" + w.name + "' has dtype " +
                          std::string(stowage::name(w.type)) +
                          " (float32, bfloat16 and float16 are read on the device)");
  }
}

/// Element i of a float32 / bfloat16 / float16 array as float32 (exact widening: bf16 is the
/// top half of a float32, fp16 -> fp32 is exact).
__device__ __forceinline__ float load_f(const void* p, int type, std::size_t i) {
  if (type == k_f32) return static_cast<const float*>(p)[i];
  const unsigned short u = static_cast<const unsigned short*>(p)[i];
  if (type == k_bf16) return __uint_as_float(static_cast<unsigned>(u) << 16);
  return __half2float(__ushort_as_half(u));
}

constexpr int k_block = 256;       // threads of the row kernels (a power of two)
constexpr int k_attn_block = 128;  // threads of the attention kernel (a power of two)

inline unsigned grid_for(std::size_t n, int block = k_block) {
  const std::size_t b = (n + static_cast<std::size_t>(block) - 1) / static_cast<std::size_t>(block);
  return static_cast<unsigned>(std::clamp<std::size_t>(b, 1, 1u << 20));  // grid-stride loops
}

/// Tree reductions over the block (blockDim.x a power of two); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}
__device__ __forceinline__ float block_max(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

__global__ void embedding_kernel(const void* table, int type, std::int64_t cols,
                                 const std::int64_t* ids, std::int64_t n, float* out) {
  const std::size_t total = static_cast<std::size_t>(n * cols);
  for (std::size_t k = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t i = k / static_cast<std::size_t>(cols),
                      c = k % static_cast<std::size_t>(cols);
    out[k] = load_f(table, type, static_cast<std::size_t>(ids[i]) * cols + c);
  }
}

// One block per row: y = w * (x * (1 / sqrt(mean(x^2) + eps))), as cpu::rms_norm orders it.
__global__ void rms_norm_kernel(const float* x, const void* w, int wtype, std::int64_t d, float eps,
                                float* y) {
  __shared__ float red[k_block];
  const float* xr = x + static_cast<std::size_t>(blockIdx.x) * d;
  float* yr = y + static_cast<std::size_t>(blockIdx.x) * d;
  float s = 0;
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
  const float var = block_sum(s, red) / static_cast<float>(d);
  const float inv = 1.0f / sqrtf(var + eps);
  // Each thread rewrites only the elements it read, after the sum: y may alias x.
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x)
    yr[j] = __fmul_rn(load_f(w, wtype, static_cast<std::size_t>(j)), __fmul_rn(xr[j], inv));
}

// x: [rows, heads, 2 * half]; row r is at position index r % seq of the cos/sin tables
// [seq, half]. The rotate_half pairs (i, i + half); __f*_rn keeps the products unfused so the
// result rounds as the CPU's does.
__global__ void rope_kernel(float* x, std::int64_t rows, std::int64_t seq, std::int64_t heads,
                            std::int64_t half, const float* cosv, const float* sinv) {
  const std::size_t total = static_cast<std::size_t>(rows * heads * half);
  for (std::size_t k = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t i = k % static_cast<std::size_t>(half);
    const std::size_t rh = k / static_cast<std::size_t>(half);  // row * heads + head
    const std::size_t r = rh / static_cast<std::size_t>(heads);
    const std::size_t t = r % static_cast<std::size_t>(seq);
    float* v = x + rh * 2 * static_cast<std::size_t>(half);
    const float c = cosv[t * half + i], s = sinv[t * half + i];
    const float a = v[i], b = v[i + half];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

// k_new/v_new [batch, seq, kv_heads, hd] -> cache [batch][kv_heads][capacity][hd] at past + t.
__global__ void kv_store_kernel(const float* k_new, const float* v_new, float* kc, float* vc,
                                std::int64_t batch, std::int64_t seq, std::int64_t kv_heads,
                                std::int64_t hd, std::int64_t capacity, std::int64_t past) {
  const std::size_t total = static_cast<std::size_t>(batch * seq * kv_heads * hd);
  for (std::size_t k = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = static_cast<std::int64_t>(k % static_cast<std::size_t>(hd));
    const std::int64_t h = static_cast<std::int64_t>((k / hd) % kv_heads);
    const std::int64_t t = static_cast<std::int64_t>((k / (hd * kv_heads)) % seq);
    const std::int64_t b = static_cast<std::int64_t>(k / (hd * kv_heads * seq));
    const std::size_t dst =
        static_cast<std::size_t>(((b * kv_heads + h) * capacity + past + t) * hd + d);
    kc[dst] = k_new[k];
    vc[dst] = v_new[k];
  }
}

// One block per query (b, t, h): softmax(q K^T * scale) V over keys first..pos, where
// pos = past + t, streamed in tiles of blockDim keys with a running max and sum (the result is
// the softmax's, only the rounding differs from a two-pass one).
__global__ void attention_kernel(const float* q, const float* kc, const float* vc, float* out,
                                 std::int64_t seq, std::int64_t heads, std::int64_t kv_heads,
                                 std::int64_t hd, std::int64_t capacity, std::int64_t past,
                                 std::int64_t window, float scale) {
  extern __shared__ float sm[];
  float* qs = sm;               // [hd]
  float* acc = qs + hd;         // [hd]
  float* p = acc + hd;          // [blockDim]
  float* red = p + blockDim.x;  // [blockDim]
  const std::int64_t h = blockIdx.x % heads;
  const std::int64_t bt = blockIdx.x / heads;  // b * seq + t
  const std::int64_t t = bt % seq, b = bt / seq;
  const std::int64_t kh = h / (heads / kv_heads);
  const std::size_t qo = static_cast<std::size_t>((bt * heads + h) * hd);
  const float* K = kc + static_cast<std::size_t>((b * kv_heads + kh) * capacity * hd);
  const float* V = vc + static_cast<std::size_t>((b * kv_heads + kh) * capacity * hd);
  for (std::int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    qs[d] = q[qo + d];
    acc[d] = 0.0f;
  }
  __syncthreads();
  const std::int64_t pos = past + t;
  const std::int64_t first = window > 0 ? (pos - window + 1 > 0 ? pos - window + 1 : 0) : 0;
  float m = -INFINITY, l = 0.0f;
  for (std::int64_t k0 = first; k0 <= pos; k0 += blockDim.x) {
    const std::int64_t j = k0 + threadIdx.x;
    float s = -INFINITY;
    if (j <= pos) {
      const float* kr = K + static_cast<std::size_t>(j * hd);
      float dot = 0.0f;
      for (std::int64_t d = 0; d < hd; ++d) dot += qs[d] * kr[d];
      s = dot * scale;
    }
    const float new_m = fmaxf(m, block_max(s, red));  // finite: key k0 <= pos is in the tile
    const float e = j <= pos ? expf(s - new_m) : 0.0f;
    p[threadIdx.x] = e;
    const float tile_sum = block_sum(e, red);  // its barriers also publish p[]
    const float corr = expf(m - new_m);        // 0 on the first tile (m = -inf)
    l = l * corr + tile_sum;
    const std::int64_t n = pos - k0 + 1 < blockDim.x ? pos - k0 + 1 : blockDim.x;
    for (std::int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
      float a = acc[d] * corr;
      for (std::int64_t i = 0; i < n; ++i)
        a += p[i] * V[static_cast<std::size_t>((k0 + i) * hd + d)];
      acc[d] = a;  // only this thread touches acc[d]
    }
    m = new_m;
    __syncthreads();  // p[] is rewritten by the next tile
  }
  for (std::int64_t d = threadIdx.x; d < hd; d += blockDim.x) out[qo + d] = acc[d] / l;
}

// g = silu(g) * u with silu(x) = x / (1 + exp(-x)), cpu::silu's formulation.
__global__ void silu_mul_kernel(float* g, const float* u, std::size_t n) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float x = g[i];
    g[i] = (x / (1.0f + expf(-x))) * u[i];
  }
}

__global__ void add_kernel(float* x, const float* y, std::size_t n) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

__global__ void bias_kernel(float* y, const void* bias, int btype, std::int64_t rows,
                            std::int64_t cols) {
  const std::size_t total = static_cast<std::size_t>(rows * cols);
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    y[i] += load_f(bias, btype, i % static_cast<std::size_t>(cols));
}

// float32 -> bfloat16 / float16, round to nearest even (as precision::fp32_to_bf16 / _fp16).
__global__ void narrow_kernel(const float* x, std::size_t n, int type, unsigned short* out) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    out[i] = type == k_bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x[i]))
                            : __half_as_ushort(__float2half_rn(x[i]));
}

__global__ void widen_kernel(const void* w, int type, std::size_t n, float* out) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    out[i] = load_f(w, type, i);
}

// One block per row: the index of the first maximum, NaN never winning (cpu::argmax).
__device__ __forceinline__ bool argmax_better(float v, std::int64_t i, float bv, std::int64_t bi) {
  if (bi < 0) return i >= 0;
  if (i < 0) return false;
  const bool vn = isnan(v), bn = isnan(bv);
  if (vn != bn) return bn;  // a number beats NaN
  if (!vn && v != bv) return v > bv;
  return i < bi;  // equal (or both NaN): the first wins
}
__global__ void argmax_kernel(const float* logits, std::int64_t cols, std::int64_t* out) {
  __shared__ float vals[k_block];
  __shared__ std::int64_t idx[k_block];
  const float* row = logits + static_cast<std::size_t>(blockIdx.x) * cols;
  float bv = 0.0f;
  std::int64_t bi = -1;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    if (argmax_better(row[j], j, bv, bi)) {
      bv = row[j];
      bi = j;
    }
  vals[threadIdx.x] = bv;
  idx[threadIdx.x] = bi;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s && argmax_better(vals[threadIdx.x + s], idx[threadIdx.x + s],
                                         vals[threadIdx.x], idx[threadIdx.x])) {
      vals[threadIdx.x] = vals[threadIdx.x + s];
      idx[threadIdx.x] = idx[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = idx[0];
}

// One block per row: out = exp(x - max) / sum(exp(x - max)).
__global__ void softmax_kernel(const float* x, std::int64_t cols, float* out) {
  __shared__ float red[k_block];
  const float* row = x + static_cast<std::size_t>(blockIdx.x) * cols;
  float* o = out + static_cast<std::size_t>(blockIdx.x) * cols;
  float m = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_max(m, red);
  float s = 0.0f;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float e = expf(row[j] - m);
    o[j] = e;
    s += e;
  }
  s = block_sum(s, red);
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) o[j] = o[j] / s;
}

inline int to_int(std::int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX)
    throw invalid_size(std::string(what) + ": dimension " + std::to_string(v) +
                       " is outside cuBLAS's int range");
  return static_cast<int>(v);
}

}  // namespace detail

/// out[i, :] = table[ids[i], :] widened to float32. `ids` lives on the device; `host_ids` (the
/// same values) are checked against the vocabulary first, so no id reads past the table.
inline void embedding(const context& ctx, const device_weight& table,
                      std::span<const std::int64_t> host_ids, const std::int64_t* ids, float* out) {
  const int t = detail::type_code(table);
  for (std::size_t i = 0; i < host_ids.size(); ++i)
    if (host_ids[i] < 0 || host_ids[i] >= table.rows)
      throw invalid_size("embedding '" + table.name + "': token id " + std::to_string(host_ids[i]) +
                         " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
                         std::to_string(table.rows) + ")");
  const auto n = static_cast<std::int64_t>(host_ids.size());
  if (n == 0) return;
  detail::embedding_kernel<<<detail::grid_for(static_cast<std::size_t>(n * table.cols)),
                             detail::k_block, 0, ctx.compute()>>>(table.data, t, table.cols, ids, n,
                                                                  out);
  check_launch("embedding_kernel");
}

/// RMSNorm of `rows` rows of length weight.numel(); y may alias x.
inline void rms_norm(const context& ctx, const float* x, std::int64_t rows,
                     const device_weight& weight, float eps, float* y) {
  const int t = detail::type_code(weight);
  if (rows <= 0) return;
  detail::rms_norm_kernel<<<static_cast<unsigned>(rows), detail::k_block, 0, ctx.compute()>>>(
      x, weight.data, t, weight.numel(), eps, y);
  check_launch("rms_norm_kernel");
}

/// Rotates x [rows, heads, 2 * half] in place; cos/sin are device tables [seq, half] and row
/// r uses entry r % seq (rows = batch * seq, every sequence at the same positions).
inline void rope(const context& ctx, float* x, std::int64_t rows, std::int64_t seq,
                 std::int64_t heads, std::int64_t half, const float* cosv, const float* sinv) {
  const auto n = static_cast<std::size_t>(rows * heads * half);
  if (n == 0) return;
  detail::rope_kernel<<<detail::grid_for(n), detail::k_block, 0, ctx.compute()>>>(
      x, rows, seq, heads, half, cosv, sinv);
  check_launch("rope_kernel");
}

/// Keys and values of every layer on the device: [layer][batch][kv_head][capacity][head_dim],
/// float32 (the CPU kv_cache's layout).
class kv_cache {
 public:
  kv_cache() = default;
  kv_cache(std::int64_t layers, std::int64_t batch, std::int64_t kv_heads, std::int64_t head_dim,
           std::int64_t capacity)
      : layers_(layers),
        batch_(batch),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        capacity_(capacity) {
    if (layers <= 0 || batch <= 0 || kv_heads <= 0 || head_dim <= 0 || capacity <= 0)
      throw invalid_size("cuda kv_cache: every dimension must be positive (layers " +
                         std::to_string(layers) + ", batch " + std::to_string(batch) +
                         ", kv heads " + std::to_string(kv_heads) + ", head_dim " +
                         std::to_string(head_dim) + ", capacity " + std::to_string(capacity) + ")");
    const auto n = static_cast<std::size_t>(layers * layer_elems());
    k_.resize(n);
    v_.resize(n);
  }
  std::int64_t layers() const noexcept { return layers_; }
  std::int64_t batch() const noexcept { return batch_; }
  std::int64_t kv_heads() const noexcept { return kv_heads_; }
  std::int64_t head_dim() const noexcept { return head_dim_; }
  std::int64_t capacity() const noexcept { return capacity_; }
  std::int64_t length() const noexcept { return length_; }
  void advance(std::int64_t n) {
    if (n < 0 || length_ + n > capacity_)
      throw invalid_size("cuda kv_cache: " + std::to_string(length_) + " + " + std::to_string(n) +
                         " positions exceed the capacity " + std::to_string(capacity_));
    length_ += n;
  }
  void clear() noexcept { length_ = 0; }
  std::size_t bytes() const noexcept { return k_.bytes() + v_.bytes(); }
  float* k(std::int64_t layer) noexcept {
    return k_.data() + static_cast<std::size_t>(layer * layer_elems());
  }
  float* v(std::int64_t layer) noexcept {
    return v_.data() + static_cast<std::size_t>(layer * layer_elems());
  }

 private:
  std::int64_t layer_elems() const noexcept { return batch_ * kv_heads_ * capacity_ * head_dim_; }
  std::int64_t layers_ = 0, batch_ = 0, kv_heads_ = 0, head_dim_ = 0, capacity_ = 0, length_ = 0;
  device_buffer<float> k_, v_;
};

struct attention_shape {
  std::int64_t batch = 1;
  std::int64_t seq = 1;
  std::int64_t heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 1;
  std::optional<std::int64_t> sliding_window;
};

/// cpu::attention on the device: stores k_new / v_new ([batch, seq, kv_heads, head_dim],
/// rotated) at positions cache.length() .. + seq of `layer`, then writes
/// out [batch, seq, heads * head_dim] from q [batch, seq, heads, head_dim]. The caller
/// advances the cache afterwards.
inline void attention(const context& ctx, const float* q, const float* k_new, const float* v_new,
                      kv_cache& cache, std::int64_t layer, const attention_shape& s, float* out) {
  const std::int64_t past = cache.length();
  if (s.heads <= 0 || s.kv_heads <= 0 || s.heads % s.kv_heads != 0 || s.batch != cache.batch() ||
      s.kv_heads != cache.kv_heads() || s.head_dim != cache.head_dim() || layer < 0 ||
      layer >= cache.layers() || s.seq <= 0)
    throw invalid_size("cuda attention: shape (batch " + std::to_string(s.batch) + ", seq " +
                       std::to_string(s.seq) + ", heads " + std::to_string(s.heads) +
                       ", kv heads " + std::to_string(s.kv_heads) + ", head_dim " +
                       std::to_string(s.head_dim) + ", layer " + std::to_string(layer) +
                       ") does not match the cache");
  if (past + s.seq > cache.capacity())
    throw invalid_size("cuda attention: " + std::to_string(past) + " cached + " +
                       std::to_string(s.seq) + " new positions exceed the cache capacity " +
                       std::to_string(cache.capacity()));
  const auto kv_n = static_cast<std::size_t>(s.batch * s.seq * s.kv_heads * s.head_dim);
  detail::kv_store_kernel<<<detail::grid_for(kv_n), detail::k_block, 0, ctx.compute()>>>(
      k_new, v_new, cache.k(layer), cache.v(layer), s.batch, s.seq, s.kv_heads, s.head_dim,
      cache.capacity(), past);
  check_launch("kv_store_kernel");
  const std::size_t shared =
      (2 * static_cast<std::size_t>(s.head_dim) + 2 * detail::k_attn_block) * sizeof(float);
  if (shared > 48 * 1024)
    throw invalid_size("cuda attention: head_dim " + std::to_string(s.head_dim) +
                       " needs more than 48 KiB of shared memory");
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const std::int64_t blocks = s.batch * s.seq * s.heads;
  if (blocks > INT_MAX) throw invalid_size("cuda attention: too many queries for one launch");
  detail::attention_kernel<<<static_cast<unsigned>(blocks), detail::k_attn_block, shared,
                             ctx.compute()>>>(q, cache.k(layer), cache.v(layer), out, s.seq,
                                              s.heads, s.kv_heads, s.head_dim, cache.capacity(),
                                              past, s.sliding_window.value_or(0), scale);
  check_launch("attention_kernel");
}

/// g = silu(g) * u elementwise (n values).
inline void silu_mul(const context& ctx, float* g, const float* u, std::size_t n) {
  if (n == 0) return;
  detail::silu_mul_kernel<<<detail::grid_for(n), detail::k_block, 0, ctx.compute()>>>(g, u, n);
  check_launch("silu_mul_kernel");
}

/// x += y elementwise (the residual connection).
inline void add(const context& ctx, float* x, const float* y, std::size_t n) {
  if (n == 0) return;
  detail::add_kernel<<<detail::grid_for(n), detail::k_block, 0, ctx.compute()>>>(x, y, n);
  check_launch("add_kernel");
}

/// y[r, :] += bias for each of `rows` rows.
inline void add_bias(const context& ctx, float* y, std::int64_t rows, const device_weight& bias) {
  const int t = detail::type_code(bias);
  const auto n = static_cast<std::size_t>(rows * bias.numel());
  if (n == 0) return;
  detail::bias_kernel<<<detail::grid_for(n), detail::k_block, 0, ctx.compute()>>>(
      y, bias.data, t, rows, bias.numel());
  check_launch("bias_kernel");
}

/// out[r] = index of the first maximum of row r of logits [rows, cols] (NaN never wins).
inline void argmax(const context& ctx, const float* logits, std::int64_t rows, std::int64_t cols,
                   std::int64_t* out) {
  if (rows <= 0) return;
  if (cols <= 0) throw invalid_size("cuda argmax: empty logits");
  detail::argmax_kernel<<<static_cast<unsigned>(rows), detail::k_block, 0, ctx.compute()>>>(
      logits, cols, out);
  check_launch("argmax_kernel");
}

/// out = softmax of each row of x [rows, cols] (may alias).
inline void softmax(const context& ctx, const float* x, std::int64_t rows, std::int64_t cols,
                    float* out) {
  if (rows <= 0 || cols <= 0) return;
  detail::softmax_kernel<<<static_cast<unsigned>(rows), detail::k_block, 0, ctx.compute()>>>(
      x, cols, out);
  check_launch("softmax_kernel");
}

/// How linear() treats a bfloat16 / float16 weight.
enum class linear_mode : std::uint8_t {
  /// The activations are rounded to the weight's 16-bit type and cublasGemmEx multiplies with
  /// float32 accumulation (CUBLAS_COMPUTE_32F): how a bf16 / fp16 model runs its matmuls, and
  /// the fast path (tensor cores, half the activation traffic).
  weight_type,
  /// The weight is widened to float32 in a scratch buffer and multiplied by cublasSgemm with
  /// the float32 activations: the CPU forward's arithmetic (it widens weights, never rounds
  /// activations), for checks against it and Transformers' fp32-compute results.
  fp32_activations,
};

/// Scratch that linear() grows as needed (one per forward object; not shared across streams).
struct linear_workspace {
  device_buffer<unsigned short> x16;
  device_buffer<float> wide;
};

/// y[m, out] = x[m, in] W[out, in]^T (+ bias) with W row-major as in the checkpoint.
///
/// cuBLAS is column-major, and a row-major [r, c] matrix is the column-major [c, r] matrix
/// with leading dimension c. So W is column-major W^T ([in, out], ld in), x is x^T
/// ([in, m], ld in) and y is y^T ([out, m], ld out), and y^T = W x^T = op(A) B with
/// A = W^T stored, op(A) = transpose: gemm(OP_T, OP_N, M = out, N = m, K = in, A = W, lda = in,
/// B = x, ldb = in, C = y, ldc = out).
inline void linear(const context& ctx, const float* x, std::int64_t m, const device_weight& w,
                   const device_weight& bias, float* y, linear_workspace& ws,
                   linear_mode mode = linear_mode::weight_type) {
  const int t = detail::type_code(w);
  if (!bias.empty() && bias.numel() != w.rows)
    throw invalid_size("cuda linear '" + w.name + "': bias of " + std::to_string(bias.numel()) +
                       " values for " + std::to_string(w.rows) + " outputs");
  if (m == 0 || w.rows == 0) return;
  const int M = detail::to_int(w.rows, "cuda linear (out features)");
  const int N = detail::to_int(m, "cuda linear (rows)");
  const int K = detail::to_int(w.cols, "cuda linear (in features)");
  const float alpha = 1.0f, beta = 0.0f;
  if (t == detail::k_f32 || mode == linear_mode::fp32_activations) {
    const float* wf = static_cast<const float*>(w.data);
    if (t != detail::k_f32) {
      const auto n = static_cast<std::size_t>(w.numel());
      if (ws.wide.size() < n) {  // cudaFree under queued work is unsafe: drain first
        ctx.sync_compute();
        ws.wide.resize(n);
      }
      detail::widen_kernel<<<detail::grid_for(n), detail::k_block, 0, ctx.compute()>>>(
          w.data, t, n, ws.wide.data());
      check_launch("widen_kernel");
      wf = ws.wide.data();
    }
    check(cublasSgemm(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &alpha, wf, K, x, K, &beta, y,
                      M),
          ("cublasSgemm (linear '" + w.name + "')").c_str());
  } else {
    const auto n = static_cast<std::size_t>(m * w.cols);
    if (ws.x16.size() < n) {
      ctx.sync_compute();
      ws.x16.resize(n);
    }
    detail::narrow_kernel<<<detail::grid_for(n), detail::k_block, 0, ctx.compute()>>>(
        x, n, t, ws.x16.data());
    check_launch("narrow_kernel");
    const cudaDataType_t ab = t == detail::k_bf16 ? CUDA_R_16BF : CUDA_R_16F;
    check(cublasGemmEx(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &alpha, w.data, ab, K,
                       ws.x16.data(), ab, K, &beta, y, CUDA_R_32F, M, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          ("cublasGemmEx (linear '" + w.name + "')").c_str());
  }
  if (!bias.empty()) add_bias(ctx, y, m, bias);
}

}  // namespace stowage::exec::cuda
