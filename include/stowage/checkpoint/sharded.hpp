// stowage/checkpoint/sharded.hpp: sharded checkpoints. Reads `*.index.json` files
// (model.safetensors.index.json, pytorch_model.bin.index.json: {"metadata", "weight_map"} or
// the flat {name: file} form accelerate also accepts) and writes them as transformers'
// save_pretrained does (json indent 2, sorted keys, trailing newline). Splits a state dict into
// shards exactly as huggingface_hub's split_state_dict_into_shards_factory (formats-spec §5.5).
#pragma once

#include <stowage/checkpoint/json_strict.hpp>
#include <stowage/checkpoint/mapped_file.hpp>
#include <stowage/checkpoint/safetensors_writer.hpp>
#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stowage::checkpoint {

/// A parsed index file.
struct checkpoint_index {
  std::filesystem::path path;                          ///< the index file
  std::filesystem::path folder;                        ///< shards are relative to it
  nlohmann::json metadata = nlohmann::json::object();  ///< unknown keys kept, never required
  std::vector<std::pair<std::string, std::string>> weight_map;  ///< tensor -> shard, file order
  std::vector<std::string> shards;  ///< sorted, unique (the order accelerate loads them in)

  std::optional<std::uint64_t> total_size() const {
    auto it = metadata.find("total_size");
    if (it != metadata.end() && it->is_number_unsigned()) return it->get<std::uint64_t>();
    return std::nullopt;
  }
};

namespace detail {

/// A shard name from an index must stay inside the index's folder: no absolute paths, no `..`.
inline bool safe_relative_name(std::string_view s) {
  if (s.empty() || s.front() == '/' || s.find('\0') != std::string_view::npos) return false;
  std::size_t i = 0;
  while (i <= s.size()) {
    const std::size_t j = std::min(s.find('/', i), s.size());
    const auto part = s.substr(i, j - i);
    if (part == ".." || part == "." || part.empty()) return false;
    i = j + 1;
  }
  return true;
}

}  // namespace detail

/// Parses the text of an index file. `path` names it in errors and gives the shard folder.
inline checkpoint_index parse_index(std::string_view text, const std::filesystem::path& path) {
  const std::string file = path.string();
  if (auto bad = stowage::detail::find_invalid_utf8(text))
    throw checkpoint_error(file, "", *bad, "index file is not valid UTF-8");
  nlohmann::ordered_json j;
  auto r = stowage::detail::parse_json_strict(text, j);
  if (!r.ok) {
    if (r.duplicate_key)
      throw checkpoint_error(file, *r.duplicate_key, std::nullopt, "duplicate key in index file");
    throw checkpoint_error(file, "", std::nullopt, "index file is not valid JSON: " + r.error);
  }
  if (!j.is_object()) throw json_error(file, "an index file must hold a JSON object");
  checkpoint_index idx;
  idx.path = path;
  idx.folder = path.parent_path();
  const nlohmann::ordered_json* map = &j;
  if (auto it = j.find("weight_map"); it != j.end()) {
    if (!it->is_object())
      throw json_error(file + ": weight_map", "must be an object of tensor name -> file");
    map = &*it;
    if (auto m = j.find("metadata"); m != j.end() && !m->is_null()) {
      if (!m->is_object()) throw json_error(file + ": metadata", "must be an object");
      idx.metadata = nlohmann::json::parse(m->dump());
    }
  }
  std::set<std::string> shards;
  for (auto it = map->begin(); it != map->end(); ++it) {
    if (!it.value().is_string())
      throw json_error(file + ": weight_map." + it.key(), "shard file name must be a string");
    const std::string& f = it.value().get_ref<const std::string&>();
    if (!detail::safe_relative_name(f))
      throw checkpoint_error(
          file, it.key(), std::nullopt,
          "shard file \"" + f + "\" is not a plain name inside the checkpoint folder");
    idx.weight_map.emplace_back(it.key(), f);
    shards.insert(f);
  }
  idx.shards.assign(shards.begin(), shards.end());
  return idx;
}

/// Reads an index file from disk.
inline checkpoint_index read_index(const std::filesystem::path& path) {
  mapped_file f(path);
  return parse_index(std::string_view(reinterpret_cast<const char*>(f.data()), f.size()), path);
}

/// The index JSON as transformers writes it: json.dumps(index, indent=2, sort_keys=True) + "\n".
/// `metadata` holds total_size (and whatever else the caller adds).
inline std::string index_json(const nlohmann::json& metadata,
                              const std::vector<std::pair<std::string, std::string>>& weight_map) {
  nlohmann::json j;  // std::map-backed: keys sorted bytewise == Python's code-point order
  j["metadata"] = metadata;
  j["weight_map"] = nlohmann::json::object();
  for (const auto& [k, v] : weight_map) j["weight_map"][k] = v;
  try {
    return j.dump(2, ' ', true) + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw checkpoint_error("index", "", std::nullopt,
                           std::string("cannot serialize index: ") + e.what());
  }
}

