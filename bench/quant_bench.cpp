// bench/quant_bench.cpp: quantization throughput (NF4/FP4/int8 quantize, dequantize), the fused
// NF4 / int8 matvec and small-batch products against plain bf16 and fp32 ones of the same shape,
// and this machine's memory read bandwidth, all in one run. bench/quant_side_by_side.py runs it
// next to bitsandbytes. The plain baselines get the same treatment as the quantized kernels
// (AVX-512 / AVX2 + FMA chosen at run time, the same accumulator counts and thread split), so the
// comparison is between weight formats, not between levels of tuning.
#include <benchmark/benchmark.h>

#include <stowage/exec/cpu/linear.hpp>
#include <stowage/precision/int8.hpp>
#include <stowage/precision/nf4.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
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
const sp::quantized_4bit& weight_4bit(sp::quant_type t) {
  static const sp::quantized_4bit nf4 = sp::quantize_4bit(
      weights().data(), dtype::float32, std::vector<std::int64_t>{kN, kK},
      {.type = sp::quant_type::nf4, .blocksize = 64, .double_quant = false, .offset = {}});
  static const sp::quantized_4bit fp4 = sp::quantize_4bit(
      weights().data(), dtype::float32, std::vector<std::int64_t>{kN, kK},
      {.type = sp::quant_type::fp4, .blocksize = 64, .double_quant = false, .offset = {}});
  return t == sp::quant_type::nf4 ? nf4 : fp4;
}
const sp::quantized_int8& weight_int8() {
  static const auto q = sp::quantize_int8(weights().data(), dtype::float32, kN, kK);
  return q;
}

// Every kernel benchmark streams its operands from DRAM, as the bandwidth probes below do: a
// 4096 x 4096 weight is 8-64 MiB, the size of this class of machine's L3, so a benchmark that
// reused one buffer would read part of it from cache on every iteration and report more than the
// memory can deliver. Each one instead allocates `rotation_copies` independent copies of its inputs
// and outputs, together at least 4x the L3 (and no less than the read probe's 256 MiB, which also
// covers a CPU whose cores see more than one L3 slice), and uses the next copy each iteration: by
// the time a copy comes round again the others have evicted it. SetBytesProcessed still counts
// the bytes of one copy per iteration, now bytes that really cross the memory bus.
std::size_t l3_cache_bytes() {
  static const std::size_t bytes = [] {
    // sysfs first: glibc's sysconf reports the whole socket's L3 on some virtual machines (384
    // MiB on a 32 MiB one here), which would only make the rotation needlessly large.
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index3/size");
    std::size_t v = 0;
    char unit = 0;
    if (f >> v) {
      if (f >> unit) v <<= unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
      if (v > 0) return v;
    }
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (const long s = sysconf(_SC_LEVEL3_CACHE_SIZE); s > 0) return static_cast<std::size_t>(s);
#endif
    return std::size_t{32} << 20;
  }();
  return bytes;
}

constexpr std::size_t kMiB = std::size_t{1} << 20;

// How many copies of a working set of `bytes_per_copy` (inputs + outputs) to rotate through.
std::size_t rotation_copies(std::size_t bytes_per_copy) {
  const std::size_t target = std::max(4 * l3_cache_bytes(), 256 * kMiB);
  const std::size_t cap = 1536 * kMiB;  // the machine is shared: bound what one benchmark holds
  const std::size_t k = std::max<std::size_t>(2, (target + bytes_per_copy - 1) / bytes_per_copy);
  return std::max<std::size_t>(1, std::min(k, cap / bytes_per_copy));
}

std::string rotation_label(std::size_t copies, std::size_t bytes_per_copy) {
  return std::to_string(copies) + " x " + std::to_string(bytes_per_copy / kMiB) + " MiB rotated";
}

std::size_t next_copy(std::size_t i, std::size_t copies) { return i + 1 == copies ? 0 : i + 1; }

