// bench/quantize_load_bench.cpp: the stowage half of bench/quantize_load_side_by_side.py.
//   quantize_load_bench CHECKPOINT_DIR [--quant nf4|fp4|int8] [--double-quant]
//                       [--dtype float16|bfloat16|float32] [--threads N] [--window BYTES]
// Quantize-on-load of the Llama in CHECKPOINT_DIR (config.json + shards) with device_map
// {"": "cpu"}: load_checkpoint_and_dispatch with load_options::quantization (Transformers'
// modules_to_not_convert: lm_head stays in `dtype`). Prints one JSON line: seconds, checkpoint
// bytes read, resident bytes of the loaded (quantized) model, the source bytes of the weights
// that were quantized and their quantize throughput, and this process's peak RSS (getrusage)
// before and after loading. One cold-process run per measurement (peak RSS needs it), so
// Google Benchmark's runner is not used.
#include <stowage/dispatch/load.hpp>
#include <stowage/dispatch/quantized_weights.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/precision/floating.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <sys/resource.h>

namespace {

long peak_rss_kib() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

}  // namespace

int main(int argc, char** argv) {
  namespace sw = stowage;
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: quantize_load_bench DIR [--quant nf4|fp4|int8] [--double-quant] "
                 "[--dtype D] [--threads N] [--window BYTES]\n");
    return 2;
  }
  const std::string dir = argv[1];
  std::string quant = "nf4";
  bool dq = false;
  sw::dtype dt = sw::dtype::float16;
  unsigned threads = 0;
  std::size_t window = std::size_t{64} << 20;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--quant")
      quant = next();
    else if (a == "--double-quant")
      dq = true;
    else if (a == "--dtype")
      dt = sw::dtype_from_name(next());
    else if (a == "--threads")
      threads = static_cast<unsigned>(std::stoul(next()));
    else if (a == "--window")
      window = std::stoull(next());
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  try {
    const auto cfg = sw::models::llama_config::from_file(dir + "/config.json");
    const auto tree = sw::to_module_tree(
        sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::fp16>>(cfg));
    sw::precision::bnb_config q;
    if (quant == "int8") {
      q.load_in_8bit = true;
    } else {
      q.load_in_4bit = true;
      q.bnb_4bit_quant_type =
          quant == "fp4" ? sw::precision::quant_type::fp4 : sw::precision::quant_type::nf4;
      q.bnb_4bit_use_double_quant = dq;
      q.bnb_4bit_compute_dtype = dt;
    }
    sw::load_options opts;
    opts.dtype = dt;
    opts.quantization = q;
    opts.threads = threads;
    opts.staging_window_bytes = window;
    opts.progress = sw::progress_mode::never;
    const long before = peak_rss_kib();
    const auto t0 = std::chrono::steady_clock::now();
    const auto d =
        sw::load_checkpoint_and_dispatch(tree, dir, sw::device_map{{"", sw::device::cpu()}}, opts);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const long after = peak_rss_kib();
    const auto& w = d.weights();
    std::uint64_t quantized_src = 0, quantized_elems = 0;
    for (const auto& n : w.names())
      if (sw::quantized_layout_of(w, n) != sw::quantized_layout::none) {
        const auto qw = sw::quantized_weight::from_store(w, n);
        const auto e = static_cast<std::uint64_t>(qw.rows() * qw.cols());
        quantized_elems += e;
        quantized_src += e * sw::element_size(dt);
      }
    std::printf(
        "{\"mode\": \"stowage\", \"quant\": \"%s\", \"double_quant\": %s, \"seconds\": %.6f, "
        "\"bytes_read\": %llu, \"resident_bytes\": %llu, \"quantized_weights\": %zu, "
        "\"quantized_elements\": %llu, \"quantized_source_bytes\": %llu, "
        "\"quantize_gbps\": %.4f, \"peak_rss_kib_before\": %ld, \"peak_rss_kib\": %ld}\n",
        quant.c_str(), dq ? "true" : "false", secs,
        static_cast<unsigned long long>(d.report().bytes_read),
        static_cast<unsigned long long>(w.bytes_in(sw::storage::storage_kind::host)),
        d.report().quantized_on_load, static_cast<unsigned long long>(quantized_elems),
        static_cast<unsigned long long>(quantized_src),
        static_cast<double>(quantized_src) / secs / 1e9, before, after);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quantize_load_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
