// stowage/placement/device_map.hpp: the device map, module-or-tensor name -> device, in
// accelerate's JSON format (`{"model.layers.0": 0, "lm_head": "cpu"}`); accelerate's
// clean_device_map and check_device_map; and a strict validator against a module tree (every
// parameter and persistent buffer covered exactly once, no unknown names, no key below another).
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/placement/devices.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace stowage {

/// Ordered name -> device map. A key covers every tensor equal to it or below it ("a" covers
/// "a.w", not "ab.w"); "" covers the whole model. Equality ignores order (Python's order after
/// cleaning depends on the hash seed).
class device_map {
 public:
  device_map() = default;
  device_map(std::initializer_list<std::pair<std::string, device>> entries) {
    for (const auto& [k, v] : entries) set(k, v);
  }

  /// Sets `name`'s device (an existing key keeps its position).
  void set(std::string_view name, device d) {
    if (const std::size_t i = lookup(name); i != npos_) {
      entries_[i].second = d;
      return;
    }
    append(std::string(name), d);
  }
  /// Appends keys the caller knows are not in the map yet and are distinct, in order: `names`
  /// (anything whose elements convert to std::string_view) with `devices(i)` for the i-th. The
  /// planner's output path: keys are copied first, then hashed in one loop (independent hashes
  /// overlap), then placed.
  template <class Names, class Devices>
  void append_new_all(const Names& names, Devices&& devices) {
    const std::size_t base = entries_.size(), n = std::size(names);
    if (base + n >= 0xfffffffeu) throw device_map_error("device map: too many keys");
    entries_.reserve(base + n);
    if (slots_.size() < 4 * (base + n)) rehash(4 * (base + n));
    std::size_t i = 0;
    for (const auto& name : names) {
      entries_.emplace_back(std::string(std::string_view(name)), devices(i));
      ++i;
    }
    std::array<std::uint64_t, 64> h;  // a batch of hashes at a time, on the stack
    for (std::size_t k0 = 0; k0 < n; k0 += h.size()) {
      const std::size_t m = std::min(h.size(), n - k0);
      for (std::size_t k = 0; k < m; ++k) h[k] = hash_of(entries_[base + k0 + k].first);
      for (std::size_t k = 0; k < m; ++k) place(static_cast<std::uint32_t>(base + k0 + k), h[k]);
    }
  }
  /// Appends a key the caller knows is not in the map yet.
  void append_new(const std::string& name, device d) { append(name, d); }
  void append_new(std::string&& name, device d) { append(std::move(name), d); }
  void reserve(std::size_t n) {
    entries_.reserve(n);
    // A quarter full: fewer collisions, whose unpredictable extra probe cost more than the
    // larger table.
    if (slots_.size() < 4 * n) rehash(4 * n);
  }
  bool erase(std::string_view name) {
    const std::size_t i = lookup(name);
    if (i == npos_) return false;
    entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
    rehash(slots_.size());
    return true;
  }
  std::optional<device> find(std::string_view name) const {
    const std::size_t i = lookup(name);
    if (i == npos_) return std::nullopt;
    return entries_[i].second;
  }
  bool contains(std::string_view name) const { return lookup(name) != npos_; }
  device at(std::string_view name) const {
    if (auto d = find(name)) return *d;
    throw device_map_error("device map has no key `" + std::string(name) + "`");
  }

  /// The device of a tensor or module: the value of its longest dotted prefix present as a key.
  std::optional<device> device_for(std::string_view name) const {
    std::string_view n = name;
    while (true) {
      if (auto d = find(n)) return d;
      if (n.empty()) return std::nullopt;
      const auto dot = n.rfind('.');
      n = dot == std::string_view::npos ? std::string_view{} : n.substr(0, dot);
    }
  }

  const std::vector<std::pair<std::string, device>>& entries() const noexcept { return entries_; }
  auto begin() const noexcept { return entries_.begin(); }
  auto end() const noexcept { return entries_.end(); }
  std::size_t size() const noexcept { return entries_.size(); }
  bool empty() const noexcept { return entries_.empty(); }
  /// The distinct devices used, in budget order.
  std::vector<device> devices() const {
    std::vector<device> d;
    for (const auto& e : entries_)
      if (std::find(d.begin(), d.end(), e.second) == d.end()) d.push_back(e.second);
    std::sort(d.begin(), d.end());
    return d;
  }

  friend bool operator==(const device_map& a, const device_map& b) {
    if (a.size() != b.size()) return false;
    for (const auto& [k, v] : a.entries_) {
      auto d = b.find(k);
      if (!d || *d != v) return false;
    }
    return true;
  }

  // ---- JSON (accelerate's format) ---------------------------------------------------------

  /// Devices are numbers (GPU index) or strings ("cpu", "disk", "mps", "cuda:1" -> 1).
  template <class Json = nlohmann::json>
    requires std::same_as<Json, nlohmann::json> || std::same_as<Json, nlohmann::ordered_json>
  static device_map from_json(const Json& j) {
    if (!j.is_object()) throw device_map_error("device map: expected a JSON object");
    device_map m;
    for (auto it = j.begin(); it != j.end(); ++it) {
      const auto& v = it.value();
      if (v.is_number_integer()) {
        const auto i = v.template get<std::int64_t>();
        if (i < 0 || i > 1'000'000)
          throw device_map_error("device map[\"" + it.key() + "\"]: invalid GPU index " +
                                 std::to_string(i));
        m.set(it.key(), device(static_cast<int>(i)));
      } else if (v.is_string()) {
        try {
          m.set(it.key(), device::parse(v.template get<std::string>()));
        } catch (const device_map_error& e) {
          throw device_map_error("device map[\"" + it.key() + "\"]: " + e.what());
        }
      } else {
        throw device_map_error("device map[\"" + it.key() +
                               "\"]: expected a GPU index or a device string");
      }
    }
    return m;
  }
  static device_map from_json_text(std::string_view text) {
    nlohmann::ordered_json j;  // keeps the file's key order
    try {
      j = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      throw device_map_error(std::string("device map: not valid JSON: ") + e.what());
    }
    return from_json(j);
  }
  nlohmann::json to_json() const {
    // ordered_json keeps the map's order in the text.
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    for (const auto& [k, d] : entries_) {
      if (d.is_gpu())
        j[k] = d.index();
      else
        j[k] = d.to_string();
    }
    return nlohmann::json::parse(j.dump());
  }
  /// The JSON text in the map's own order (`indent` < 0: one line).
  std::string to_json_text(int indent = -1) const {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    for (const auto& [k, d] : entries_) {
      if (d.is_gpu())
        j[k] = d.index();
      else
        j[k] = d.to_string();
    }
    return j.dump(indent);
  }

 private:
  // The index: open addressing over positions into entries_ (power-of-two table, linear
  // probing, at most half full), so adding a key allocates nothing but the key itself.
  static constexpr std::size_t npos_ = static_cast<std::size_t>(-1);
  static constexpr std::uint32_t empty_ = 0xffffffffu;
  // Keys are short dotted names ("model.layers.17"): the first and last words (overlapping)
  // multiplied independently, so hashing one costs two multiplies in parallel and one after
  // (longer keys fold their middle words in first); the slot is taken from the high bits of the
  // last product, which depend on every input bit. A byte loop (std::hash), then a word loop
  // with a finalizer, were measurable shares of a first plan.
  static std::uint64_t hash_of(std::string_view s) noexcept {
    const char* p = s.data();
    const std::size_t n = s.size();
    auto word = [](const char* q) {
      std::uint64_t w;
      std::memcpy(&w, q, sizeof w);
      return w;
    };
    std::uint64_t a, b;
    if (n >= 8) {
      a = word(p);
      b = word(p + n - 8);
      for (std::size_t i = 8; i + 8 < n; i += 8)
        a = (a ^ word(p + i)) * 0x9e3779b97f4a7c15ull + (a >> 32);
    } else {
      a = 0;
      for (std::size_t i = 0; i < n; ++i)
        a |= static_cast<std::uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
      b = 0;
    }
    const std::uint64_t x = (a ^ 0x243f6a8885a308d3ull) * 0xbf58476d1ce4e5b9ull;
    const std::uint64_t y = (b ^ n) * 0x94d049bb133111ebull;
    return (x ^ ((y >> 32) | (y << 32))) * 0x9e3779b97f4a7c15ull;
  }
  std::size_t slot_of(std::uint64_t h) const noexcept {
    return static_cast<std::size_t>(h >> shift_);
  }
  std::size_t lookup(std::string_view name) const noexcept {
    if (slots_.empty()) return npos_;
    const std::size_t mask = slots_.size() - 1;
    for (std::size_t h = slot_of(hash_of(name));; h = (h + 1) & mask) {
      const std::uint32_t v = slots_[h];
      if (v == empty_) return npos_;
      if (entries_[v].first == name) return v;
    }
  }
  void place(std::uint32_t pos) { place(pos, hash_of(entries_[pos].first)); }
  void place(std::uint32_t pos, std::uint64_t hash) {
    const std::size_t mask = slots_.size() - 1;
    std::size_t h = slot_of(hash);
    while (slots_[h] != empty_) h = (h + 1) & mask;
    slots_[h] = pos;
  }
  void rehash(std::size_t want) {
    std::size_t cap = 16;
    int bits = 4;
    while (cap < want || cap < 2 * entries_.size() + 2) {
      cap *= 2;
      ++bits;
    }
    shift_ = 64 - bits;
    slots_.assign(cap, empty_);
    for (std::size_t i = 0; i < entries_.size(); ++i) place(static_cast<std::uint32_t>(i));
  }
  template <class Name>
  void append(Name&& name, device d) {
    if (entries_.size() >= 0xfffffffeu) throw device_map_error("device map: too many keys");
    entries_.emplace_back(std::forward<Name>(name), d);  // the key copied (or moved) once
    if (2 * entries_.size() > slots_.size())
      rehash(2 * entries_.size());
    else
      place(static_cast<std::uint32_t>(entries_.size() - 1));
  }
  std::vector<std::pair<std::string, device>> entries_;
  std::vector<std::uint32_t> slots_;
  int shift_ = 60;  // 64 - log2(slots_.size())
};

/// Writes a device map as accelerate's JSON (2-space indented). Throws io_error.
inline void save(const device_map& m, const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw io_error(path, std::string("cannot open for writing: ") + std::strerror(errno));
  out << m.to_json_text(2) << '\n';
  if (!out) throw io_error(path, "write failed");
}

/// Reads a device map JSON file. Errors name the file.
inline device_map load_device_map(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(path, std::string("cannot open: ") + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return device_map::from_json_text(ss.str());
  } catch (const device_map_error& e) {
    throw device_map_error(path + ": " + e.what());
  }
}

namespace detail {

struct clean_node {
  std::map<std::string, std::size_t, std::less<>> children;  // component -> node
  std::optional<std::size_t> key;  // index into the input entries when this name is a key
  std::size_t below = 0;           // keys strictly below
  std::optional<device> uniform;   // the common value of keys strictly below, if any
  bool mixed = false;
};

}  // namespace detail

/// accelerate's clean_device_map: wherever every key below a module (at least two) has the same
/// device, they are replaced by the module itself (the root included: an all-equal map becomes
/// {"": d}). Deterministic: a collapsed key takes the position of its first member.
inline device_map clean_device_map(const device_map& m) {
  using detail::clean_node;
  std::vector<clean_node> nodes(1);
  const auto& in = m.entries();
  for (std::size_t i = 0; i < in.size(); ++i) {
    const std::string& k = in[i].first;
    std::size_t cur = 0;
    std::vector<std::size_t> path{0};
    if (!k.empty()) {
      std::size_t start = 0;
      while (true) {
        const auto dot = k.find('.', start);
        const std::string comp =
            k.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        auto it = nodes[cur].children.find(comp);
        std::size_t next;
        if (it == nodes[cur].children.end()) {
          next = nodes.size();
          nodes[cur].children.emplace(comp, next);
          nodes.emplace_back();
        } else {
          next = it->second;
        }
        cur = next;
        if (dot == std::string::npos) break;
        path.push_back(cur);
        start = dot + 1;
      }
    }
    nodes[cur].key = i;
    // Every proper ancestor on the path sees this key below it.
    for (std::size_t a : path) {
      if (a == cur) continue;
      auto& n = nodes[a];
      ++n.below;
      if (!n.mixed) {
        if (!n.uniform)
          n.uniform = in[i].second;
        else if (*n.uniform != in[i].second)
          n.mixed = true;
      }
    }
  }
  // The root also counts a "" key itself (prefix "" matches every key).
  auto& root = nodes[0];
  std::size_t root_count = root.below + (root.key ? 1 : 0);
  bool root_uniform = !root.mixed;
  if (root.key && root.uniform && *root.uniform != in[*root.key].second) root_uniform = false;

  // (position, name, device) of the result.
  std::vector<std::tuple<std::size_t, std::string, device>> out;
  std::function<std::size_t(std::size_t)> first_key = [&](std::size_t n) {
    std::size_t best = nodes[n].key ? *nodes[n].key : static_cast<std::size_t>(-1);
    for (const auto& [c, idx] : nodes[n].children) best = std::min(best, first_key(idx));
    return best;
  };
  std::function<void(std::size_t, const std::string&)> walk = [&](std::size_t n,
                                                                  const std::string& name) {
    const auto& node = nodes[n];
    if (n != 0 && node.below > 1 && !node.mixed) {
      out.emplace_back(first_key(n), name, *node.uniform);
      return;
    }
    if (node.key) out.emplace_back(*node.key, name, in[*node.key].second);
    for (const auto& [c, idx] : node.children) walk(idx, join_name(name, c));
  };
  if (root_count > 1 && root_uniform) {
    out.emplace_back(0, "", root.key ? in[*root.key].second : *root.uniform);
  } else {
    walk(0, "");
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return std::get<0>(a) < std::get<0>(b); });
  device_map r;
  for (const auto& [pos, name, d] : out) r.set(name, d);
  return r;
}