// Memory read bandwidth: sum a buffer far larger than the caches, on the same threads the
// kernels use (one contiguous share per chunk, as the kernels split their work), with AVX2 loads
// where the CPU has them: a scalar sum is partly compute-bound here and would understate the
// bandwidth (and flatter the kernels' percentages).
std::uint64_t sum_portable(const std::uint64_t* p, std::size_t n) {
  std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (std::size_t i = 0; i < n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  return s0 + s1 + s2 + s3;
}
#if defined(STOWAGE_QUANT_X86)
STOWAGE_QUANT_AVX2_FN std::uint64_t sum_avx2(const std::uint64_t* p, std::size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (std::size_t i = 0; i < n; i += 16) {
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    c = _mm256_add_epi64(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    d = _mm256_add_epi64(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) std::uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t),
                     _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  return t[0] + t[1] + t[2] + t[3];
}
#endif

void BM_memory_read(benchmark::State& st) {
  std::vector<std::uint64_t> buf(std::size_t{256} << 20 >> 3, 1);
  constexpr std::size_t piece = 4096;  // uint64 per chunk unit (32 KiB)
  for (auto _ : st) {
    std::atomic<std::uint64_t> total{0};
    sp::detail::parallel_for(buf.size() / piece, 1, [&](std::size_t b, std::size_t e) {
      const std::uint64_t* p = buf.data() + b * piece;
      const std::size_t n = (e - b) * piece;
#if defined(STOWAGE_QUANT_X86)
      if (sp::detail::use_avx2()) {
        total += sum_avx2(p, n);
        return;
      }
#endif
      total += sum_portable(p, n);
    });
    benchmark::DoNotOptimize(total.load());
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

// Quantize a 4096 x 4096 weight (arg 0: fp32 input, 1: bf16 input); bytes = input bytes.
template <sp::quant_type Q>
void BM_quantize_4bit(benchmark::State& st) {
  const bool bf16 = st.range(0) == 1;
  const std::size_t in_bytes = kN * kK * (bf16 ? 2 : 4);
  const std::size_t copies = rotation_copies(in_bytes + kN * kK / 2 + kN * kK / 64 * 4);
  std::vector<std::vector<float>> in32;
  std::vector<std::vector<std::uint16_t>> in16;
  if (bf16)
    in16.assign(copies, weights_bf16());
  else
    in32.assign(copies, weights());
  std::vector<std::vector<std::uint8_t>> packed(copies, std::vector<std::uint8_t>(kN * kK / 2));
  std::vector<std::vector<float>> absmax(copies, std::vector<float>(kN * kK / 64));
  std::size_t i = 0;
  for (auto _ : st) {
    const void* in =
        bf16 ? static_cast<const void*>(in16[i].data()) : static_cast<const void*>(in32[i].data());
    sp::quantize_4bit_raw(in, bf16 ? dtype::bfloat16 : dtype::float32, kN * kK, Q, 64,
                          packed[i].data(), absmax[i].data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * in_bytes));
  st.SetLabel(std::string(bf16 ? "bf16 in, " : "fp32 in, ") +
              rotation_label(copies, in_bytes + kN * kK / 2 + kN * kK / 64 * 4));
}
void BM_quantize_nf4(benchmark::State& st) { BM_quantize_4bit<sp::quant_type::nf4>(st); }
void BM_quantize_fp4(benchmark::State& st) { BM_quantize_4bit<sp::quant_type::fp4>(st); }
BENCHMARK(BM_quantize_nf4)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_quantize_fp4)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// Dequantize (arg 0: to fp32, 1: to bf16); bytes = packed + absmax read + output written.
template <sp::quant_type Q>
void BM_dequantize_4bit(benchmark::State& st) {
  const dtype out_type = st.range(0) == 0 ? dtype::float32 : dtype::bfloat16;
  const auto& q0 = weight_4bit(Q);
  const std::size_t out_bytes = kN * kK * stowage::element_size(out_type);
  const std::size_t bytes = q0.packed.size() + q0.state.absmax.size() * 4 + out_bytes;
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<sp::quantized_4bit> q(copies, q0);
  std::vector<std::vector<std::uint8_t>> out(copies, std::vector<std::uint8_t>(out_bytes));
  std::size_t i = 0;
  for (auto _ : st) {
    sp::dequantize_4bit(q[i], out_type, out[i].data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * bytes));
  st.SetLabel(std::string(stowage::name(out_type)) + ", " + rotation_label(copies, bytes));
}
void BM_dequantize_nf4(benchmark::State& st) { BM_dequantize_4bit<sp::quant_type::nf4>(st); }
void BM_dequantize_fp4(benchmark::State& st) { BM_dequantize_4bit<sp::quant_type::fp4>(st); }
BENCHMARK(BM_dequantize_nf4)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dequantize_fp4)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// LLM.int8 weight quantization from bf16 (through fp16, as Int8Params); bytes = input.
void BM_quantize_int8(benchmark::State& st) {
  const std::size_t bytes = kN * kK * 2 + kN * kK + kN * 4;
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<std::vector<std::uint16_t>> in(copies, weights_bf16());
  std::vector<std::vector<std::int8_t>> cb(copies, std::vector<std::int8_t>(kN * kK));
  std::vector<std::vector<float>> scb(copies, std::vector<float>(kN));
  std::size_t i = 0;
  for (auto _ : st) {
    sp::quantize_int8_rowwise_raw(in[i].data(), dtype::bfloat16, kN, kK, cb[i].data(),
                                  scb[i].data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 2));
  st.SetLabel(rotation_label(copies, bytes));
}
BENCHMARK(BM_quantize_int8)->Unit(benchmark::kMillisecond)->UseRealTime();

// int8 -> fp32; bytes = CB + SCB read + output written.
void BM_dequantize_int8(benchmark::State& st) {
  const std::size_t bytes = kN * kK * 5 + kN * 4;
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<sp::quantized_int8> q(copies, weight_int8());
  std::vector<std::vector<float>> out(copies, std::vector<float>(kN * kK));
  std::size_t i = 0;
  for (auto _ : st) {
    sp::dequantize_int8_raw(q[i].cb.data(), q[i].scb.data(), kN, kK, out[i].data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * kN * kK * 5));
  st.SetLabel(rotation_label(copies, bytes));
}
BENCHMARK(BM_dequantize_int8)->Unit(benchmark::kMillisecond)->UseRealTime();

// Fused NF4 product, M = batch rows; bytes = weight bytes (packed + absmax). The products rotate
// through copies of the weight only: x and y (at most 128 KiB) are the activations, which a
// decode step has hot in cache too.
void BM_matvec_nf4(benchmark::State& st) {
  const auto M = static_cast<std::size_t>(st.range(0));
  std::vector<float> x(M * kK, 0.5f), y(M * kN);
  const auto& q0 = weight_4bit(sp::quant_type::nf4);
  const std::size_t bytes = q0.packed.size() + q0.state.absmax.size() * 4;
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<sp::quantized_4bit> q(copies, q0);
  std::size_t i = 0;
  for (auto _ : st) {
    sp::gemm_4bit(x, M, q[i], y);
    benchmark::DoNotOptimize(y.data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * bytes));
  st.SetLabel(rotation_label(copies, bytes));
}
BENCHMARK(BM_matvec_nf4)->Arg(1)->Arg(4)->Arg(8)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_matvec_int8(benchmark::State& st) {
  const std::size_t bytes = kN * (kK + 4);
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<sp::quantized_int8> q(copies, weight_int8());
  std::vector<float> x(kK, 0.5f), y(kN);
  std::size_t i = 0;
  for (auto _ : st) {
    sp::gemm_int8(x, 1, q[i], y);
    benchmark::DoNotOptimize(y.data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * bytes));
  st.SetLabel(rotation_label(copies, bytes));
}
BENCHMARK(BM_matvec_int8)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---- Plain baselines: Y [M, N] = X [M, K] W^T with W in bf16 or fp32, M <= 8.

template <std::size_t MB, class W>
void plain_rows_portable(const W* w, const float* x, float* y, std::size_t n0, std::size_t n1) {
  for (std::size_t n = n0; n < n1; ++n) {
    const W* row = w + n * kK;
    for (std::size_t m = 0; m < MB; ++m) {
      float lane[16] = {};
      for (std::size_t k = 0; k < kK; k += 16)
        for (std::size_t l = 0; l < 16; ++l) {
          float wv;
          if constexpr (sizeof(W) == 2)
            wv = sp::bf16_bits_to_fp32(row[k + l]);
          else
            wv = row[k + l];
          lane[l] += wv * x[m * kK + k + l];
        }
      float s = 0;
      for (float v : lane) s += v;
      y[m * kN + n] = s;
    }
  }
}

#if defined(STOWAGE_QUANT_X86)
template <std::size_t MB, class W>
STOWAGE_QUANT_AVX2_FN void plain_rows_avx2(const W* w, const float* x, float* y, std::size_t n0,
                                           std::size_t n1, std::size_t kb, std::size_t ke) {
  constexpr std::size_t NA = MB <= 2 ? 4 : MB == 4 ? 2 : 1;  // as the fused kernels
  for (std::size_t n = n0; n < n1; ++n) {
    const W* row = w + n * kK;
    __m256 va[MB][NA];
    for (std::size_t m = 0; m < MB; ++m)
      for (std::size_t a = 0; a < NA; ++a) va[m][a] = _mm256_setzero_ps();
    for (std::size_t k = kb; k < ke; k += 32) {
      __m256 wv[4];
      for (std::size_t q = 0; q < 4; ++q) {
        if constexpr (sizeof(W) == 2)
          wv[q] = _mm256_castsi256_ps(_mm256_slli_epi32(
              _mm256_cvtepu16_epi32(
                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 8 * q))),
              16));
        else
          wv[q] = _mm256_loadu_ps(row + k + 8 * q);
      }
      for (std::size_t m = 0; m < MB; ++m)
        for (std::size_t q = 0; q < 4; ++q)
          va[m][q % NA] =
              _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(x + m * kK + k + 8 * q), va[m][q % NA]);
    }
    for (std::size_t m = 0; m < MB; ++m) {
      __m256 s = va[m][0];
      for (std::size_t a = 1; a < NA; ++a) s = _mm256_add_ps(s, va[m][a]);
      y[m * kN + n] = (kb ? y[m * kN + n] : 0.0f) + sp::detail::avx2::hsum(s);
    }
  }
}

