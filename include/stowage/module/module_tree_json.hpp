// stowage/module/module_tree_json.hpp: module trees as JSON, so models defined elsewhere
// (PyTorch via tools/dump_module_tree.py, a user's own format) can be planned. Schema:
//   {"class": "ModelForTest",
//    "parameters": [{"name": "weight", "shape": [4, 3], "dtype": "float32"}],
//    "buffers":    [{"name": "running_mean", "shape": [4], "dtype": "float32", "persistent":
//    true}], "children":   [{"name": "linear1", "class": "Linear", ...}], "tied_parameters":
//    [["linear1.weight", "linear3.weight"]]}
// Arrays keep registration order; tied_parameters appears only at the root. Errors name the
// JSON path of the bad value.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/module_tree.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace stowage {

namespace detail {

inline const nlohmann::json& json_member(const nlohmann::json& obj, const char* key,
                                         const std::string& path, bool required = true) {
  static const nlohmann::json null_json;
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (required) throw json_error(path, std::string("missing member \"") + key + "\"");
    return null_json;
  }
  return *it;
}

inline tensor_entry tensor_from_json(const nlohmann::json& j, const std::string& path,
                                     bool buffer) {
  if (!j.is_object()) throw json_error(path, "expected an object");
  tensor_entry t;
  const auto& name = json_member(j, "name", path);
  if (!name.is_string()) throw json_error(path + ".name", "expected a string");
  t.name = name.get<std::string>();
  const auto& shp = json_member(j, "shape", path);
  if (!shp.is_array()) throw json_error(path + ".shape", "expected an array of integers");
  if (shp.size() > shape::max_rank)
    throw json_error(path + ".shape", "rank above " + std::to_string(shape::max_rank));
  std::int64_t dims[shape::max_rank];
  for (std::size_t i = 0; i < shp.size(); ++i) {
    if (!shp[i].is_number_integer() || shp[i].get<std::int64_t>() < 0)
      throw json_error(path + ".shape[" + std::to_string(i) + "]",
                       "expected a non-negative integer");
    dims[i] = shp[i].get<std::int64_t>();
  }
  t.shape = shape(std::span<const std::int64_t>(dims, shp.size()));
  const auto& dt = json_member(j, "dtype", path);
  if (!dt.is_string()) throw json_error(path + ".dtype", "expected a dtype name");
  auto d = parse_dtype(dt.get<std::string>());
  if (!d) throw json_error(path + ".dtype", "unknown dtype \"" + dt.get<std::string>() + "\"");
  t.dtype = *d;
  if (buffer) {
    const auto& p = json_member(j, "persistent", path, false);
    if (!p.is_null()) {
      if (!p.is_boolean()) throw json_error(path + ".persistent", "expected true or false");
      t.persistent = p.get<bool>();
    }
  }
  return t;
}

inline void module_from_json(module_tree& tree, std::size_t node, const nlohmann::json& j,
                             const std::string& path) {
  if (!j.is_object()) throw json_error(path.empty() ? "$" : path, "expected an object");
  const std::string pfx = path.empty() ? "" : path + ".";
  for (const char* kind : {"parameters", "buffers"}) {
    const auto& arr = json_member(j, kind, path, false);
    if (arr.is_null()) continue;
    if (!arr.is_array()) throw json_error(pfx + kind, "expected an array");
    const bool buffer = std::strcmp(kind, "buffers") == 0;
    for (std::size_t i = 0; i < arr.size(); ++i) {
      const std::string p = pfx + kind + "[" + std::to_string(i) + "]";
      auto t = tensor_from_json(arr[i], p, buffer);
      try {
        buffer ? tree.add_buffer(node, std::move(t)) : tree.add_parameter(node, std::move(t));
      } catch (const model_error& e) {
        throw json_error(p, e.what());
      }
    }
  }
  const auto& kids = json_member(j, "children", path, false);
  if (kids.is_null()) return;
  if (!kids.is_array()) throw json_error(pfx + "children", "expected an array");
  for (std::size_t i = 0; i < kids.size(); ++i) {
    const std::string p = pfx + "children[" + std::to_string(i) + "]";
    const auto& c = kids[i];
    if (!c.is_object()) throw json_error(p, "expected an object");
    const auto& name = json_member(c, "name", p);
    if (!name.is_string()) throw json_error(p + ".name", "expected a string");
    const auto& cls = json_member(c, "class", p, false);
    if (!cls.is_null() && !cls.is_string()) throw json_error(p + ".class", "expected a string");
    std::size_t child = 0;
    try {
      child = tree.add_child(node, name.get<std::string>(),
                             cls.is_null() ? std::string("Module") : cls.get<std::string>());
    } catch (const model_error& e) {
      throw json_error(p + ".name", e.what());
    }
    module_from_json(tree, child, c, p);
  }
}

