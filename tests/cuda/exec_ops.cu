// GPU tests: every CUDA building block of the Llama forward (exec/cuda/ops.cuh) against its CPU
// twin in exec/cpu/* on random inputs. Tolerances: exact where both sides do the same float32
// operations in the same order (embedding gather, argmax, rope with the same cos/sin tables);
// a few float32 ulps of the values' scale where only the summation order differs (norm sums,
// dot products, softmax; cuBLAS and Eigen add in different orders). Without a CUDA device the
// program prints why and exits with 4 (ctest "skipped").
#include "cuda_test_main.hpp"

#include <stowage/exec/cpu/attention.hpp>
#include <stowage/exec/cpu/embedding.hpp>
#include <stowage/exec/cpu/linear.hpp>
#include <stowage/exec/cpu/mlp.hpp>
#include <stowage/exec/cpu/rms_norm.hpp>
#include <stowage/exec/cpu/rope.hpp>
#include <stowage/exec/cpu/sampling.hpp>
#include <stowage/exec/cuda/ops.cuh>
#include <stowage/precision/convert.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

namespace sw = stowage;
namespace cpu = stowage::exec::cpu;
namespace gpu = stowage::exec::cuda;

namespace {

std::vector<float> randn(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

template <class T>
gpu::device_buffer<T> to_device(const std::vector<T>& v) {
  gpu::device_buffer<T> b(std::max<std::size_t>(v.size(), 1));
  gpu::check(cudaMemcpy(b.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
             "test upload");
  // A pageable cudaMemcpy may return before its DMA lands, and the context's streams do not
  // wait for the legacy default stream: finish it before kernels read the buffer.
  gpu::check(cudaDeviceSynchronize(), "test upload (cudaDeviceSynchronize)");
  return b;
}

template <class T>
std::vector<T> to_host(const gpu::context& ctx, const T* p, std::size_t n) {
  ctx.sync_compute();
  std::vector<T> v(n);
  gpu::check(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "test download");
  return v;
}

float max_abs_diff(std::span<const float> a, std::span<const float> b) {
  REQUIRE(a.size() == b.size());
  float m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

std::vector<std::uint16_t> to_bits16(const std::vector<float>& v, sw::dtype t) {
  std::vector<std::uint16_t> o(v.size());
  if (t == sw::dtype::bfloat16)
    sw::precision::fp32_to_bf16(v, o);
  else
    sw::precision::fp32_to_fp16(v, o);
  return o;
}

/// A weight in three forms: host fp32 values, host ref in `type`, device copy in `type`.
struct test_weight {
  std::vector<float> f32;
  std::vector<std::uint16_t> bits;
  cpu::weight_ref host;
  gpu::device_buffer<std::byte> dev;
  gpu::device_weight dw;

  test_weight(std::int64_t rows, std::int64_t cols, sw::dtype type, unsigned seed,
              float scale = 1.0f)
      : f32(randn(static_cast<std::size_t>(rows * cols), seed, scale)) {
    const void* src = f32.data();
    std::size_t bytes = f32.size() * 4;
    if (type == sw::dtype::float32) {
      host = cpu::weight_ref::from_f32(f32.data(), rows, cols, "w");
    } else {
      bits = to_bits16(f32, type);
      host = cpu::weight_ref::from_bits16(bits.data(), type, rows, cols, "w");
      src = bits.data();
      bytes = bits.size() * 2;
    }
    dev.resize(bytes);
    gpu::check(cudaMemcpy(dev.data(), src, bytes, cudaMemcpyHostToDevice), "test upload");
    gpu::check(cudaDeviceSynchronize(), "test upload (cudaDeviceSynchronize)");
    dw = gpu::device_weight{dev.data(), type, rows, cols, "w"};
  }
};

}  // namespace

TEST_CASE("cuda embedding gathers the same rows as the CPU", "[cuda][ops]") {
  const auto type = GENERATE(sw::dtype::float32, sw::dtype::bfloat16, sw::dtype::float16);
  gpu::context ctx;
  test_weight table(50, 24, type, 1);
  const std::vector<std::int64_t> ids{3, 0, 49, 3, 17, 8};
  const auto d_ids = to_device(ids);
  gpu::device_buffer<float> out(ids.size() * 24);
  gpu::embedding(ctx, table.dw, ids, d_ids.data(), out.data());
  std::vector<float> expect(ids.size() * 24);
  cpu::embedding(table.host, ids, expect);
  CHECK(to_host(ctx, out.data(), out.size()) == expect);  // exact widening on both sides

  const std::vector<std::int64_t> bad{1, 50};
  CHECK_THROWS_AS(gpu::embedding(ctx, table.dw, bad, d_ids.data(), out.data()), sw::invalid_size);
}

TEST_CASE("cuda rms_norm matches the CPU", "[cuda][ops]") {
  const auto type = GENERATE(sw::dtype::float32, sw::dtype::bfloat16);
  const std::int64_t rows = 5, d = 300;  // d not a multiple of the block: the tail is summed
  gpu::context ctx;
  const auto x = randn(static_cast<std::size_t>(rows * d), 2, 3.0f);
  test_weight w(1, d, type, 3);
  auto dx = to_device(x);
  gpu::device_buffer<float> y(x.size());
  gpu::rms_norm(ctx, dx.data(), rows, w.dw, 1e-5f, y.data());
  std::vector<float> expect(x.size());
  cpu::rms_norm(x, cpu::to_f32(w.host), 1e-5f, expect);
  // Sums of 300 squares in another order: a few ulps of the scale factor (values ~1).
  CHECK(max_abs_diff(to_host(ctx, y.data(), y.size()), expect) <= 1e-5f);

  // In place (y aliases x), as the forward's final norm does.
  gpu::rms_norm(ctx, dx.data(), rows, w.dw, 1e-5f, dx.data());
  CHECK(max_abs_diff(to_host(ctx, dx.data(), dx.size()), expect) <= 1e-5f);
}

TEST_CASE("cuda rope rotates as the CPU rotary_embedding does", "[cuda][ops]") {
  cpu::rope_params p;
  p.type = "llama3";
  p.theta = 500000.0;
  p.dim = 16;
  p.factor = 8.0;
  p.original_max_position_embeddings = 32;
  cpu::rotary_embedding rope(p);
  const std::int64_t batch = 2, seq = 3, heads = 4, half = 8, past = 40;
  const auto rows = batch * seq;
  auto x = randn(static_cast<std::size_t>(rows * heads * 2 * half), 4);
  std::vector<float> cosv(static_cast<std::size_t>(seq * half)), sinv(cosv.size());
  for (std::int64_t t = 0; t < seq; ++t)
    rope.angles(past + t, cosv.data() + t * half, sinv.data() + t * half);
  gpu::context ctx;
  auto dx = to_device(x);
  const auto dc = to_device(cosv), ds = to_device(sinv);
  gpu::rope(ctx, dx.data(), rows, seq, heads, half, dc.data(), ds.data());
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto t = r % seq;
    rope.apply(x.data() + r * heads * 2 * half, heads, cosv.data() + t * half,
               sinv.data() + t * half);
  }
  // Same tables, same unfused products: equal up to the CPU compiler contracting into FMA.
  CHECK(max_abs_diff(to_host(ctx, dx.data(), dx.size()), x) <= 1e-6f);
}

TEST_CASE("cuda attention over the KV cache matches the CPU (prefill, decode, windows)",
          "[cuda][ops]") {
  const std::optional<std::int64_t> window =
      GENERATE(std::optional<std::int64_t>{}, std::optional<std::int64_t>{4});
  const std::int64_t batch = 2, heads = 6, kv_heads = 2, hd = 16, cap = 200;
  gpu::context ctx;
  cpu::kv_cache ccache(2, batch, kv_heads, hd, cap);
  gpu::kv_cache gcache(2, batch, kv_heads, hd, cap);
  stowage::exec::thread_pool pool(1);
  // Chunks: a prefill longer than one attention tile (128 keys), single decode steps, a chunk.
  const std::vector<std::int64_t> chunks{150, 1, 1, 5, 1};
  unsigned seed = 10;
  for (const auto seq : chunks) {
    const auto rows = static_cast<std::size_t>(batch * seq);
    for (std::int64_t layer = 0; layer < 2; ++layer) {
      const auto q = randn(rows * heads * hd, seed++), k = randn(rows * kv_heads * hd, seed++),
                 v = randn(rows * kv_heads * hd, seed++);
      const cpu::attention_shape cs{batch, seq, heads, kv_heads, hd, window};
      std::vector<float> expect(rows * heads * hd);
      cpu::attention(q, k, v, ccache, layer, cs, expect, pool);
      const auto dq = to_device(q), dk = to_device(k), dv = to_device(v);
      gpu::device_buffer<float> out(expect.size());
      const gpu::attention_shape gs{batch, seq, heads, kv_heads, hd, window};
      gpu::attention(ctx, dq.data(), dk.data(), dv.data(), gcache, layer, gs, out.data());
      INFO("chunk of " << seq << " at " << ccache.length() << ", layer " << layer);
      // Outputs are convex combinations of N(0,1) values; the streaming softmax rounds
      // differently from the two-pass one by a few ulps.
      CHECK(max_abs_diff(to_host(ctx, out.data(), out.size()), expect) <= 2e-5f);
    }
    ccache.advance(seq);
    gcache.advance(seq);
  }
  CHECK_THROWS_AS(gcache.advance(cap), sw::invalid_size);
}

TEST_CASE("cuda elementwise ops: silu gate, residual add, bias", "[cuda][ops]") {
  gpu::context ctx;
  const std::size_t n = 1000;
  auto g = randn(n, 20, 4.0f);
  const auto u = randn(n, 21);
  auto dg = to_device(g);
  const auto du = to_device(u);
  gpu::silu_mul(ctx, dg.data(), du.data(), n);
  for (std::size_t i = 0; i < n; ++i) g[i] = cpu::silu(g[i]) * u[i];
  // expf vs std::exp differ by an ulp or two: compare relative to the value (up to ~40).
  const auto got = to_host(ctx, dg.data(), n);
  float rel = 0;
  for (std::size_t i = 0; i < n; ++i)
    rel = std::max(rel, std::abs(got[i] - g[i]) / std::max(1.0f, std::abs(g[i])));
  CHECK(rel <= 2e-6f);

  auto x = randn(n, 22);
  auto dx = to_device(x);
  gpu::add(ctx, dx.data(), du.data(), n);
  for (std::size_t i = 0; i < n; ++i) x[i] += u[i];
  CHECK(to_host(ctx, dx.data(), n) == x);

  test_weight b(1, 40, sw::dtype::bfloat16, 23);
  gpu::add_bias(ctx, dx.data(), 25, b.dw);
  const auto bf = cpu::to_f32(b.host);
  for (std::size_t i = 0; i < n; ++i) x[i] += bf[i % 40];
  CHECK(to_host(ctx, dx.data(), n) == x);
}

TEST_CASE("cuda linear: y = x W^T for a row-major [out, in] weight, as the CPU", "[cuda][ops]") {
  const auto type = GENERATE(sw::dtype::float32, sw::dtype::bfloat16, sw::dtype::float16);
  const std::int64_t m = GENERATE(1, 7);  // decode (gemv) and prefill shapes
  const auto mode = GENERATE(gpu::linear_mode::weight_type, gpu::linear_mode::fp32_activations);
  INFO("dtype " << sw::name(type) << ", m " << m);
  const std::int64_t in = 70, out = 37;  // non-square: a swapped transpose cannot pass
  gpu::context ctx;
  stowage::exec::thread_pool pool(1);
  test_weight w(out, in, type, 30, 0.1f);
  test_weight b(1, out, sw::dtype::float32, 31);
  const auto x = randn(static_cast<std::size_t>(m * in), 32);
  const auto dx = to_device(x);
  gpu::device_buffer<float> y(static_cast<std::size_t>(m * out));
  gpu::linear_workspace ws;
  gpu::linear(ctx, dx.data(), m, w.dw, b.dw, y.data(), ws, mode);

  // The CPU reference: the weight_type path rounds the activations to the weight's 16-bit
  // type first (what cublasGemmEx multiplies); then both sides accumulate in float32.
  std::vector<float> xin = x;
  if (type != sw::dtype::float32 && mode == gpu::linear_mode::weight_type) {
    const auto bits = to_bits16(x, type);
    if (type == sw::dtype::bfloat16)
      sw::precision::bf16_to_fp32(bits, xin);
    else
      sw::precision::fp16_to_fp32(bits, xin);
  }
  const auto expect = cpu::linear(xin, m, w.host, b.f32, pool);
  // |y| ~ sqrt(70) * 0.1 + |bias| ~ 2: float32 sums of 70 products in another order.
  CHECK(max_abs_diff(to_host(ctx, y.data(), y.size()), expect) <= 1e-4f);

  // And without a bias, a second call reusing the workspace.
  gpu::linear(ctx, dx.data(), m, w.dw, gpu::device_weight{}, y.data(), ws, mode);
  const auto expect_nb = cpu::linear(xin, m, w.host, {}, pool);
  CHECK(max_abs_diff(to_host(ctx, y.data(), y.size()), expect_nb) <= 1e-4f);
}

TEST_CASE("cuda linear rejects a weight it cannot read and a mismatched bias", "[cuda][ops]") {
  gpu::context ctx;
  gpu::device_buffer<float> buf(64);
  gpu::linear_workspace ws;
  gpu::device_weight w{buf.data(), sw::dtype::int8, 4, 4, "model.layers.0.mlp.up_proj.weight"};
  CHECK_THROWS_AS(gpu::linear(ctx, buf.data(), 1, w, {}, buf.data(), ws), sw::invalid_dtype);
  w.type = sw::dtype::float32;
  gpu::device_weight bias{buf.data(), sw::dtype::float32, 1, 3, "bias"};
  CHECK_THROWS_AS(gpu::linear(ctx, buf.data(), 1, w, bias, buf.data(), ws), sw::invalid_size);
}

TEST_CASE("cuda argmax picks the CPU's token (first maximum, NaN never wins)", "[cuda][ops]") {
  const std::int64_t cols = 1000;
  std::vector<float> logits = randn(static_cast<std::size_t>(5 * cols), 40);
  // Row 1: a tie between two maxima, the first must win.
  logits[cols + 700] = 50.0f;
  logits[cols + 300] = 50.0f;
  // Row 2: NaNs around a maximum.
  logits[2 * cols + 0] = std::numeric_limits<float>::quiet_NaN();
  logits[2 * cols + 999] = std::numeric_limits<float>::quiet_NaN();
  logits[2 * cols + 500] = 60.0f;
  // Row 3: all -inf: index 0.
  std::fill_n(logits.begin() + 3 * cols, cols, -std::numeric_limits<float>::infinity());
  // Row 4: all NaN: index 0.
  std::fill_n(logits.begin() + 4 * cols, cols, std::numeric_limits<float>::quiet_NaN());
  gpu::context ctx;
  const auto d = to_device(logits);
  gpu::device_buffer<std::int64_t> out(5);
  gpu::argmax(ctx, d.data(), 5, cols, out.data());
  const auto got = to_host(ctx, out.data(), 5);
  for (std::int64_t r = 0; r < 5; ++r) {
    INFO("row " << r);
    CHECK(got[static_cast<std::size_t>(r)] ==
          cpu::argmax(std::span<const float>(logits).subspan(static_cast<std::size_t>(r * cols),
                                                             static_cast<std::size_t>(cols))));
  }
  CHECK(got[1] == 300);
  CHECK(got[2] == 500);
}

TEST_CASE("cuda softmax matches exp(x - max) / sum", "[cuda][ops]") {
  const std::int64_t rows = 3, cols = 777;
  const auto x = randn(static_cast<std::size_t>(rows * cols), 50, 5.0f);
  gpu::context ctx;
  const auto d = to_device(x);
  gpu::device_buffer<float> out(x.size());
  gpu::softmax(ctx, d.data(), rows, cols, out.data());
  const auto got = to_host(ctx, out.data(), out.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto row = std::span<const float>(x).subspan(static_cast<std::size_t>(r * cols),
                                                       static_cast<std::size_t>(cols));
    const double mx = *std::max_element(row.begin(), row.end());
    double sum = 0;
    for (float v : row) sum += std::exp(v - mx);
    double total = 0;
    for (std::int64_t j = 0; j < cols; ++j) {
      const double p = std::exp(row[static_cast<std::size_t>(j)] - mx) / sum;
      CHECK(std::abs(got[static_cast<std::size_t>(r * cols + j)] - p) <= 1e-6 + 1e-5 * p);
      total += got[static_cast<std::size_t>(r * cols + j)];
    }
    CHECK(std::abs(total - 1.0) <= 1e-5);
  }
}
