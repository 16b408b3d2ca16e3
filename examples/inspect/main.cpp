// stowage-inspect PATH [--json]: what a checkpoint holds (file, index or folder; safetensors or
// torch .bin), tensor by tensor: name, dtype, shape, bytes, shard, and whether it can be read
// zero-copy. Every file is fully validated on the way, so this is also a checker: a malformed or
// hostile file gives its error and exit status 1.
#include <stowage/checkpoint/checkpoint.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <string>
#include <string_view>

namespace ck = stowage::checkpoint;

int main(int argc, char** argv) {
  std::string path;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--json")
      json = true;
    else if (a == "-h" || a == "--help") {
      std::cout << "usage: stowage-inspect PATH [--json]\n"
                   "PATH: a .safetensors or torch .bin file, an *.index.json, or a model folder\n";
      return 0;
    } else if (path.empty())
      path = std::string(a);
    else {
      std::cerr << "stowage-inspect: unexpected argument " << a << "\n";
      return 2;
    }
  }
  if (path.empty()) {
    std::cerr << "usage: stowage-inspect PATH [--json]\n";
    return 2;
  }
  try {
    const auto reader = ck::checkpoint_reader::open(path);
    nlohmann::ordered_json out;
    out["path"] = path;
    out["files"] = nlohmann::ordered_json::array();
    for (const auto& f : reader.files().files) out["files"].push_back(f.string());
    if (reader.index()) out["index"] = reader.index()->path.string();
    out["tensors"] = nlohmann::ordered_json::array();
    std::uint64_t total = 0;
    for (std::size_t s = 0; s < reader.files().files.size(); ++s) {
      const auto file = reader.shard(s);
      if (const auto* st = file->as_safetensors(); st && !st->metadata().empty()) {
        nlohmann::ordered_json m = nlohmann::ordered_json::object();
        for (const auto& [k, v] : st->metadata()) m[k] = v;
        out["metadata"][reader.files().files[s].filename().string()] = m;
      }
      for (const auto& d : file->tensors()) {
        const auto v = file->view(d.name);
        nlohmann::ordered_json t;
        t["name"] = d.name;
        t["dtype"] = std::string(stowage::name(d.dtype));
        t["shape"] = nlohmann::ordered_json::array();
        for (auto x : d.shape) t["shape"].push_back(x);
        t["nbytes"] = v.size();
        t["file"] = reader.files().files[s].filename().string();
        t["zero_copy"] = v.zero_copy();
        if (v.zero_copy()) t["offset"] = v.file_offset;
        total += v.size();
        out["tensors"].push_back(std::move(t));
      }
    }
    out["total_bytes"] = total;
    if (json) {
      std::cout << out.dump(2) << "\n";
      return 0;
    }
    std::printf("%s: %zu tensor(s) in %zu file(s), %llu bytes\n", path.c_str(),
                out["tensors"].size(), reader.files().files.size(),
                static_cast<unsigned long long>(total));
    for (const auto& t : out["tensors"]) {
      std::string shape = "[";
      for (std::size_t i = 0; i < t["shape"].size(); ++i)
        shape += (i ? ", " : "") + t["shape"][i].dump();
      shape += "]";
      std::printf("  %-50s %-10s %-16s %10llu B  %s%s\n", t["name"].get<std::string>().c_str(),
                  t["dtype"].get<std::string>().c_str(), shape.c_str(),
                  static_cast<unsigned long long>(t["nbytes"].get<std::uint64_t>()),
                  t["file"].get<std::string>().c_str(),
                  t["zero_copy"].get<bool>() ? "" : " (copied)");
    }
    return 0;
  } catch (const stowage::error& e) {
    std::cerr << "stowage-inspect: " << e.what() << "\n";
    return 1;
  }
}
