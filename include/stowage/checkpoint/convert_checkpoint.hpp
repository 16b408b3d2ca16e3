// stowage/checkpoint/convert_checkpoint.hpp: checkpoint -> safetensors shards in another float
// dtype, or quantized as bitsandbytes (what stowage-convert does). Output is byte-identical to
// Python doing `t.to(dtype) if t.is_floating_point() else t` per tensor, huggingface_hub's shard
// splitting, safetensors save_file with {"format": "pt"} and transformers' index file. Tensors
// are taken in source order (shards sorted by name, each file's own order) and converted one
// output shard at a time, so memory stays at one output shard plus one tensor being converted.
//
// Quantized conversion (convert_options::quantize) writes what Transformers' save_pretrained
// writes for a model loaded with from_pretrained(dtype=D, quantization_config=
// BitsAndBytesConfig(...)): the weights of the Linear modules Transformers replaces become
// Linear4bit's packed uint8 + QuantState tensors or Linear8bitLt's int8 + SCB + weight_format
// (formats-spec §1.8, §2.3, §3), quantized from the weight converted to D; every other floating
// tensor is converted to D; config.json gains `quantization_config` (and `dtype` = D).
#pragma once

#include <stowage/checkpoint/checkpoint.hpp>
#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/checkpoint/sharded.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/precision/bnb_config.hpp>
#include <stowage/precision/bnb_serialize.hpp>
#include <stowage/precision/convert.hpp>
#include <stowage/precision/int8.hpp>
#include <stowage/precision/nf4.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace stowage::checkpoint {

/// Quantized conversion: which quantization, and the model whose Linear modules get it.
struct quantize_options {
  /// load_in_4bit (bnb_4bit_quant_type nf4/fp4, double quant, compute dtype, blocksize) or
  /// load_in_8bit; llm_int8_skip_modules replaces the automatic skip list when set.
  precision::bnb_config config;
  /// The model's module tree (class names, tied parameters): modules of class "Linear" are
  /// the nn.Linear Transformers replaces. Build it from config.json with the typed model
  /// (to_module_tree(init_empty<models::llama_for_causal_lm<...>>(config))).
  module_tree model;
  /// The module get_output_embeddings() returns (always skipped); "" for none.
  std::string output_embeddings = "lm_head";
};

struct convert_options {
  /// Float target of every floating tensor (Transformers' `dtype`); with quantization it is
  /// also the dtype weights are converted to before quantizing (QuantState's `dtype`).
  /// nullopt keeps each tensor's dtype (Transformers' dtype="auto" on a one-dtype checkpoint).
  std::optional<stowage::dtype> dtype;
  std::uint64_t max_shard_size = 5'000'000'000ULL;  ///< huggingface_hub's default "5GB"
  bool copy_other_files = true;              ///< config.json, tokenizer files... (folder sources)
  std::optional<quantize_options> quantize;  ///< bitsandbytes quantization of Linear weights
};

struct convert_report {
  std::vector<std::filesystem::path> shards;
  std::optional<std::filesystem::path> index;
  std::vector<std::filesystem::path> copied;
  std::uint64_t total_size = 0;
  std::size_t tensors = 0;            ///< tensors written
  std::size_t quantized_weights = 0;  ///< Linear weights quantized
};

namespace detail {

inline bool is_weight_file(const std::filesystem::path& p) {
  const std::string n = p.filename().string();
  return n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".index.json") ||
         n.ends_with(".pt") || n.ends_with(".pth");
}

enum class quant_kind : std::uint8_t { none, four_bit, int8 };

// One source tensor and what it becomes: one output tensor, or a quantized weight's group
// (weight first, then the state tensors in bitsandbytes' state-dict order).
struct convert_item {
  std::size_t shard;
  tensor_desc src;
  stowage::dtype target;  // float dtype before quantization (or of the output)
  quant_kind kind = quant_kind::none;
  std::vector<tensor_desc> outputs;
};

// Converts/quantizes one item; returns the bytes of each of its outputs.
inline std::vector<std::vector<std::byte>> produce(const checkpoint_reader& ck,
                                                   const convert_item& it,
                                                   const quantize_options* q) {
  tensor_view v = ck.shard(it.shard)->view(it.src.name);
  const auto n = static_cast<std::size_t>(it.src.numel());
  std::vector<std::vector<std::byte>> out;
  auto from_u8 = [](const std::vector<std::uint8_t>& b) {
    std::vector<std::byte> r(b.size());
    if (!b.empty()) std::memcpy(r.data(), b.data(), b.size());
    return r;
  };
  std::vector<std::byte> converted;
  std::span<const std::byte> src = v.bytes;
  if (it.target != it.src.dtype) {
    converted.resize(static_cast<std::size_t>(storage_bytes(it.src.shape, it.target)));
    precision::convert_elements(v.data(), it.src.dtype, converted.data(), it.target, n);
    src = converted;
  }
  switch (it.kind) {
    case quant_kind::none:
      if (converted.empty()) converted.assign(src.begin(), src.end());
      out.push_back(std::move(converted));
      break;
    case quant_kind::four_bit: {
      const auto& c = q->config;
      const auto qw = precision::quantize_4bit(src.data(), it.target, it.src.shape.dims(),
                                               {.type = c.bnb_4bit_quant_type,
                                                .blocksize = c.blocksize,
                                                .double_quant = c.bnb_4bit_use_double_quant,
                                                .offset = {}});
      out.push_back(from_u8(qw.packed));
      for (auto& t : precision::quant_state_tensors(qw.state)) out.push_back(from_u8(t.bytes));
      break;
    }
    case quant_kind::int8: {
      const auto qw =
          precision::quantize_int8(src.data(), it.target, static_cast<std::size_t>(it.src.shape[0]),
                                   static_cast<std::size_t>(it.src.shape[1]));
      std::vector<std::byte> w(qw.cb.size());
      if (!w.empty()) std::memcpy(w.data(), qw.cb.data(), w.size());
      out.push_back(std::move(w));
      for (auto& t : precision::int8_state_tensors(qw)) out.push_back(from_u8(t.bytes));
      break;
    }
  }
  return out;
}