/// What check_device_map found that is not an error.
struct device_map_check {
  std::vector<std::string> warnings;
};

/// accelerate's check_device_map: keys that name no module give a warning (tensor-level keys
/// too, as there); a parameter or persistent buffer no key covers is a device_map_error listing
/// them all in state-dict order.
inline device_map_check check_device_map(const module_tree& tree, const device_map& m) {
  device_map_check r;
  std::vector<std::string> unknown;
  for (const auto& [k, d] : m)
    if (!k.empty() && !tree.find_module(k)) unknown.push_back(k);
  if (!unknown.empty()) {
    std::string s = "The following device_map keys do not match any submodules in the model: [";
    for (std::size_t i = 0; i < unknown.size(); ++i) s += (i ? ", '" : "'") + unknown[i] + "'";
    r.warnings.push_back(s + "]");
  }
  if (m.contains("")) return r;
  std::vector<std::string> missing;
  for (std::size_t i : tree.preorder()) {
    const auto& n = tree.node(i);
    auto check = [&](const tensor_entry& t) {
      const std::string full = join_name(n.path, t.name);
      if (!m.device_for(full)) missing.push_back(full);
    };
    for (const auto& p : n.parameters) check(p);
    for (const auto& b : n.buffers)
      if (b.persistent) check(b);
  }
  if (!missing.empty()) {
    std::string s =
        "The device_map provided does not give any device for the following parameters: ";
    for (std::size_t i = 0; i < missing.size(); ++i) s += (i ? ", " : "") + missing[i];
    throw device_map_error(s);
  }
  return r;
}

/// The strict check stowage applies before loading: every key names a module or a tensor of
/// the tree, no key lies below another key, and every parameter and persistent buffer is
/// covered. Throws device_map_error naming the first bad name.
inline void validate_device_map(const module_tree& tree, const device_map& m) {
  for (const auto& [k, d] : m) {
    if (!k.empty() && !tree.find_module(k) && !tree.find_tensor(k))
      throw device_map_error("device map key `" + k + "` names no module or tensor of the model");
    if (d.is_gpu() && d.index() < 0)
      throw device_map_error("device map key `" + k + "`: negative GPU index");
    // A key with an ancestor key: the same tensors would have two devices.
    std::string_view a = k;
    while (!a.empty()) {
      const auto dot = a.rfind('.');
      a = dot == std::string_view::npos ? std::string_view{} : a.substr(0, dot);
      if (m.contains(a))
        throw device_map_error("device map lists both `" + std::string(a) +
                               "` and its descendant `" + k + "`");
    }
  }
  (void)check_device_map(tree, m);
}

}  // namespace stowage