template <std::size_t MB, class W>
STOWAGE_QUANT_AVX512_FN void plain_rows_512(const W* w, const float* x, float* y, std::size_t n0,
                                            std::size_t n1, std::size_t kb, std::size_t ke) {
  constexpr std::size_t NA = MB <= 4 ? 4 : 2;  // as the fused kernels
  constexpr __mmask16 all = 0xffff;
  for (std::size_t n = n0; n < n1; ++n) {
    const W* row = w + n * kK;
    __m512 va[MB][NA];
    for (std::size_t m = 0; m < MB; ++m)
      for (std::size_t a = 0; a < NA; ++a) va[m][a] = _mm512_setzero_ps();
    for (std::size_t k = kb; k < ke; k += 64) {
      __m512 wv[4];
      for (std::size_t q = 0; q < 4; ++q) {
        if constexpr (sizeof(W) == 2)
          wv[q] = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
              all,
              _mm512_maskz_cvtepu16_epi32(
                  all, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 16 * q))),
              16));
        else
          wv[q] = _mm512_loadu_ps(row + k + 16 * q);
      }
      for (std::size_t m = 0; m < MB; ++m)
        for (std::size_t q = 0; q < 4; ++q)
          va[m][q % NA] =
              _mm512_fmadd_ps(wv[q], _mm512_loadu_ps(x + m * kK + k + 16 * q), va[m][q % NA]);
    }
    for (std::size_t m = 0; m < MB; ++m) {
      __m512 s = va[m][0];
      for (std::size_t a = 1; a < NA; ++a) s = _mm512_add_ps(s, va[m][a]);
      y[m * kN + n] = (kb ? y[m * kN + n] : 0.0f) + sp::detail::avx2::hsum512(s);
    }
  }
}
#endif