/// huggingface_hub's size strings for max_shard_size: "<number><TB|GB|MB|KB>" (decimal units),
/// int(float(value) * unit); a bare integer is bytes.
inline std::uint64_t parse_shard_size(std::string_view s) {
  auto trim = [](std::string_view v) {
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
    return v;
  };
  s = trim(s);
  const std::string all(s);
  bool digits = !all.empty();
  for (char c : all) digits = digits && c >= '0' && c <= '9';
  if (digits) return std::stoull(all);
  if (s.size() < 3)
    throw invalid_size("max_shard_size \"" + all + "\": expected e.g. 5GB or 500MB");
  std::string unit(s.substr(s.size() - 2));
  for (auto& c : unit) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c);
  double mult = 0;
  if (unit == "TB")
    mult = 1e12;
  else if (unit == "GB")
    mult = 1e9;
  else if (unit == "MB")
    mult = 1e6;
  else if (unit == "KB")
    mult = 1e3;
  else
    throw invalid_size("max_shard_size \"" + all + "\": unit must be TB, GB, MB or KB");
  const std::string num(trim(s.substr(0, s.size() - 2)));
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(num, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != num.size() || num.empty() || !(v >= 0) || v * mult > 1.8e19)
    throw invalid_size("max_shard_size \"" + all + "\": cannot parse the number");
  return static_cast<std::uint64_t>(v * mult);
}

/// One shard of a split: its file name and the tensors (indices into the input) it holds.
struct shard_plan {
  std::string filename;
  std::vector<std::size_t> tensors;
};

/// huggingface_hub's splitting rule: walk the tensors in order; a tensor larger than the limit
/// gets a shard of its own (appended at once, before the shard being filled); otherwise a new
/// shard starts when adding it would pass the limit. `pattern` contains "{suffix}" (e.g.
/// "model{suffix}.safetensors"); one shard -> suffix "", else "-00001-of-00003".
inline std::vector<shard_plan> plan_shards(std::span<const std::uint64_t> sizes,
                                           std::uint64_t max_shard_size, std::string_view pattern,
                                           std::uint64_t* total_size = nullptr) {
  std::vector<std::vector<std::size_t>> shards;
  std::vector<std::size_t> current;
  std::uint64_t current_size = 0, total = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::uint64_t s = sizes[i];
    total += s;
    if (s > max_shard_size) {
      shards.push_back({i});
      continue;
    }
    if (current_size + s > max_shard_size) {
      shards.push_back(std::move(current));
      current.clear();
      current_size = 0;
    }
    current.push_back(i);
    current_size += s;
  }
  if (!current.empty()) shards.push_back(std::move(current));
  if (total_size) *total_size = total;
  const auto pos = pattern.find("{suffix}");
  auto name = [&](const std::string& suffix) {
    if (pos == std::string_view::npos) return std::string(pattern);
    return std::string(pattern.substr(0, pos)) + suffix + std::string(pattern.substr(pos + 8));
  };
  std::vector<shard_plan> out;
  const std::size_t n = shards.size();
  for (std::size_t k = 0; k < n; ++k) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "-%05zu-of-%05zu", k + 1, n);
    out.push_back({n == 1 ? name("") : name(buf), std::move(shards[k])});
  }
  return out;
}

/// What save_sharded_safetensors wrote.
struct sharded_save_result {
  std::vector<std::filesystem::path> files;    ///< shard files, in order
  std::optional<std::filesystem::path> index;  ///< set when there is more than one shard
  std::uint64_t total_size = 0;
};

/// Saves tensors (in the given order) as safetensors shards of at most `max_shard_size` bytes,
/// each with `metadata` (transformers uses {"format": "pt"}), plus model.safetensors.index.json
/// when there is more than one shard: the layout save_pretrained produces.
inline sharded_save_result save_sharded_safetensors(
    const std::filesystem::path& folder, std::span<const tensor_ref> tensors,
    std::uint64_t max_shard_size, const metadata_list& metadata = {{"format", "pt"}},
    std::string_view pattern = "model{suffix}.safetensors") {
  std::vector<std::uint64_t> sizes;
  sizes.reserve(tensors.size());
  for (const auto& t : tensors) sizes.push_back(t.data.size());
  sharded_save_result res;
  const auto plan = plan_shards(sizes, max_shard_size, pattern, &res.total_size);
  std::filesystem::create_directories(folder);
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (const auto& shard : plan) {
    std::vector<tensor_ref> part;
    part.reserve(shard.tensors.size());
    for (auto i : shard.tensors) {
      part.push_back(tensors[i]);
      weight_map.emplace_back(tensors[i].name, shard.filename);
    }
    write_safetensors(folder / shard.filename, part, metadata);
    res.files.push_back(folder / shard.filename);
  }
  if (plan.size() > 1) {
    std::string pat(pattern);
    const auto pos = pat.find("{suffix}");
    if (pos != std::string::npos) pat.erase(pos, 8);
    res.index = folder / (pat + ".index.json");
    const std::string text = index_json(nlohmann::json{{"total_size", res.total_size}}, weight_map);
    const std::span<const std::byte> chunk(reinterpret_cast<const std::byte*>(text.data()),
                                           text.size());
    detail::write_file_atomically(*res.index, std::span(&chunk, 1));
  }
  return res;
}

}  // namespace stowage::checkpoint