// The descriptors a quantized weight becomes. For double quantization the QuantState JSON's
// length depends on the nested offset's decimal digits, so the weight is quantized once here
// to know it exactly (shard planning needs every size before anything is written).
inline std::vector<tensor_desc> quantized_outputs(const checkpoint_reader& ck,
                                                  const convert_item& it,
                                                  const quantize_options& q) {
  std::vector<tensor_desc> out;
  const std::string& w = it.src.name;
  if (it.kind == quant_kind::int8) {
    out.push_back({w, it.src.shape, dtype::int8});
    const std::string m = w.substr(0, w.size() - 7);  // strip ".weight"
    out.push_back({m + ".SCB", stowage::shape{it.src.shape[0]}, dtype::float32});
    out.push_back({m + ".weight_format", stowage::shape{}, dtype::uint8});
    return out;
  }
  const auto numel = static_cast<std::uint64_t>(it.src.numel());
  const auto ps = precision::packed_shape(numel);
  out.push_back({w, stowage::shape(std::span<const std::int64_t>(ps)), dtype::uint8});
  precision::quant_state_4bit st;
  st.type = q.config.bnb_4bit_quant_type;
  st.blocksize = q.config.blocksize;
  st.original_dtype = it.target;
  st.shape.assign(it.src.shape.begin(), it.src.shape.end());
  st.absmax.assign(st.blocks(), 0.0f);
  if (q.config.bnb_4bit_use_double_quant) {
    const auto bytes = produce(ck, it, &q);  // exact JSON (offset digits)
    st.nested = true;
    st.qabsmax.assign(st.blocks(), 0);
    st.nested_absmax.assign(
        (st.blocks() + precision::nested_blocksize - 1) / precision::nested_blocksize, 0.0f);
    const auto tensors = precision::quant_state_tensors(st);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      stowage::shape s(std::span<const std::int64_t>(tensors[i].shape));
      if (i + 1 == tensors.size())
        s = stowage::shape{static_cast<std::int64_t>(bytes[i + 1].size())};
      out.push_back({w + "." + tensors[i].suffix, s, tensors[i].type});
    }
    return out;
  }
  for (auto& t : precision::quant_state_tensors(st))
    out.push_back(
        {w + "." + t.suffix, stowage::shape(std::span<const std::int64_t>(t.shape)), t.type});
  return out;
}

// config.json as Transformers' save_pretrained writes it for the quantized model:
// quantization_config added, dtype set, json.dumps(indent=2, sort_keys=True) + "\n".
inline void write_quantized_config(const std::filesystem::path& from,
                                   const std::filesystem::path& to,
                                   const std::optional<stowage::dtype>& dt,
                                   const precision::bnb_config& c) {
  nlohmann::json j;
  {
    mapped_file f(from);
    try {
      j = nlohmann::json::parse(reinterpret_cast<const char*>(f.data()),
                                reinterpret_cast<const char*>(f.data()) + f.size());
    } catch (const nlohmann::json::exception& e) {
      throw json_error(from.string(), std::string("invalid JSON: ") + e.what());
    }
  }
  if (!j.is_object()) throw json_error(from.string(), "config.json is not an object");
  j["quantization_config"] = nlohmann::json::parse(precision::bnb_config_to_dict(c).dump());
  if (dt) j["dtype"] = std::string(name(*dt));
  const std::string text = j.dump(2, ' ', true) + "\n";
  const std::span<const std::byte> chunk(reinterpret_cast<const std::byte*>(text.data()),
                                         text.size());
  write_file_atomically(to, std::span(&chunk, 1));
}

}  // namespace detail

