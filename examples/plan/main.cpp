// stowage-plan: prints the device map accelerate/Transformers would infer for a model, from a
// config.json (typed Llama family) or a module-tree JSON, with a readable per-device table, or
// only the map (--json) or only the budgets (--budgets-json).
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/placement/policies.hpp>

#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace sw = stowage;

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::cerr
      << "stowage-plan: " << why << "\n"
      << "usage: stowage-plan (--config CONFIG.json | --module-tree TREE.json)\n"
         "  [--max-memory KEY=SIZE[,KEY=SIZE...]] [--strategy "
         "auto|balanced|balanced_low_0|sequential]\n"
         "  [--no-split CLASS]... [--dtype DTYPE|nf4|fp4|int8] [--special-dtype NAME=DTYPE]...\n"
         "  [--double-quant] [--blocksize N] [--compute-dtype DTYPE]\n"
         "  [--offload-buffers] [--fallback-allocation] [--no-clean] [--verbose]\n"
         "  [--override REGEX=DEVICE]... [--batch N --context N] [--json | --budgets-json]\n";
  std::exit(2);
}

std::pair<std::string, std::string> split_eq(const std::string& s, const char* flag) {
  const auto eq = s.rfind('=');
  if (eq == std::string::npos || eq == 0)
    usage(std::string(flag) + " expects NAME=VALUE, got \"" + s + "\"");
  return {s.substr(0, eq), s.substr(eq + 1)};
}