inline nlohmann::json tensor_to_json(const tensor_entry& t, bool buffer) {
  nlohmann::json j = nlohmann::json::object();
  j["name"] = t.name;
  j["shape"] = nlohmann::json::array();
  for (auto d : t.shape) j["shape"].push_back(d);
  j["dtype"] = std::string(name(t.dtype));
  if (buffer) j["persistent"] = t.persistent;
  return j;
}

inline nlohmann::json module_to_json(const module_tree& tree, std::size_t i) {
  const auto& n = tree.node(i);
  nlohmann::json j = nlohmann::json::object();
  if (i != 0) j["name"] = n.name;
  j["class"] = n.class_name;
  j["parameters"] = nlohmann::json::array();
  for (const auto& p : n.parameters) j["parameters"].push_back(tensor_to_json(p, false));
  j["buffers"] = nlohmann::json::array();
  for (const auto& b : n.buffers) j["buffers"].push_back(tensor_to_json(b, true));
  j["children"] = nlohmann::json::array();
  for (auto c : n.children) j["children"].push_back(module_to_json(tree, c));
  return j;
}

}  // namespace detail

/// Builds a module tree from its JSON form. Throws json_error naming the path of a bad value.
inline module_tree module_tree_from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw json_error("$", "a module tree is a JSON object");
  const auto& cls = detail::json_member(j, "class", "$", false);
  if (!cls.is_null() && !cls.is_string()) throw json_error("class", "expected a string");
  module_tree tree(cls.is_null() ? std::string("Module") : cls.get<std::string>());
  detail::module_from_json(tree, 0, j, "");
  const auto& ties = detail::json_member(j, "tied_parameters", "$", false);
  if (!ties.is_null()) {
    if (!ties.is_array()) throw json_error("tied_parameters", "expected an array of arrays");
    for (std::size_t g = 0; g < ties.size(); ++g) {
      const std::string p = "tied_parameters[" + std::to_string(g) + "]";
      if (!ties[g].is_array()) throw json_error(p, "expected an array of names");
      std::vector<std::string> group;
      for (std::size_t k = 0; k < ties[g].size(); ++k) {
        if (!ties[g][k].is_string())
          throw json_error(p + "[" + std::to_string(k) + "]", "expected a string");
        group.push_back(ties[g][k].get<std::string>());
      }
      try {
        tree.tie(std::move(group));
      } catch (const model_error& e) {
        throw json_error(p, e.what());
      }
    }
  }
  return tree;
}

/// Parses a JSON text; syntax errors become json_error with the byte position.
inline module_tree module_tree_from_json_text(std::string_view text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw json_error("$", std::string("not valid JSON: ") + e.what());
  }
  return module_tree_from_json(j);
}

/// Reads a module-tree JSON file. Errors name the file and the JSON path.
inline module_tree load_module_tree(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(path, std::string("cannot open: ") + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return module_tree_from_json_text(ss.str());
  } catch (const json_error& e) {
    throw json_error(path, e.what());
  }
}

/// The JSON form of a module tree (the inverse of module_tree_from_json).
inline nlohmann::json to_json(const module_tree& tree) {
  nlohmann::json j = detail::module_to_json(tree, 0);
  j["tied_parameters"] = nlohmann::json::array();
  for (const auto& g : tree.tied_parameters()) j["tied_parameters"].push_back(g);
  return j;
}

}  // namespace stowage
