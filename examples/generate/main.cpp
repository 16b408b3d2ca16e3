// stowage-generate: loads a Llama-family model folder with from_pretrained (placement policy,
// budgets, offload folder, dtype), prints where everything went and how long loading took,
// then streams the continuation of a prompt and reports tokens per second. Without a model
// folder it runs the bundled tiny-llama under a budget that splits it between "cpu" and
// "disk", so the offload path is on show (offload folder in a temporary directory, removed
// afterwards). --dump-logits writes the float32 logits of the last prompt position as .npy.
// Built by nvcc (main.cu, CUDA builds), a device map with a GPU entry runs on the CUDA forward
// of its first GPU; built by the C++ compiler, on the CPU.
#include <stowage/dispatch/from_pretrained.hpp>
#include <stowage/placement/device_map.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

namespace sw = stowage;
namespace fs = std::filesystem;

namespace {

constexpr const char* usage_text =
    "usage: stowage-generate [MODEL_DIR] [--prompt TEXT | --prompt-ids 1,2,3]\n"
    "  [--max-new-tokens N] [--device-map auto|balanced|balanced_low_0|sequential|MAP.json]\n"
    "  [--max-memory KEY=SIZE,...] [--offload-folder DIR]\n"
    "  [--dtype float32|float16|bfloat16|int8|nf4]\n"
    "  [--temperature T] [--top-k K] [--top-p P] [--seed N] [--threads N]\n"
    "  [--blocks-in-flight N] [--disk-io auto|direct|buffered] [--ignore-eos]\n"
    "  [--dump-logits FILE.npy]\n"
    "Without MODEL_DIR: the bundled tiny-llama, split between cpu and disk.\n";

struct usage_error {
  std::string what;
};

struct cli {
  std::optional<fs::path> model_dir;
  std::optional<std::string> prompt;
  std::optional<std::vector<std::int64_t>> prompt_ids;
  std::optional<std::int64_t> max_new_tokens;
  std::string device_map = "auto";
  std::optional<std::string> max_memory;
  std::optional<fs::path> offload_folder;
  std::string dtype = "float32";
  sw::exec::cpu::sampling_options sampling;
  unsigned threads = 0;
  std::size_t blocks_in_flight = stowage::offload_options{}.blocks_in_flight;  // library default
  std::optional<bool> direct_io;  // --disk-io: unset = the library's automatic rule
  std::optional<fs::path> dump_logits;
  bool ignore_eos = false;
};

template <class T>
T parse_number(const std::string& s, const char* flag) {
  try {
    std::size_t pos = 0;
    T v{};
    if constexpr (std::is_floating_point_v<T>)
      v = static_cast<T>(std::stod(s, &pos));
    else
      v = static_cast<T>(std::stoll(s, &pos));
    if (pos != s.size()) throw std::invalid_argument(s);
    return v;
  } catch (const std::exception&) {
    throw usage_error{std::string(flag) + " expects a number, got \"" + s + "\""};
  }
}

cli parse(int argc, char** argv) {
  cli c;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw usage_error{std::string(argv[i]) + " needs a value"};
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << usage_text;
      std::exit(0);
    } else if (a == "--prompt") {
      c.prompt = value(i);
    } else if (a == "--prompt-ids") {
      std::vector<std::int64_t> ids;
      std::string s = value(i), tok;
      std::size_t start = 0;
      while (start <= s.size()) {
        const auto comma = s.find(',', start);
        tok = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        ids.push_back(parse_number<std::int64_t>(tok, "--prompt-ids"));
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      c.prompt_ids = std::move(ids);
    } else if (a == "--max-new-tokens") {
      c.max_new_tokens = parse_number<std::int64_t>(value(i), "--max-new-tokens");
      if (*c.max_new_tokens < 0) throw usage_error{"--max-new-tokens must be >= 0"};
    } else if (a == "--device-map") {
      c.device_map = value(i);
    } else if (a == "--max-memory") {
      c.max_memory = value(i);
    } else if (a == "--offload-folder") {
      c.offload_folder = value(i);
    } else if (a == "--dtype") {
      c.dtype = value(i);
    } else if (a == "--temperature") {
      c.sampling.temperature = parse_number<float>(value(i), "--temperature");
      c.sampling.do_sample = true;
    } else if (a == "--top-k") {
      c.sampling.top_k = parse_number<std::int64_t>(value(i), "--top-k");
      c.sampling.do_sample = true;
    } else if (a == "--top-p") {
      c.sampling.top_p = parse_number<float>(value(i), "--top-p");
      c.sampling.do_sample = true;
    } else if (a == "--seed") {
      c.sampling.seed = parse_number<std::uint64_t>(value(i), "--seed");
    } else if (a == "--threads") {
      c.threads = parse_number<unsigned>(value(i), "--threads");
    } else if (a == "--blocks-in-flight") {
      c.blocks_in_flight = parse_number<std::size_t>(value(i), "--blocks-in-flight");
    } else if (a == "--disk-io") {
      const std::string m = value(i);
      if (m == "auto")
        c.direct_io.reset();
      else if (m == "direct" || m == "buffered")
        c.direct_io = m == "direct";
      else
        throw usage_error{"--disk-io takes auto, direct or buffered, not `" + m + "`"};
    } else if (a == "--ignore-eos") {
      c.ignore_eos = true;
    } else if (a == "--dump-logits") {
      c.dump_logits = value(i);
    } else if (a.starts_with("--")) {
      throw usage_error{"unknown option " + a};
    } else if (!c.model_dir) {
      c.model_dir = a;
    } else {
      throw usage_error{"more than one MODEL_DIR (" + c.model_dir->string() + ", " + a + ")"};
    }
  }
  if (c.prompt && c.prompt_ids) throw usage_error{"give --prompt or --prompt-ids, not both"};
  return c;
}