std::string bar(double frac) {
  const int w = 30;
  int n = static_cast<int>(frac * w + 0.5);
  n = std::max(0, std::min(w, n));
  return "[" + std::string(static_cast<std::size_t>(n), '#') +
         std::string(static_cast<std::size_t>(w - n), '.') + "]";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string config, tree_path, strategy = "auto";
  std::vector<std::string> memory;
  sw::plan_options opt;
  bool json = false, budgets_json = false, no_split_given = false;
  std::vector<std::string> verbose_lines;
  bool verbose = false;
  // --dtype nf4|fp4|int8: bitsandbytes quantization of the Linear weights Transformers would
  // replace (sized exactly as quantize-on-load stores them), the rest at --compute-dtype.
  std::string quant;
  bool double_quant = false;
  std::size_t blocksize = 64;
  std::optional<sw::dtype> compute_dtype;
  try {
    for (std::size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto next = [&]() -> const std::string& {
        if (i + 1 >= args.size()) usage(a + " needs a value");
        return args[++i];
      };
      if (a == "--config")
        config = next();
      else if (a == "--module-tree")
        tree_path = next();
      else if (a == "--max-memory") {
        std::string v = next();
        std::size_t start = 0;
        while (start <= v.size()) {
          const auto comma = v.find(',', start);
          memory.push_back(
              v.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
          if (comma == std::string::npos) break;
          start = comma + 1;
        }
      } else if (a == "--strategy")
        strategy = next();
      else if (a == "--no-split") {
        opt.no_split.push_back(next());
        no_split_given = true;
      } else if (a == "--dtype") {
        const std::string d = next();
        if (d == "nf4" || d == "fp4" || d == "int8")
          quant = d;
        else
          opt.dtype = sw::dtype_from_name(d);
      } else if (a == "--double-quant")
        double_quant = true;
      else if (a == "--blocksize") {
        const std::string v = next();
        std::size_t used = 0;
        long long n = -1;
        try {
          n = std::stoll(v, &used);
        } catch (const std::exception&) {}
        if (n <= 0 || used != v.size()) usage("--blocksize expects a positive integer, got " + v);
        blocksize = static_cast<std::size_t>(n);
      } else if (a == "--compute-dtype")
        compute_dtype = sw::dtype_from_name(next());
      else if (a == "--special-dtype") {
        auto [n, d] = split_eq(next(), "--special-dtype");
        opt.special_dtypes.emplace_back(n, sw::dtype_from_name(d));
      } else if (a == "--offload-buffers")
        opt.offload_buffers = true;
      else if (a == "--fallback-allocation")
        opt.fallback_allocation = true;
      else if (a == "--no-clean")
        opt.clean_result = false;
      else if (a == "--verbose")
        verbose = true;
      else if (a == "--override") {
        auto [re, d] = split_eq(next(), "--override");
        opt.overrides.push_back({re, sw::device::parse(d)});
      } else if (a == "--batch")
        opt.runtime.batch_size = std::stoll(next());
      else if (a == "--context")
        opt.runtime.context_length = std::stoll(next());
      else if (a == "--json")
        json = true;
      else if (a == "--budgets-json")
        budgets_json = true;
      else if (a == "-h" || a == "--help")
        usage("help");
      else
        usage("unknown argument " + a);
    }
    if (config.empty() == tree_path.empty()) usage("give exactly one of --config or --module-tree");
    if (quant.empty() && (double_quant || blocksize != 64))
      usage("--double-quant and --blocksize need --dtype nf4 or fp4");
    if (!quant.empty()) {
      sw::precision::bnb_config q;
      if (quant == "int8") {
        if (double_quant || blocksize != 64) usage("--double-quant and --blocksize are 4-bit only");
        q.load_in_8bit = true;
      } else {
        q.load_in_4bit = true;
        q.bnb_4bit_quant_type =
            quant == "nf4" ? sw::precision::quant_type::nf4 : sw::precision::quant_type::fp4;
        q.bnb_4bit_use_double_quant = double_quant;
        q.blocksize = blocksize;
        if (compute_dtype) q.bnb_4bit_compute_dtype = *compute_dtype;
      }
      q.validate();
      opt.quantization = q;
      opt.dtype = compute_dtype;  // unset: the model's own dtype
    } else if (compute_dtype) {
      usage("--compute-dtype needs --dtype nf4, fp4 or int8");
    }
    (void)sw::placement::parse_strategy(strategy);

    sw::module_tree tree = [&] {
      if (!tree_path.empty()) return sw::load_module_tree(tree_path);
      auto cfg = sw::models::llama_config::from_file(config);
      auto model = sw::init_empty<sw::models::llama_for_causal_lm<sw::precision::bf16>>(cfg);
      if (!no_split_given)
        for (auto n : model.no_split_modules()) opt.no_split.emplace_back(n);
      return sw::to_module_tree(model);
    }();

    sw::max_memory budgets;
    if (memory.empty()) {
      budgets = sw::measure_max_memory();
    } else {
      for (const auto& kv : memory) {
        auto [k, v] = split_eq(kv, "--max-memory");
        budgets.set(sw::max_memory::parse_key(k), v);
      }
    }
    if (verbose) opt.verbose = [&](std::string_view l) { verbose_lines.emplace_back(l); };

    const auto r = sw::infer_device_map(strategy, tree, budgets, opt);
    if (json) {
      std::cout << r.map.to_json_text(2) << "\n";
      return 0;
    }
    if (budgets_json) {
      sw::fit_report notes;
      sw::max_memory b = budgets;
      sw::balanced_options bo{opt.no_split, opt.dtype, opt.special_dtypes,
                              strategy == "balanced_low_0"};
      bo.quantization = opt.quantization;
      // "auto" follows Transformers (placement::auto_): its balanced budgets.
      if (strategy == "auto")
        b = sw::transformers_balanced_memory(tree, budgets, bo, &notes);
      else if (strategy != "sequential")
        b = sw::get_balanced_memory(tree, budgets, bo, &notes);
      std::cout << b.to_json().dump(2) << "\n";
      return 0;
    }
    for (const auto& l : verbose_lines) std::cout << l << "\n";
    if (opt.quantization) {
      // What the quantized weights come to, exactly (packed bytes plus their state tensors).
      const auto& q = *opt.quantization;
      const auto qs = sw::quantized_tensor_sizes(tree, q, opt.dtype, opt.special_dtypes);
      sw::plan_context ctx(tree);
      const auto& s = ctx.sizes(opt.dtype, opt.special_dtypes, sw::size_rule::accelerate, q);
      std::int64_t qbytes = 0;
      for (const auto& [n, b] : qs) qbytes += b.floor_bytes();
      std::cout << "precision: "
                << (q.load_in_8bit ? std::string("int8 (LLM.int8: int8 weight + SCB + format byte)")
                                   : std::string(sw::precision::name(q.bnb_4bit_quant_type)) +
                                         ", block " + std::to_string(q.blocksize) +
                                         (q.bnb_4bit_use_double_quant ? ", double quant" : "") +
                                         " (packed + absmax + quant_map" +
                                         (q.bnb_4bit_use_double_quant ? " + nested stats" : "") +
                                         " + QuantState JSON)")
                << "; other tensors "
                << (opt.dtype ? std::string(sw::name(*opt.dtype)) : std::string("as declared"))
                << "\n  " << qs.size()
                << " quantized weights: " << sw::format_memory_size(static_cast<double>(qbytes))
                << " (" << qbytes << " bytes); model total "
                << sw::format_memory_size(s.size[0].bytes()) << " (" << s.size[0].to_python_string()
                << " bytes)\n\n";
    }
    // Readable table: ranges of consecutive keys per device, then usage per device.
    std::cout << "device map (" << r.map.size() << " keys, strategy " << strategy << "):\n";
    const auto& e = r.map.entries();
    for (std::size_t i = 0; i < e.size();) {
      std::size_t j = i;
      while (j + 1 < e.size() && e[j + 1].second == e[i].second) ++j;
      std::cout << "  " << (e[i].first.empty() ? "<whole model>" : e[i].first);
      if (j > i) std::cout << " .. " << e[j].first << " (" << (j - i + 1) << " keys)";
      std::cout << "  ->  " << e[i].second.to_string() << "\n";
      i = j + 1;
    }
    std::cout << "\nper device:\n";
    for (const auto& du : r.report.devices) {
      const double w = du.weights.bytes();
      std::printf("  %-5s %14s", du.target.to_string().c_str(), sw::format_memory_size(w).c_str());
      if (du.budget && du.budget->bytes() > 0) {
        std::printf(" of %-12s %s %5.1f%%", sw::format_memory_size(du.budget->bytes()).c_str(),
                    bar(w / du.budget->bytes()).c_str(), 100.0 * w / du.budget->bytes());
      }
      if (du.reserved_layer.eighths() > 0)
        std::printf("  (+%s kept for the largest layer)",
                    sw::format_memory_size(du.reserved_layer.bytes()).c_str());
      std::printf("\n");
    }
    for (const auto& w : r.report.warnings) std::cout << "warning: " << w << "\n";
    for (const auto& l : r.report.info) std::cout << "info: " << l << "\n";
    for (const auto& d : r.report.deviations)
      std::cout << "note (accelerate " << d.item << "): " << d.message << "\n";
    return 0;
  } catch (const sw::error& e) {
    std::cerr << "stowage-plan: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "stowage-plan: " << e.what() << "\n";
    return 1;
  }
}
