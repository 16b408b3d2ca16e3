// stowage/checkpoint/convert_checkpoint.hpp: checkpoint -> safetensors shards in another float
// dtype (what stowage-convert does). Output is byte-identical to Python doing
// `t.to(dtype) if t.is_floating_point() else t` per tensor, huggingface_hub's shard splitting,
// safetensors save_file with {"format": "pt"} and transformers' index file. Tensors are taken in
// source order (shards sorted by name, each file's own order) and converted one shard at a time,
// so memory stays at one output shard.
#pragma once

#include <stowage/checkpoint/checkpoint.hpp>
#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/checkpoint/sharded.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/precision/convert.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace stowage::checkpoint {

struct convert_options {
  std::optional<stowage::dtype> dtype;              ///< float target; nullopt keeps every dtype
  std::uint64_t max_shard_size = 5'000'000'000ULL;  ///< huggingface_hub's default "5GB"
  bool copy_other_files = true;  ///< config.json, tokenizer files... (folder sources)
};

struct convert_report {
  std::vector<std::filesystem::path> shards;
  std::optional<std::filesystem::path> index;
  std::vector<std::filesystem::path> copied;
  std::uint64_t total_size = 0;
  std::size_t tensors = 0;
};

namespace detail {

inline bool is_weight_file(const std::filesystem::path& p) {
  const std::string n = p.filename().string();
  return n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".index.json") ||
         n.ends_with(".pt") || n.ends_with(".pth");
}

}  // namespace detail

/// Converts the checkpoint at `src` (file, index or folder) into `dst` (created).
inline convert_report convert_checkpoint(const std::filesystem::path& src,
                                         const std::filesystem::path& dst,
                                         const convert_options& opt = {}) {
  if (opt.dtype && !is_floating_point(*opt.dtype))
    throw invalid_dtype("convert: target dtype must be a floating type, got " +
                        std::string(name(*opt.dtype)));
  const checkpoint_reader ck = checkpoint_reader::open(src);
  // Source order: every shard in sorted order, each in its own file order.
  struct item {
    std::size_t shard;
    tensor_desc src, out;
  };
  std::vector<item> items;
  for (std::size_t s = 0; s < ck.files().files.size(); ++s) {
    auto f = ck.shard(s);
    for (auto& d : f->tensors()) {
      if (ck.index() && (!ck.contains(d.name) || ck.shard_of(d.name) != s))
        continue;  // not indexed here
      tensor_desc out = d;
      if (opt.dtype && is_floating_point(d.dtype) && d.dtype != *opt.dtype) {
        if (!precision::can_convert(d.dtype, *opt.dtype))
          throw checkpoint_error(f->path().string(), d.name, std::nullopt,
                                 "convert: " + std::string(name(d.dtype)) + " -> " +
                                     std::string(name(*opt.dtype)) +
                                     " is not supported (float32/float16/bfloat16/float64 only)");
        out.dtype = *opt.dtype;
      }
      items.push_back({s, std::move(d), std::move(out)});
    }
  }
  std::vector<std::uint64_t> sizes;
  for (const auto& it : items) sizes.push_back(it.out.nbytes());
  convert_report rep;
  const auto plan =
      plan_shards(sizes, opt.max_shard_size, "model{suffix}.safetensors", &rep.total_size);
  std::filesystem::create_directories(dst);
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (const auto& shard : plan) {
    std::vector<std::vector<std::byte>> buffers;
    std::vector<tensor_view> views;
    std::vector<tensor_ref> refs;
    buffers.reserve(shard.tensors.size());
    views.reserve(shard.tensors.size());
    for (auto i : shard.tensors) {
      const item& it = items[i];
      tensor_view v = ck.shard(it.shard)->view(it.src.name);
      tensor_ref r{it.out.name, it.out.dtype, it.out.shape, v.bytes};
      if (it.out.dtype != it.src.dtype) {
        buffers.emplace_back(static_cast<std::size_t>(it.out.nbytes()));
        precision::convert_elements(v.data(), it.src.dtype, buffers.back().data(), it.out.dtype,
                                    static_cast<std::size_t>(it.src.numel()));
        r.data = buffers.back();
      }
      views.push_back(std::move(v));
      refs.push_back(std::move(r));
      weight_map.emplace_back(it.out.name, shard.filename);
    }
    write_safetensors(dst / shard.filename, refs, {{"format", "pt"}});
    rep.shards.push_back(dst / shard.filename);
  }
  if (plan.size() > 1) {
    rep.index = dst / "model.safetensors.index.json";
    const std::string text = index_json(nlohmann::json{{"total_size", rep.total_size}}, weight_map);
    const std::span<const std::byte> chunk(reinterpret_cast<const std::byte*>(text.data()),
                                           text.size());
    detail::write_file_atomically(*rep.index, std::span(&chunk, 1));
  }
  rep.tensors = items.size();
  if (opt.copy_other_files && std::filesystem::is_directory(src)) {
    for (const auto& de : std::filesystem::directory_iterator(src)) {
      if (!de.is_regular_file() || detail::is_weight_file(de.path())) continue;
      const auto to = dst / de.path().filename();
      std::filesystem::copy_file(de.path(), to, std::filesystem::copy_options::overwrite_existing);
      rep.copied.push_back(to);
    }
  }
  return rep;
}

}  // namespace stowage::checkpoint