/// "cpu=2GB,0=10GB,disk=100GB" -> budgets.
sw::max_memory parse_budgets(const std::string& s) {
  sw::max_memory m;
  std::size_t start = 0;
  while (start < s.size()) {
    const auto comma = s.find(',', start);
    const std::string item =
        s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0)
      throw usage_error{"--max-memory expects KEY=SIZE[,KEY=SIZE...], got \"" + item + "\""};
    const std::string key = item.substr(0, eq), size = item.substr(eq + 1);
    const bool digits = key.find_first_not_of("0123456789") == std::string::npos;
    m.set(digits ? sw::device(parse_number<int>(key, "--max-memory"))
                 : sw::device::parse_budget_key(key),
          size);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return m;
}

/// numpy's .npy v1.0: magic, version, little-endian u16 header length, a Python dict literal
/// padded with spaces to a 64-byte boundary and ending in '\n', then the raw data. Written to
/// a temporary name and renamed, so a failed write leaves no half file.
void write_npy(const fs::path& path, std::span<const float> v) {
  std::string header =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(v.size()) + ",), }";
  const std::size_t fixed = 10;
  std::size_t total = fixed + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  const fs::path tmp = path.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw sw::io_error(tmp.string(), "cannot create");
    const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    out.write(reinterpret_cast<const char*>(magic), 8);
    const auto len = static_cast<std::uint16_t>(header.size());
    const unsigned char le[2] = {static_cast<unsigned char>(len & 0xff),
                                 static_cast<unsigned char>(len >> 8)};
    out.write(reinterpret_cast<const char*>(le), 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(v.data()),
              static_cast<std::streamsize>(v.size() * sizeof(float)));
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw sw::io_error(path.string(), "cannot write the logits");
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw sw::io_error(path.string(), "cannot rename into place: " + ec.message());
  }
}

