// stowage-convert SRC DST --dtype float32|float16|bfloat16|int8|nf4|fp4 [options]: converts a
// checkpoint (a safetensors or torch .bin file, an index, or a Hugging Face model folder) into
// safetensors shards + model.safetensors.index.json in DST. With a float --dtype, floating
// tensors are cast as torch's .to(dtype) does, integer/bool tensors unchanged, config.json and
// other non-weight files copied: byte-identical to what torch + huggingface_hub + safetensors
// write. With --dtype int8|nf4|fp4 the Linear weights Transformers would replace are quantized
// as bitsandbytes does and the result is what Transformers' save_pretrained writes for
// from_pretrained(SRC, dtype=TORCH_DTYPE, quantization_config=BitsAndBytesConfig(...)); the
// model structure comes from SRC/config.json (Llama family: llama, mistral, qwen2).
#include <stowage/checkpoint/convert_checkpoint.hpp>
#include <stowage/models/llama.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/to_module_tree.hpp>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <string_view>

namespace ck = stowage::checkpoint;
namespace sp = stowage::precision;

namespace {

stowage::dtype float_dtype(const std::string& s, const char* flag) {
  const auto d = stowage::dtype_from_name(s);
  if (d != stowage::dtype::float32 && d != stowage::dtype::float16 && d != stowage::dtype::bfloat16)
    throw stowage::invalid_dtype(std::string(flag) + " must be float32, float16 or bfloat16, got " +
                                 s);
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage =
      "usage: stowage-convert SRC DST --dtype float32|float16|bfloat16|int8|nf4|fp4\n"
      "         [--max-shard-size SIZE] [--double-quant] [--blocksize N]\n"
      "         [--compute-dtype bfloat16|float16|float32] [--torch-dtype auto|float32|...]\n"
      "         [--skip-modules NAME[,NAME...]]\n"
      "SIZE as huggingface_hub reads it: 5GB, 500MB, 10KB (decimal units) or a byte count; default "
      "5GB\n"
      "int8/nf4/fp4: bitsandbytes quantization of the Linear weights Transformers replaces\n"
      "  (lm_head and tied embeddings stay as they are), written as Transformers saves it.\n"
      "  --double-quant       bnb_4bit_use_double_quant (nf4/fp4)\n"
      "  --blocksize N        4-bit block size (default 64, as Linear4bit)\n"
      "  --compute-dtype D    bnb_4bit_compute_dtype (default float32, as Transformers)\n"
      "  --torch-dtype D      dtype of the non-quantized tensors and of the weights before\n"
      "                       quantization (from_pretrained's dtype); default: the compute\n"
      "                       dtype for nf4/fp4, auto (keep) for int8\n"
      "  --skip-modules L     llm_int8_skip_modules (replaces the automatic list)\n";
  std::string src, dst, dt, shard = "5GB", blocksize, compute, torch_dtype, skip;
  bool double_quant = false, have_skip = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= argc) {
        std::cerr << "stowage-convert: " << a << " needs a value\n" << usage;
        std::exit(2);
      }
      out = argv[++i];
    };
    if (a == "--dtype") {
      value(dt);
    } else if (a == "--max-shard-size") {
      value(shard);
    } else if (a == "--blocksize") {
      value(blocksize);
    } else if (a == "--compute-dtype") {
      value(compute);
    } else if (a == "--torch-dtype") {
      value(torch_dtype);
    } else if (a == "--skip-modules") {
      value(skip);
      have_skip = true;
    } else if (a == "--double-quant") {
      double_quant = true;
    } else if (a == "-h" || a == "--help") {
      std::cout << usage;
      return 0;
    } else if (src.empty()) {
      src = std::string(a);
    } else if (dst.empty()) {
      dst = std::string(a);
    } else {
      std::cerr << "stowage-convert: unexpected argument " << a << "\n" << usage;
      return 2;
    }
  }
  if (src.empty() || dst.empty() || dt.empty()) {
    std::cerr << usage;
    return 2;
  }
  try {
    ck::convert_options opt;
    opt.max_shard_size = ck::parse_shard_size(shard);
    const bool quantized = dt == "int8" || dt == "nf4" || dt == "fp4";
    if (!quantized) {
      if (double_quant || !blocksize.empty() || !compute.empty() || !torch_dtype.empty() ||
          have_skip)
        throw stowage::invalid_config(
            "--double-quant/--blocksize/--compute-dtype/--torch-dtype/--skip-modules need "
            "--dtype int8, nf4 or fp4");
      opt.dtype = float_dtype(dt, "--dtype");
    } else {
      sp::bnb_config c;
      if (dt == "int8") {
        if (double_quant || !blocksize.empty() || !compute.empty())
          throw stowage::invalid_config(
              "--double-quant/--blocksize/--compute-dtype apply to nf4/fp4, not int8");
        c.load_in_8bit = true;
      } else {
        c.load_in_4bit = true;
        c.bnb_4bit_quant_type = dt == "nf4" ? sp::quant_type::nf4 : sp::quant_type::fp4;
        c.bnb_4bit_use_double_quant = double_quant;
        if (!compute.empty()) c.bnb_4bit_compute_dtype = float_dtype(compute, "--compute-dtype");
        if (!blocksize.empty()) {
          std::size_t pos = 0;
          const unsigned long long bs = std::stoull(blocksize, &pos);
          if (pos != blocksize.size()) throw stowage::invalid_config("--blocksize: not a number");
          c.blocksize = static_cast<std::size_t>(bs);
        }
      }
      if (have_skip) {
        std::vector<std::string> names;
        std::string cur;
        for (char ch : skip + ",") {
          if (ch == ',') {
            if (!cur.empty()) names.push_back(cur);
            cur.clear();
          } else {
            cur += ch;
          }
        }
        c.llm_int8_skip_modules = std::move(names);
      }
      c.validate();
      if (torch_dtype.empty())
        torch_dtype =
            c.load_in_4bit ? std::string(stowage::name(c.bnb_4bit_compute_dtype)) : "auto";
      if (torch_dtype != "auto") opt.dtype = float_dtype(torch_dtype, "--torch-dtype");
      const std::filesystem::path cfg =
          std::filesystem::is_directory(src)
              ? std::filesystem::path(src) / "config.json"
              : std::filesystem::path(src).parent_path() / "config.json";
      const auto config = stowage::models::llama_config::from_file(cfg.string());
      auto model = stowage::init_empty<stowage::models::llama_for_causal_lm<sp::fp32>>(config);
      opt.quantize = ck::quantize_options{c, stowage::to_module_tree(model), "lm_head"};
    }
    const auto rep = ck::convert_checkpoint(src, dst, opt);
    std::cout << "wrote " << rep.tensors << " tensor(s), " << rep.total_size << " bytes, in "
              << rep.shards.size() << " shard(s)"
              << (rep.index ? " + " + rep.index->filename().string() : std::string()) << " to "
              << dst << "; quantized " << rep.quantized_weights << " weight(s); copied "
              << rep.copied.size() << " other file(s)\n";
    return 0;
  } catch (const stowage::error& e) {
    std::cerr << "stowage-convert: " << e.what() << "\n";
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    std::cerr << "stowage-convert: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "stowage-convert: " << e.what() << "\n";
    return 1;
  }
}