template <std::size_t MB, class W>
void plain_gemm(const W* w, const float* x, float* y) {
  sp::detail::parallel_for(kN, 16, [&](std::size_t n0, std::size_t n1) {
#if defined(STOWAGE_QUANT_X86)
    // The same column chunking and row tiles as gemm_4bit (activations stay in L1).
    const bool v512 = sp::detail::use_avx512(), v2 = sp::detail::use_avx2();
    if (v2) {
      const std::size_t kc = MB == 1 ? kK : 4096 / MB;
      for (std::size_t t0 = n0; t0 < n1; t0 += 16)
        for (std::size_t kb = 0; kb < kK; kb += kc) {
          if (v512)
            plain_rows_512<MB>(w, x, y, t0, std::min(n1, t0 + 16), kb, kb + kc);
          else
            plain_rows_avx2<MB>(w, x, y, t0, std::min(n1, t0 + 16), kb, kb + kc);
        }
      return;
    }
#endif
    plain_rows_portable<MB>(w, x, y, n0, n1);
  });
}

template <class W>
void run_plain(benchmark::State& st, const std::vector<W>& w0) {
  const auto M = static_cast<std::size_t>(st.range(0));
  const std::size_t bytes = kN * kK * sizeof(W);
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<std::vector<W>> w(copies, w0);
  std::vector<float> x(M * kK, 0.5f), y(M * kN);
  std::size_t i = 0;
  for (auto _ : st) {
    if (M == 1)
      plain_gemm<1>(w[i].data(), x.data(), y.data());
    else if (M == 4)
      plain_gemm<4>(w[i].data(), x.data(), y.data());
    else
      plain_gemm<8>(w[i].data(), x.data(), y.data());
    benchmark::DoNotOptimize(y.data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * bytes));
  st.SetLabel(rotation_label(copies, bytes));
}

