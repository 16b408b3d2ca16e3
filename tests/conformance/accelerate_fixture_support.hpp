// tests/conformance/accelerate_fixture_support.hpp: loading the fixtures written by
// tools/gen_accelerate_cases.py (real accelerate outputs) into stowage types.
#pragma once

#include <stowage/module/module_tree_json.hpp>
#include <stowage/module/sizes.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/placement/max_memory.hpp>
#include <stowage/placement/planner.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace fixture {

inline nlohmann::json load(const std::string& rel) {
  std::ifstream in(std::string(STOWAGE_FIXTURES_DIR) + "/" + rel);
  if (!in) throw std::runtime_error("missing fixture " + rel);
  return nlohmann::json::parse(in);
}

inline const stowage::module_tree& tree(const std::string& id) {
  static std::map<std::string, stowage::module_tree> cache;
  auto it = cache.find(id);
  if (it == cache.end())
    it = cache
             .emplace(id, stowage::load_module_tree(std::string(STOWAGE_FIXTURES_DIR) +
                                                    "/module_trees/" + id + ".json"))
             .first;
  return it->second;
}

inline stowage::device dev(const nlohmann::json& j) {
  if (j.is_number_integer()) return stowage::device(j.get<int>());
  return stowage::device::parse(j.get<std::string>());
}

inline stowage::device_map map(const nlohmann::json& pairs) {
  stowage::device_map m;
  for (const auto& p : pairs) m.set(p[0].get<std::string>(), dev(p[1]));
  return m;
}

/// Budgets from [[key, value], ...]; values are ints, floats, bools or strings.
inline stowage::max_memory budgets(const nlohmann::json& pairs) {
  stowage::max_memory m;
  for (const auto& p : pairs) {
    const stowage::device d = p[0].is_number_integer()
                                  ? stowage::device(p[0].get<int>())
                                  : stowage::device::parse_budget_key(p[0].get<std::string>());
    const auto& v = p[1];
    if (v.is_boolean())
      m.set(d, static_cast<std::int64_t>(v.get<bool>()));
    else if (v.is_number_integer())
      m.set(d, v.get<std::int64_t>());
    else if (v.is_number_float())
      m.set(d, v.get<double>());
    else
      m.set(d, v.get<std::string>());
  }
  return m;
}

/// A Python number as accelerate printed/returned it, as a byte_size with its int/float flavour.
inline stowage::byte_size size(const nlohmann::json& v) {
  if (v.is_number_integer()) return stowage::byte_size(v.get<std::int64_t>());
  const double d = v.get<double>();
  return stowage::byte_size::from_eighths(static_cast<std::int64_t>(d * 8.0), true);
}

inline std::vector<std::string> strings(const nlohmann::json& j) {
  std::vector<std::string> v;
  if (j.is_null()) return v;
  if (j.is_string()) return {j.get<std::string>()};
  for (const auto& s : j) v.push_back(s.get<std::string>());
  return v;
}

inline stowage::special_dtypes specials(const nlohmann::json& j) {
  stowage::special_dtypes s;
  if (j.is_null()) return s;
  for (auto it = j.begin(); it != j.end(); ++it)
    s.emplace_back(it.key(), stowage::dtype_from_name(it.value().get<std::string>()));
  return s;
}

inline stowage::plan_options options(const nlohmann::json& c) {
  stowage::plan_options o;
  o.no_split = strings(c.value("no_split", nlohmann::json()));
  if (!c["dtype"].is_null()) o.dtype = stowage::dtype_from_name(c["dtype"].get<std::string>());
  o.special_dtypes = specials(c.value("special_dtypes", nlohmann::json()));
  o.offload_buffers = c.value("offload_buffers", false);
  o.fallback_allocation = c.value("fallback_allocation", false);
  o.clean_result = c.value("clean_result", true);
  return o;
}

/// Verbose lines with Python-list contents sorted: accelerate's tie-group order comes from
/// set iteration (hash seed), so lists of names are compared as multisets.
inline std::string normalise_line(std::string line) {
  std::string out;
  std::size_t i = 0;
  while (i < line.size()) {
    if (line[i] == '[') {
      // Collect every quoted string up to the matching close bracket.
      int depth = 0;
      std::size_t j = i;
      std::vector<std::string> items;
      for (; j < line.size(); ++j) {
        if (line[j] == '[') ++depth;
        if (line[j] == ']' && --depth == 0) break;
        if (line[j] == '\'') {
          const auto k = line.find('\'', j + 1);
          items.push_back(line.substr(j + 1, k - j - 1));
          j = k;
        }
      }
      std::sort(items.begin(), items.end());
      out += "{";
      for (const auto& s : items) out += s + ",";
      out += "}";
      i = j + 1;
    } else {
      out += line[i++];
    }
  }
  return out;
}

}  // namespace fixture
