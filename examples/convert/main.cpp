// stowage-convert SRC DST --dtype float32|float16|bfloat16 [--max-shard-size SIZE]: converts a
// checkpoint (a safetensors or torch .bin file, an index, or a Hugging Face model folder) into
// safetensors shards + model.safetensors.index.json in DST, floating tensors cast as torch's
// .to(dtype) does, integer/bool tensors unchanged, config.json and other non-weight files
// copied. The output is byte-identical to what torch + huggingface_hub + safetensors write.
#include <stowage/checkpoint/convert_checkpoint.hpp>

#include <iostream>
#include <string>
#include <string_view>

namespace ck = stowage::checkpoint;

int main(int argc, char** argv) {
  const char* usage =
      "usage: stowage-convert SRC DST --dtype float32|float16|bfloat16 [--max-shard-size SIZE]\n"
      "SIZE as huggingface_hub reads it: 5GB, 500MB, 10KB (decimal units) or a byte count; default "
      "5GB\n";
  std::string src, dst, dt, shard = "5GB";
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if ((a == "--dtype" || a == "--max-shard-size") && i + 1 < argc) {
      (a == "--dtype" ? dt : shard) = argv[++i];
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
    const auto d = stowage::dtype_from_name(dt);
    if (d != stowage::dtype::float32 && d != stowage::dtype::float16 &&
        d != stowage::dtype::bfloat16)
      throw stowage::invalid_dtype("--dtype must be float32, float16 or bfloat16, got " + dt);
    opt.dtype = d;
    opt.max_shard_size = ck::parse_shard_size(shard);
    const auto rep = ck::convert_checkpoint(src, dst, opt);
    std::cout << "wrote " << rep.tensors << " tensor(s), " << rep.total_size << " bytes, in "
              << rep.shards.size() << " shard(s)"
              << (rep.index ? " + " + rep.index->filename().string() : std::string()) << " to "
              << dst << "; copied " << rep.copied.size() << " other file(s)\n";
    return 0;
  } catch (const stowage::error& e) {
    std::cerr << "stowage-convert: " << e.what() << "\n";
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    std::cerr << "stowage-convert: " << e.what() << "\n";
    return 1;
  }
}
