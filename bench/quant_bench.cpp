// bench/quant_bench.cpp: quantization throughput (NF4/int8 quantize, dequantize), the fused NF4 /
// int8 matvec against plain bf16 and fp32 matvecs of the same shape, and this machine's memory
// read bandwidth, all in one run. bench/quant_side_by_side.py runs it next to bitsandbytes.
#include <benchmark/benchmark.h>

#include <stowage/precision/int8.hpp>
#include <stowage/precision/nf4.hpp>

#include <cstring>
#include <random>
#include <vector>

namespace sp = stowage::precision;
using stowage::dtype;

namespace {

constexpr std::size_t kN = 4096, kK = 4096;

const std::vector<float>& weights() {
  static const std::vector<float> w = [] {
    std::mt19937 g(1);
    std::normal_distribution<float> d(0.0f, 0.02f);
    std::vector<float> v(kN * kK);
    for (auto& x : v) x = d(g);
    return v;
  }();
  return w;
}
const std::vector<std::uint16_t>& weights_bf16() {
  static const std::vector<std::uint16_t> w = [] {
    std::vector<std::uint16_t> v(kN * kK);
    sp::fp32_to_bf16(weights(), v);
    return v;
  }();
  return w;
}
const sp::quantized_4bit& nf4_weight() {
  static const sp::quantized_4bit q = sp::quantize_4bit(
      weights().data(), dtype::float32, std::vector<std::int64_t>{kN, kK},
      {.type = sp::quant_type::nf4, .blocksize = 64, .double_quant = false, .offset = {}});
  return q;
}

// Memory read bandwidth: sum a buffer far larger than the caches.
void BM_memory_read(benchmark::State& st) {
  std::vector<std::uint64_t> buf(std::size_t{256} << 20 >> 3, 1);
  for (auto _ : st) {
    std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (std::size_t i = 0; i < buf.size(); i += 4) {
      s0 += buf[i];
      s1 += buf[i + 1];
      s2 += buf[i + 2];
      s3 += buf[i + 3];
    }
    benchmark::DoNotOptimize(s0 + s1 + s2 + s3);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * buf.size() * 8));
}
BENCHMARK(BM_memory_read)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_memcpy(benchmark::State& st) {
  std::vector<char> a(std::size_t{256} << 20, 1), b(a.size());
  for (auto _ : st) {
    std::memcpy(b.data(), a.data(), a.size());
    benchmark::ClobberMemory();
  }
  // read + write traffic
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * a.size() * 2));
}
BENCHMARK(BM_memcpy)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_quantize_nf4_fp32(benchmark::State& st) {
  std::vector<std::uint8_t> packed(kN * kK / 2);
  std::vector<float> absmax(kN * kK / 64);
  for (auto _ : st)
    sp::quantize_4bit_raw(weights().data(), dtype::float32, kN * kK, sp::quant_type::nf4, 64,
                          packed.data(), absmax.data());
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 4));  // input bytes
}
BENCHMARK(BM_quantize_nf4_fp32)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_quantize_nf4_bf16(benchmark::State& st) {
  std::vector<std::uint8_t> packed(kN * kK / 2);
  std::vector<float> absmax(kN * kK / 64);
  for (auto _ : st)
    sp::quantize_4bit_raw(weights_bf16().data(), dtype::bfloat16, kN * kK, sp::quant_type::nf4, 64,
                          packed.data(), absmax.data());
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 2));
}
BENCHMARK(BM_quantize_nf4_bf16)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_dequantize_nf4(benchmark::State& st) {
  const dtype out_type = st.range(0) == 0 ? dtype::float32 : dtype::bfloat16;
  std::vector<std::uint8_t> out(kN * kK * stowage::element_size(out_type));
  const auto& q = nf4_weight();
  for (auto _ : st) sp::dequantize_4bit(q, out_type, out.data());
  // bytes moved: packed in + output written
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * (q.packed.size() + out.size())));
  st.SetLabel(std::string(stowage::name(out_type)));
}
BENCHMARK(BM_dequantize_nf4)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_quantize_int8_fp16_path(benchmark::State& st) {
  std::vector<std::int8_t> cb(kN * kK);
  std::vector<float> scb(kN);
  for (auto _ : st)
    sp::quantize_int8_rowwise_raw(weights_bf16().data(), dtype::bfloat16, kN, kK, cb.data(),
                                  scb.data());
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 2));
}
BENCHMARK(BM_quantize_int8_fp16_path)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_matvec_nf4(benchmark::State& st) {
  const auto M = static_cast<std::size_t>(st.range(0));
  std::vector<float> x(M * kK, 0.5f), y(M * kN);
  const auto& q = nf4_weight();
  for (auto _ : st) {
    sp::gemm_4bit(x, M, q, y);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(
      static_cast<std::int64_t>(st.iterations() * (q.packed.size() + q.state.absmax.size() * 4)));
}
BENCHMARK(BM_matvec_nf4)->Arg(1)->Arg(4)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_matvec_int8(benchmark::State& st) {
  static const auto q = sp::quantize_int8(weights().data(), dtype::float32, kN, kK);
  std::vector<float> x(kK, 0.5f), y(kN);
  for (auto _ : st) {
    sp::gemm_int8(x, 1, q, y);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK));
}
BENCHMARK(BM_matvec_int8)->Unit(benchmark::kMicrosecond)->UseRealTime();

// Plain matvecs on the same thread split, for comparison: y = W x with W in bf16 or fp32.
template <class W, class Load>
void plain_matvec(const W* w, const float* x, float* y, Load load) {
  sp::detail::parallel_for(kN, 64, [&](std::size_t n0, std::size_t n1) {
    for (std::size_t n = n0; n < n1; ++n) {
      float lane[16] = {};
      const W* row = w + n * kK;
      for (std::size_t k = 0; k < kK; k += 16)
        for (std::size_t l = 0; l < 16; ++l) lane[l] += load(row[k + l]) * x[k + l];
      float s = 0;
      for (float v : lane) s += v;
      y[n] = s;
    }
  });
}

void BM_matvec_bf16(benchmark::State& st) {
  std::vector<float> x(kK, 0.5f), y(kN);
  for (auto _ : st) {
    plain_matvec(weights_bf16().data(), x.data(), y.data(),
                 [](std::uint16_t h) { return sp::bf16_bits_to_fp32(h); });
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 2));
}
BENCHMARK(BM_matvec_bf16)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_matvec_fp32(benchmark::State& st) {
  std::vector<float> x(kK, 0.5f), y(kN);
  for (auto _ : st) {
    plain_matvec(weights().data(), x.data(), y.data(), [](float f) { return f; });
    benchmark::DoNotOptimize(y.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 4));
}
BENCHMARK(BM_matvec_fp32)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
