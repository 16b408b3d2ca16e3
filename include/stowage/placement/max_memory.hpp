// stowage/placement/max_memory.hpp: per-device memory budgets (accelerate's max_memory): GPU
// indices, "mps", "cpu", "disk" -> bytes, written as byte counts or size strings ("20GB",
// "18GiB", "1TB"), kept in accelerate's order (sorted GPUs, mps, cpu, disk). Measuring the
// machine is a separate function (measure_max_memory) so planning stays a pure function of
// explicit budgets (accelerate §9.20: repeated loads changed budgets).
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/memory_size.hpp>
#include <stowage/placement/devices.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#if defined(STOWAGE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace stowage {

/// Ordered device -> budget map.
class max_memory {
 public:
  /// A budget as a user writes it: bytes, a size string, or a (possibly fractional) number.
  struct value {
    value(int bytes) : v(static_cast<std::int64_t>(bytes)) {}                 // NOLINT
    value(long bytes) : v(static_cast<std::int64_t>(bytes)) {}                // NOLINT
    value(long long bytes) : v(static_cast<std::int64_t>(bytes)) {}           // NOLINT
    value(unsigned long bytes) : v(static_cast<std::int64_t>(bytes)) {}       // NOLINT
    value(unsigned long long bytes) : v(static_cast<std::int64_t>(bytes)) {}  // NOLINT
    value(double bytes) : v(bytes) {}                                         // NOLINT
    value(const char* s) : v(std::string(s)) {}                               // NOLINT
    value(std::string s) : v(std::move(s)) {}                                 // NOLINT
    value(byte_size s) : v(s) {}                                              // NOLINT
    std::variant<std::int64_t, double, std::string, byte_size> v;
  };
  struct init {
    device dev;
    value budget;
  };

  max_memory() = default;
  max_memory(std::initializer_list<init> entries) {
    for (const auto& e : entries) set(e.dev, e.budget);
  }

  /// Sets (or replaces) a device's budget. Throws invalid_budget naming the device for a
  /// negative, non-finite or unparsable value.
  void set(device d, const value& v) {
    const byte_size b = to_bytes(d, v);
    auto it = std::lower_bound(entries_.begin(), entries_.end(), d,
                               [](const auto& e, device k) { return e.first < k; });
    if (it != entries_.end() && it->first == d)
      it->second = b;
    else
      entries_.insert(it, {d, b});
  }
  void erase(device d) {
    std::erase_if(entries_, [&](const auto& e) { return e.first == d; });
  }

  bool contains(device d) const { return find(d).has_value(); }
  std::optional<byte_size> find(device d) const {
    for (const auto& e : entries_)
      if (e.first == d) return e.second;
    return std::nullopt;
  }
  byte_size at(device d) const {
    if (auto v = find(d)) return *v;
    throw invalid_budget("max_memory has no budget for device " + d.to_string());
  }

  const std::vector<std::pair<device, byte_size>>& entries() const noexcept { return entries_; }
  auto begin() const noexcept { return entries_.begin(); }
  auto end() const noexcept { return entries_.end(); }
  std::size_t size() const noexcept { return entries_.size(); }
  bool empty() const noexcept { return entries_.empty(); }

  /// True when these budgets were measured from the machine, not given by the user (decides
  /// accelerate's 90% rule for a single GPU in get_balanced_memory).
  bool measured = false;

  friend bool operator==(const max_memory& a, const max_memory& b) {
    return a.entries_ == b.entries_;
  }