/// A temporary folder removed when the program ends (normally or by an exception).
struct scratch_dir {
  fs::path path;
  scratch_dir() {
    std::string t = (fs::temp_directory_path() / "stowage-generate-XXXXXX").string();
    if (!::mkdtemp(t.data())) throw sw::io_error(t, "cannot create a temporary folder");
    path = t;
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string human(std::uint64_t b) {
  char buf[32];
  if (b >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1ull << 30));
  else if (b >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1ull << 20));
  else
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024.0);
  return buf;
}

template <class Model>
int run(const cli& c, const fs::path& dir, sw::pretrained_options o) {
  auto m = sw::from_pretrained<Model>(dir, o);

  // Placement summary: entries and bytes per device.
  std::map<std::string, std::pair<std::size_t, std::uint64_t>> per;
  for (const auto& [k, d] : m.hf_device_map()) ++per[d.to_string()].first;
  std::vector<const sw::storage::tensor_storage*> seen;
  for (const auto& n : m.weights().weights().names()) {
    const auto* s = m.weights().weights().find(n);
    if (std::find(seen.begin(), seen.end(), s) != seen.end()) continue;
    seen.push_back(s);
    if (auto d = m.hf_device_map().device_for(n)) per[d->to_string()].second += s->size();
  }
  std::cout << "model      " << fs::absolute(dir).lexically_normal().string() << " ("
            << m.config().num_hidden_layers << " layers, " << c.dtype << ")\n";
  std::cout << "placement  " << m.hf_device_map().size() << " entries, main device "
            << m.weights().main_device().to_string() << "\n";
  std::cout << "execution  "
            << (m.on_gpu() ? "CUDA forward on " + m.execution_device().to_string()
                           : std::string("CPU forward"))
            << "\n";
  for (const auto& [d, v] : per)
    std::cout << "  " << d << ": " << v.first << " entries, " << human(v.second) << "\n";
  if (m.quantized_bytes())
    std::cout << "  quantized: " << m.quantized_linear_count() << " linear weights, "
              << human(m.quantized_bytes())
              << " (packed + scales, quantized as they loaded; run in place)\n";
  if (const auto& f = m.weights().offload_folder())
    std::cout << "  offload folder: " << f->string() << " ("
              << human(m.report().offload_bytes_written) << " written, "
              << human(m.report().offload_bytes_referenced) << " served from the checkpoint)\n";
  std::printf("load       %.3f s\n", m.load_seconds());

  std::vector<std::int64_t> prompt;
  const auto& tok = m.tokenizer();
  if (c.prompt_ids) {
    prompt = *c.prompt_ids;
  } else {
    if (!tok)
      throw sw::invalid_config(dir.string() +
                               " has no tokenizer.json: pass the prompt with --prompt-ids");
    prompt = tok->encode(c.prompt ? *c.prompt : std::string("Once upon a time"), true);
  }
  if (prompt.empty()) throw sw::invalid_size("the prompt has no tokens");
  for (auto t : prompt)
    if (t < 0 || t >= m.config().vocab_size)
      throw sw::invalid_size("prompt token " + std::to_string(t) + " is outside the vocabulary (" +
                             std::to_string(m.config().vocab_size) + ")");

  std::int64_t n_new = c.max_new_tokens.value_or(64);
  std::cout << "prompt     " << prompt.size() << " tokens\n";
  if (c.prompt_ids || !tok) {
    std::cout << "generated ";
  } else {
    std::cout << "text       " << (c.prompt ? *c.prompt : std::string("Once upon a time"));
  }
  std::cout.flush();
  std::vector<std::int64_t> out;
  std::string shown;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  clock::time_point t_first{};
  sw::pretrained_generate_options g;
  g.max_new_tokens = n_new;
  g.sampling = c.sampling;
  if (c.ignore_eos) g.eos_token_ids = std::vector<std::int64_t>{};
  g.on_prompt_logits = [&](std::span<const float> logits) {
    t_first = clock::now();
    if (c.dump_logits) write_npy(*c.dump_logits, logits);
  };
  g.on_token = [&](std::int64_t t) {
    out.push_back(t);
    if (c.prompt_ids || !tok) {
      std::cout << ' ' << t;
    } else {
      const std::string text = tok->decode(out, true);
      if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0)
        std::cout << text.substr(shown.size());
      shown = text;
    }
    std::cout.flush();
  };
  if (n_new == 0) {
    // Only the prompt's logits (e.g. --dump-logits).
    const auto logits = m.forward(prompt);
    t_first = clock::now();
    if (c.dump_logits) write_npy(*c.dump_logits, logits);
  } else {
    (void)m.generate(prompt, g);
  }
  const auto t1 = clock::now();
  std::cout << "\n";
  const double prefill = std::chrono::duration<double>(t_first - t0).count();
  const double decode = std::chrono::duration<double>(t1 - t_first).count();
  std::printf("prefill    %zu tokens in %.3f s (%.1f tokens/s)\n", prompt.size(), prefill,
              prefill > 0 ? static_cast<double>(prompt.size()) / prefill : 0.0);
  const auto steps = out.size() > 1 ? out.size() - 1 : 0;  // the first token came from prefill
  std::printf("decode     %zu tokens in %.3f s (%.1f tokens/s)\n", out.size(), decode,
              decode > 0 ? static_cast<double>(steps) / decode : 0.0);
  const auto s = m.prefetcher().stats();
  if (s.requests)
    std::printf("prefetch   %zu block fetches, %s requested, at most %zu blocks in flight, %s\n",
                s.requests, human(s.bytes_requested).c_str(), s.max_in_flight,
                !m.prefetcher().reads_into_buffers() ? "mapped reads"
                : m.prefetcher().direct_io()         ? "direct reads"
                                                     : "buffered reads");
  if (c.dump_logits) std::cout << "logits     " << c.dump_logits->string() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const cli c = parse(argc, argv);
    const bool demo = !c.model_dir;
    const fs::path dir = demo ? fs::path(STOWAGE_DEMO_MODEL_DIR) : *c.model_dir;
    sw::pretrained_options o;
    o.threads = c.threads;
    o.offload.blocks_in_flight = c.blocks_in_flight;
    o.offload.direct_io = c.direct_io;
    if (c.max_memory)
      o.max_memory = parse_budgets(*c.max_memory);
    else if (demo)
      o.max_memory = sw::max_memory{{"cpu", "2MB"}};  // embeddings + one layer; the rest: disk
    if (c.device_map.ends_with(".json"))
      o.device_map = sw::load_device_map(c.device_map);
    else
      o.placement = c.device_map;
    std::optional<scratch_dir> scratch;
    if (c.offload_folder) {
      o.offload_folder = c.offload_folder;
    } else {
      scratch.emplace();
      o.offload_folder = scratch->path / "offload";
    }
    if (demo && !c.max_new_tokens) std::cout << "(no MODEL_DIR: the bundled tiny-llama demo)\n";
    using namespace sw::precision;
    using sw::models::llama_for_causal_lm;
    if (c.dtype == "float32") return run<llama_for_causal_lm<fp32>>(c, dir, o);
    if (c.dtype == "float16" || c.dtype == "bfloat16") {
      o.dtype = sw::dtype_from_name(c.dtype);
      return run<llama_for_causal_lm<fp32>>(c, dir, o);
    }
    if (c.dtype == "int8") return run<llama_for_causal_lm<int8<fp32>>>(c, dir, o);
    if (c.dtype == "nf4") return run<llama_for_causal_lm<nf4<fp32>>>(c, dir, o);
    throw usage_error{"--dtype must be float32, float16, bfloat16, int8 or nf4 (got \"" + c.dtype +
                      "\")"};
  } catch (const usage_error& e) {
    std::cerr << "stowage-generate: " << e.what << "\n" << usage_text;
    return 2;
  } catch (const sw::error& e) {
    std::cerr << "\nstowage-generate: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "\nstowage-generate: error: " << e.what() << "\n";
    return 1;
  }
}