void BM_matvec_bf16(benchmark::State& st) { run_plain(st, weights_bf16()); }
BENCHMARK(BM_matvec_bf16)->Arg(1)->Arg(4)->Arg(8)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_matvec_fp32(benchmark::State& st) { run_plain(st, weights()); }
BENCHMARK(BM_matvec_fp32)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The library's general bf16 Linear (exec/cpu/linear.hpp: widen a tile, Eigen product), M = 1.
void BM_linear_bf16(benchmark::State& st) {
  const std::size_t bytes = kN * kK * 2;
  const std::size_t copies = rotation_copies(bytes);
  const std::vector<std::vector<std::uint16_t>> bits(copies, weights_bf16());
  std::vector<stowage::exec::cpu::weight_ref> w;
  for (const auto& b : bits)
    w.push_back(
        stowage::exec::cpu::weight_ref::from_bits16(b.data(), dtype::bfloat16, kN, kK, "w"));
  std::vector<float> x(kK, 0.5f), y(kN);
  auto& pool = stowage::exec::default_thread_pool();
  std::size_t i = 0;
  for (auto _ : st) {
    stowage::exec::cpu::linear(x, 1, w[i], {}, y, pool);
    benchmark::DoNotOptimize(y.data());
    i = next_copy(i, copies);
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * bytes));
  st.SetLabel(rotation_label(copies, bytes));
}
BENCHMARK(BM_linear_bf16)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  // STOWAGE_QUANT_THREADS=n limits the kernels (and the plain baselines) to n threads.
  if (const char* t = std::getenv("STOWAGE_QUANT_THREADS"))
    sp::kernel_threads() = static_cast<unsigned>(std::atoi(t));
  // Build the inputs before any timing.
  (void)weights_bf16();
  (void)weight_4bit(sp::quant_type::nf4);
  (void)weight_int8();
  benchmark::AddCustomContext("l3_cache_bytes", std::to_string(l3_cache_bytes()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