  /// The JSON form: {"0": 20000000000, "cpu": "100GB"}. Numeric keys are GPU indices.
  static max_memory from_json(const nlohmann::json& j) {
    if (!j.is_object()) throw invalid_budget("max_memory: expected a JSON object");
    max_memory m;
    for (auto it = j.begin(); it != j.end(); ++it) {
      const device d = parse_key(it.key());
      const auto& v = it.value();
      if (v.is_boolean())
        m.set(d, static_cast<std::int64_t>(v.get<bool>()));
      else if (v.is_number_integer())
        m.set(d, v.get<std::int64_t>());
      else if (v.is_number_float())
        m.set(d, v.get<double>());
      else if (v.is_string())
        m.set(d, v.get<std::string>());
      else
        throw invalid_budget("max_memory[\"" + it.key() + "\"]: expected bytes or a size string");
    }
    return m;
  }
  nlohmann::json to_json() const {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& [d, b] : entries_) {
      if (b.is_float())
        j[d.to_string()] = b.bytes();
      else
        j[d.to_string()] = b.floor_bytes();
    }
    return j;
  }
  /// A key as JSON or a command line writes it: "0" -> GPU 0, "cpu", "disk", "mps".
  static device parse_key(std::string_view k) {
    if (!k.empty() &&
        std::all_of(k.begin(), k.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
        k.size() <= 9)
      return device(std::stoi(std::string(k)));
    return device::parse_budget_key(k);
  }
  /// "{0: 200, 'cpu': 1000}" as Python prints the dict.
  std::string to_python_string() const {
    std::string s = "{";
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      if (i) s += ", ";
      const auto& d = entries_[i].first;
      s += d.is_gpu() ? d.to_string() : "'" + d.to_string() + "'";
      s += ": " + entries_[i].second.to_python_string();
    }
    return s + "}";
  }

 private:
  static byte_size to_bytes(device d, const value& v) {
    const std::string where = "max_memory[" + d.to_string() + "]";
    if (auto* i = std::get_if<std::int64_t>(&v.v)) {
      if (*i < 0)
        throw invalid_budget(where + ": `size` " + std::to_string(*i) +
                             " is not in a valid format (a budget cannot be negative)");
      return byte_size(*i);
    }
    if (auto* f = std::get_if<double>(&v.v)) {
      if (!std::isfinite(*f) || *f < 0 || *f > 1e18)
        throw invalid_budget(where + ": budget " + std::to_string(*f) +
                             " is not a finite non-negative number of bytes");
      // Fractional budgets are kept to the eighth of a byte (Python keeps the float).
      return byte_size::from_eighths(static_cast<std::int64_t>(std::floor(*f * 8.0)), true);
    }
    if (auto* b = std::get_if<byte_size>(&v.v)) {
      if (b->eighths() < 0) throw invalid_budget(where + ": a budget cannot be negative");
      return *b;
    }
    const auto& s = std::get<std::string>(v.v);
    try {
      return byte_size(static_cast<std::int64_t>(parse_memory_size(s, size_syntax::extended)));
    } catch (const invalid_size& e) {
      throw invalid_budget(where + ": " + e.what());
    }
  }

  std::vector<std::pair<device, byte_size>> entries_;
};

/// accelerate's "Device k is not available, available devices are [...]" warnings for GPU keys
/// outside [0, device_count). Budgets for absent GPUs are kept, as accelerate keeps them.
inline std::vector<std::string> unavailable_device_warnings(const max_memory& m, int device_count) {
  std::string avail = "[";
  for (int i = 0; i < device_count; ++i) avail += (i ? ", " : "") + std::to_string(i);
  avail += "]";
  std::vector<std::string> out;
  for (const auto& [d, b] : m)
    if (d.is_gpu() && (d.index() < 0 || d.index() >= device_count))
      out.push_back("Device " + d.to_string() + " is not available, available devices are " +
                    avail);
  return out;
}

/// Bytes of RAM available now (MemAvailable of /proc/meminfo), or nullopt where unknown.
inline std::optional<std::int64_t> available_host_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  std::int64_t kib = 0;
  std::string unit;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

/// What the machine offers now, as accelerate's get_max_memory(None) measures it: every visible
/// GPU's *free* memory (CUDA builds only), then "cpu" = available RAM. Call it once and pass the
/// result on: planning itself never reads the machine.
inline max_memory measure_max_memory() {
  max_memory m;
#if defined(STOWAGE_WITH_CUDA)
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess) {
    for (int i = 0; i < count; ++i) {
      std::size_t free_b = 0, total_b = 0;
      if (cudaSetDevice(i) != cudaSuccess) continue;
      if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
        continue;  // skipped, as accelerate does
      m.set(device::gpu(i), static_cast<std::int64_t>(free_b));
    }
  } else {
    (void)cudaGetLastError();
  }
#endif
  if (auto ram = available_host_memory()) m.set(device::cpu(), *ram);
  m.measured = true;
  return m;
}

}  // namespace stowage
