// stowage/dispatch/weight_store.hpp: every loaded tensor of a model by full dotted name. Each
// name maps to one tensor_storage; tied names (lm_head.weight / model.embed_tokens.weight) map
// to the SAME storage, loaded once. Lookups return views (descriptor under the asked name +
// placement + bytes); bind() pairs a model's meta parameter with its bytes.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/placement/devices.hpp>
#include <stowage/storage/tensor_storage.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace stowage {

/// A non-owning look at one stored tensor, valid while the weight_store lives.
struct weight_view {
  tensor_desc desc;  ///< named as asked (an alias keeps its own name)
  device placement = device::cpu();
  storage::storage_kind kind = storage::storage_kind::host;
  const storage::tensor_storage* storage = nullptr;  ///< shared by every tied name

  /// Host bytes (error for GPU storage).
  std::span<const std::byte> bytes() const { return storage->bytes(); }
  const void* data() const noexcept { return storage->data(); }
  std::size_t size() const noexcept { return storage->size(); }
};

/// Name -> storage for a whole model.
class weight_store {
 public:
  weight_store() = default;
  weight_store(weight_store&&) noexcept = default;
  weight_store& operator=(weight_store&&) noexcept = default;
  weight_store(const weight_store&) = delete;
  weight_store& operator=(const weight_store&) = delete;

  /// Adds a tensor under its descriptor's name; model_error if the name is taken.
  void add(storage::tensor_storage s) {
    std::string n = s.desc().name;
    if (index_.count(n)) throw model_error("weight_store: tensor `" + n + "` stored twice");
    storages_.push_back(std::make_unique<storage::tensor_storage>(std::move(s)));
    index_.emplace(n, storages_.size() - 1);
    names_.push_back(std::move(n));
  }
  /// Makes `alias` name the storage of `target` (a tie); model_error if `target` is unknown or
  /// `alias` is taken.
  void alias(const std::string& alias_name, const std::string& target) {
    auto it = index_.find(target);
    if (it == index_.end())
      throw model_error("weight_store: cannot tie `" + alias_name + "` to `" + target +
                        "`, which is not stored");
    if (index_.count(alias_name))
      throw model_error("weight_store: tensor `" + alias_name + "` stored twice");
    index_.emplace(alias_name, it->second);
    names_.push_back(alias_name);
  }

  bool contains(std::string_view n) const { return index_.count(std::string(n)) != 0; }
  /// Every name (aliases included), in the order added.
  const std::vector<std::string>& names() const noexcept { return names_; }
  std::size_t size() const noexcept { return names_.size(); }
  /// Distinct storages (a tie group counts once).
  std::size_t storage_count() const noexcept { return storages_.size(); }

  /// The storage behind a name; nullptr if none.
  const storage::tensor_storage* find(std::string_view n) const {
    auto it = index_.find(std::string(n));
    return it == index_.end() ? nullptr : storages_[it->second].get();
  }
  const storage::tensor_storage& at(std::string_view n) const {
    if (const auto* s = find(n)) return *s;
    throw model_error("weight_store: no tensor `" + std::string(n) + "` was loaded");
  }
  /// A view under name `n`; model_error when nothing is stored under it.
  weight_view view(std::string_view n) const {
    const auto& s = at(n);
    weight_view v;
    v.desc = s.desc();
    v.desc.name = std::string(n);
    v.placement = s.placement();
    v.kind = s.kind();
    v.storage = &s;
    return v;
  }
  /// True when two names share one storage.
  bool shares_storage(std::string_view a, std::string_view b) const {
    const auto* x = find(a);
    return x != nullptr && x == find(b);
  }

  /// Binds a model's meta parameter to the bytes stored under `n` (host-accessible storage
  /// only). model_error when shape or dtype differ from what was loaded.
  bound_parameter<const std::byte> bind(std::string_view n, const parameter& p) const {
    const auto& s = at(n);
    if (s.desc().shape != p.shape() || s.desc().dtype != p.dtype())
      throw model_error("weight_store::bind: `" + std::string(n) + "` was loaded as " +
                        s.desc().shape.to_string() + " " + std::string(name(s.desc().dtype)) +
                        ", the parameter is " + p.shape().to_string() + " " +
                        std::string(name(p.dtype())));
    return stowage::bind(p, s.bytes());
  }

  /// One storage taken out of a store, with the other names tied to it.
  struct extracted {
    storage::tensor_storage storage;
    std::vector<std::string> aliases;
  };
  /// Empties the store, handing every storage back (in the order added) with its aliases:
  /// how dispatch_model re-places a loaded model without copying what stays where it is.
  std::vector<extracted> extract() && {
    std::vector<extracted> out;
    out.reserve(storages_.size());
    for (auto& s : storages_) out.push_back({std::move(*s), {}});
    for (const auto& n : names_) {
      const std::size_t i = index_.at(n);
      if (n != out[i].storage.desc().name) out[i].aliases.push_back(n);
    }
    storages_.clear();
    index_.clear();
    names_.clear();
    return out;
  }

  /// Bytes held per backend (each shared storage counted once).
  std::uint64_t bytes_in(storage::storage_kind k) const {
    std::uint64_t t = 0;
    for (const auto& s : storages_)
      if (s->kind() == k) t += s->size();
    return t;
  }

 private:
  std::vector<std::unique_ptr<storage::tensor_storage>> storages_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<std::string> names_;
};

}  // namespace stowage
