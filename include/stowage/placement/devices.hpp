// stowage/placement/devices.hpp: where a module can live in a device map or a budget: a GPU by
// index, "mps", "cpu" (host memory, CPU offload) or "disk" (an offload folder). Ordered the way
// accelerate orders budgets (GPUs by index, then mps, cpu, disk) and printed as Python prints
// them ("0", "cpu"), so verbose lines and JSON match accelerate's.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>

#include <charconv>
#include <compare>
#include <cstdint>
#include <string>
#include <string_view>

namespace stowage {

/// A placement target.
class device {
 public:
  enum class kind : std::uint8_t { gpu, mps, cpu, disk };

  /// GPU `index` (implicit so maps read `{0, "20GB"}`).
  constexpr device(int index) noexcept : kind_(kind::gpu), index_(index) {}  // NOLINT
  /// Parses "cpu", "disk", "mps", "cuda:N", "cuda" (= GPU 0) or a GPU index "N".
  device(std::string_view s) : device(parse(s)) {}               // NOLINT implicit
  device(const char* s) : device(std::string_view(s)) {}         // NOLINT implicit
  device(const std::string& s) : device(std::string_view(s)) {}  // NOLINT implicit

  static constexpr device gpu(int index) noexcept { return device(index); }
  static constexpr device cpu() noexcept { return device(kind::cpu); }
  static constexpr device disk() noexcept { return device(kind::disk); }
  static constexpr device mps() noexcept { return device(kind::mps); }

  constexpr kind type() const noexcept { return kind_; }
  constexpr int index() const noexcept { return index_; }
  constexpr bool is_gpu() const noexcept { return kind_ == kind::gpu; }
  constexpr bool is_cpu() const noexcept { return kind_ == kind::cpu; }
  constexpr bool is_disk() const noexcept { return kind_ == kind::disk; }
  constexpr bool is_mps() const noexcept { return kind_ == kind::mps; }
  /// GPUs and mps: devices that execute (accelerate's "gpus" list).
  constexpr bool is_accelerator() const noexcept {
    return kind_ == kind::gpu || kind_ == kind::mps;
  }

  /// As Python's str() prints the key: "0", "mps", "cpu", "disk".
  std::string to_string() const {
    switch (kind_) {
      case kind::gpu:
        return std::to_string(index_);
      case kind::mps:
        return "mps";
      case kind::cpu:
        return "cpu";
      case kind::disk:
        return "disk";
    }
    return "?";
  }

  /// Parses a device value as device maps write them. Throws device_map_error for anything else.
  static device parse(std::string_view s) {
    if (s == "cpu") return cpu();
    if (s == "disk") return disk();
    if (s == "mps") return mps();
    if (s == "cuda") return gpu(0);
    std::string_view digits = s;
    if (digits.starts_with("cuda:")) digits.remove_prefix(5);
    int v = 0;
    if (!digits.empty() && digits.size() <= 9) {
      auto r = std::from_chars(digits.data(), digits.data() + digits.size(), v);
      if (r.ec == std::errc{} && r.ptr == digits.data() + digits.size() && v >= 0) return gpu(v);
    }
    throw device_map_error("unknown device \"" + std::string(s) +
                           "\" (expected a GPU index, \"cuda:N\", \"mps\", \"cpu\" or \"disk\")");
  }

  /// Parses a budget key exactly as accelerate's get_max_memory accepts them: "mps", "cpu",
  /// "disk" (GPU keys are integers, not strings). Throws invalid_budget otherwise.
  static device parse_budget_key(std::string_view s) {
    if (s == "cpu") return cpu();
    if (s == "disk") return disk();
    if (s == "mps") return mps();
    throw invalid_budget("Device " + std::string(s) +
                         " is not recognized, available devices are integers(for GPU/XPU), "
                         "'mps', 'cpu' and 'disk'");
  }

  friend constexpr bool operator==(device a, device b) noexcept {
    return a.kind_ == b.kind_ && (a.kind_ != kind::gpu || a.index_ == b.index_);
  }
  /// accelerate's budget order: GPUs by index, then mps, cpu, disk.
  friend constexpr std::strong_ordering operator<=>(device a, device b) noexcept {
    if (a.kind_ != b.kind_) return a.kind_ <=> b.kind_;
    return a.kind_ == kind::gpu ? a.index_ <=> b.index_ : std::strong_ordering::equal;
  }

 private:
  constexpr explicit device(kind k) noexcept : kind_(k), index_(0) {}
  kind kind_;
  int index_;
};

struct device_hash {
  std::size_t operator()(device d) const noexcept {
    return static_cast<std::size_t>(d.type()) * 1000003u + static_cast<std::size_t>(d.index());
  }
};

}  // namespace stowage