/// Converts the checkpoint at `src` (file, index or folder) into `dst` (created).
inline convert_report convert_checkpoint(const std::filesystem::path& src,
                                         const std::filesystem::path& dst,
                                         const convert_options& opt = {}) {
  if (opt.dtype && !is_floating_point(*opt.dtype))
    throw invalid_dtype("convert: target dtype must be a floating type, got " +
                        std::string(name(*opt.dtype)));
  std::map<std::string, detail::quant_kind> to_quantize;  // weight name -> kind
  if (opt.quantize) {
    opt.quantize->config.validate();
    const auto kind =
        opt.quantize->config.load_in_4bit ? detail::quant_kind::four_bit : detail::quant_kind::int8;
    for (auto& m : precision::modules_to_quantize(opt.quantize->model, opt.quantize->config,
                                                  opt.quantize->output_embeddings))
      to_quantize.emplace(m + ".weight", kind);
  }
  const checkpoint_reader ck = checkpoint_reader::open(src);
  // Source order: every shard in sorted order, each in its own file order.
  std::vector<detail::convert_item> items;
  std::size_t quantized = 0;
  for (std::size_t s = 0; s < ck.files().files.size(); ++s) {
    auto f = ck.shard(s);
    for (auto& d : f->tensors()) {
      if (ck.index() && (!ck.contains(d.name) || ck.shard_of(d.name) != s))
        continue;  // not indexed here
      detail::convert_item it{s, d, d.dtype, detail::quant_kind::none, {}};
      if (opt.dtype && is_floating_point(d.dtype) && d.dtype != *opt.dtype) {
        if (!precision::can_convert(d.dtype, *opt.dtype))
          throw checkpoint_error(f->path().string(), d.name, std::nullopt,
                                 "convert: " + std::string(name(d.dtype)) + " -> " +
                                     std::string(name(*opt.dtype)) +
                                     " is not supported (float32/float16/bfloat16/float64 only)");
        it.target = *opt.dtype;
      }
      if (const auto q = to_quantize.find(d.name); q != to_quantize.end()) {
        if (it.target != dtype::float32 && it.target != dtype::float16 &&
            it.target != dtype::bfloat16)
          throw checkpoint_error(f->path().string(), d.name, std::nullopt,
                                 "quantize: weight dtype " + std::string(name(it.target)) +
                                     " cannot be quantized (float32/float16/bfloat16 only)");
        if (d.shape.rank() != 2)
          throw checkpoint_error(
              f->path().string(), d.name, std::nullopt,
              "quantize: a Linear weight must be 2-D, got " + d.shape.to_string());
        it.kind = q->second;
        it.outputs = detail::quantized_outputs(ck, it, *opt.quantize);
        ++quantized;
      } else {
        tensor_desc out = d;
        out.dtype = it.target;
        it.outputs.push_back(std::move(out));
      }
      items.push_back(std::move(it));
    }
  }
  // Output tensors in order: (item, part).
  std::vector<std::pair<std::size_t, std::size_t>> parts;
  std::vector<std::uint64_t> sizes;
  for (std::size_t i = 0; i < items.size(); ++i)
    for (std::size_t k = 0; k < items[i].outputs.size(); ++k) {
      parts.emplace_back(i, k);
      sizes.push_back(items[i].outputs[k].nbytes());
    }
  convert_report rep;
  const auto plan =
      plan_shards(sizes, opt.max_shard_size, "model{suffix}.safetensors", &rep.total_size);
  std::filesystem::create_directories(dst);
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (const auto& shard : plan) {
    std::map<std::size_t, std::vector<std::vector<std::byte>>> produced;  // this shard's items
    std::vector<tensor_view> views;
    std::vector<tensor_ref> refs;
    refs.reserve(shard.tensors.size());
    for (auto p : shard.tensors) {
      const auto [i, k] = parts[p];
      const auto& it = items[i];
      const tensor_desc& od = it.outputs[k];
      tensor_ref r{od.name, od.dtype, od.shape, {}};
      if (it.kind == detail::quant_kind::none && it.target == it.src.dtype) {
        tensor_view v = ck.shard(it.shard)->view(it.src.name);  // zero copy
        r.data = v.bytes;
        views.push_back(std::move(v));
      } else {
        auto pit = produced.find(i);
        if (pit == produced.end())
          pit =
              produced.emplace(i, detail::produce(ck, it, opt.quantize ? &*opt.quantize : nullptr))
                  .first;
        if (pit->second[k].size() != od.nbytes())
          throw checkpoint_error(ck.shard(it.shard)->path().string(), od.name, std::nullopt,
                                 "convert: produced " + std::to_string(pit->second[k].size()) +
                                     " bytes, planned " + std::to_string(od.nbytes()));
        r.data = pit->second[k];
      }
      refs.push_back(std::move(r));
      weight_map.emplace_back(od.name, shard.filename);
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
  rep.tensors = parts.size();
  rep.quantized_weights = quantized;
  if (opt.copy_other_files && std::filesystem::is_directory(src)) {
    for (const auto& de : std::filesystem::directory_iterator(src)) {
      if (!de.is_regular_file() || detail::is_weight_file(de.path())) continue;
      const auto to = dst / de.path().filename();
      if (opt.quantize && de.path().filename() == "config.json")
        detail::write_quantized_config(de.path(), to, opt.dtype, opt.quantize->config);
      else
        std::filesystem::copy_file(de.path(), to,
                                   std::filesystem::copy_options::overwrite_existing);
      rep.copied.push_back(to);
    }
  }
  return rep;
}

}  // namespace stowage::checkpoint
