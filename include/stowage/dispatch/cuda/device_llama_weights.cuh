// stowage/dispatch/cuda/device_llama_weights.cuh: the weights of a dispatched Llama-family model
// (load_checkpoint_and_dispatch with a device map that has a GPU) as the CUDA forward reads
// them, following accelerate's execution rules (accelerate-spec §7.1-§7.3): the main device is
// the first GPU of the map and every block computes there. Blocks the map put on that GPU run
// in place from the loader's device storage; "cpu" blocks (pinned host memory when the main
// device is a GPU) stream through exec::cuda::layer_streamer, the next block's copy overlapping
// this block's compute; "disk" blocks are read from their file regions (the offload folder's
// files or the checkpoint's, through the loader's mappings) into pinned staging buffers and
// streamed the same way. The read of streamed block j + 1 happens on the host while the GPU
// still runs the work enqueued before block j, so disk reads overlap compute too. Embeddings, final
// norm and lm_head are used by every forward: where the map put them off the GPU they are copied to
// the main device once, at construction. Needs nvcc (kernels): include it only from .cu translation
// units linked to stowage::cuda.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/error.hpp>
#include <stowage/dispatch/load.hpp>
#include <stowage/dispatch/weight_store.hpp>
#include <stowage/exec/cuda/context.cuh>
#include <stowage/exec/cuda/layer_streamer.cuh>
#include <stowage/exec/cuda/llama_forward.cuh>
#include <stowage/exec/llama_forward.hpp>
#include <stowage/placement/device_map.hpp>
#include <stowage/storage/tensor_storage.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace stowage {

/// Throws device_map_error unless the CUDA forward can run `map` on one GPU: the main device
/// (first GPU of the map) is the only GPU any entry names. Multi-GPU pipelines are not run.
inline void check_single_gpu_map(const device_map& map) {
  const device main = main_device_of(map);
  for (const auto& [k, d] : map)
    if (d.is_gpu() && d != main)
      throw device_map_error(
          "device map puts " + (k.empty() ? std::string("the whole model") : "`" + k + "`") +
          " on GPU " + std::to_string(d.index()) + " and other blocks on " + main.to_string() +
          "; the CUDA forward runs every block on one GPU (the main device), so a map may name "
          "one GPU besides \"cpu\" and \"disk\"");
}

/// The llama_device_weights_source of a dispatched model whose main device is a GPU. The
/// dispatched weights must outlive it; `ctx` must be a context of the main device.
class dispatched_llama_device_weights final : public exec::cuda::llama_device_weights_source {
 public:
  dispatched_llama_device_weights(const exec::cuda::context& ctx, const dispatched_weights& w,
                                  const exec::llama_dims& d)
      : ctx_(ctx), store_(ctx) {
    namespace gpu = exec::cuda;
    check_single_gpu_map(w.map());
    const device main = w.main_device();
    if (!main.is_gpu())
      throw device_map_error("dispatched_llama_device_weights: the device map has no GPU entry");
    if (ctx.device() != main.index())
      throw device_map_error("dispatched_llama_device_weights: the context is on GPU " +
                             std::to_string(ctx.device()) + " but the main device is " +
                             main.to_string());
    // Every weight by name, with where its bytes live (a device pointer for GPU storage).
    std::unordered_map<const std::byte*, const storage::tensor_storage*> where;
    exec::named_llama_weights named(
        d, [&](std::string_view name) -> std::optional<exec::weight_ref> {
          if (!w.weights().contains(name)) return std::nullopt;
          const weight_view v = w.view(name);
          if (!exec::cpu::directly_readable(v.desc.dtype))
            throw invalid_dtype("tensor `" + v.desc.name + "` is " +
                                std::string(stowage::name(v.desc.dtype)) +
                                "; the CUDA forward runs float32, float16 and bfloat16 weights");
          auto r = exec::weight_ref::of_tensor(static_cast<const std::byte*>(v.data()),
                                               v.desc.dtype, v.desc.shape, v.desc.name);
          if (r.data != nullptr) where.emplace(r.data, v.storage);
          return r;
        });
    auto on_device = [&](const exec::weight_ref& r) {
      const auto it = where.find(r.data);
      return it != where.end() && it->second->kind() == storage::storage_kind::device;
    };
    auto from_file = [&](const exec::weight_ref& r) {
      const auto it = where.find(r.data);
      return it != where.end() && it->second->kind() == storage::storage_kind::file;
    };
    // The ends: in place on the GPU, else copied there once.
    auto end = [&](const exec::weight_ref& r) -> gpu::device_weight {
      if (on_device(r)) return gpu::detail::describe(r, r.data, r.type);
      return store_.put(r);
    };
    const auto e = named.embed_tokens();
    embed_ = end(e);
    norm_ = end(named.final_norm());
    const auto h = named.lm_head();
    head_ = h.data == e.data ? embed_ : end(h);

    // The decoder layers: resident fields in place, the others streamed (index into the
    // streamer's tensors of the layer).
    std::vector<std::vector<gpu::host_tensor>> streamed;
    for (std::int64_t i = 0; i < d.num_layers; ++i) {
      const exec::llama_layer_weights hl = named.layer(i);
      layer_plan lp;
      std::vector<gpu::host_tensor> parts;
      for (std::size_t f = 0; f < gpu::detail::host_fields.size(); ++f) {
        const exec::weight_ref& r = hl.*gpu::detail::host_fields[f];
        if (r.empty()) continue;
        lp.layer.*gpu::detail::device_fields[f] = gpu::detail::describe(r, r.data, r.type);
        if (on_device(r)) continue;
        const std::size_t bytes = static_cast<std::size_t>(r.numel()) * element_size(r.type);
        lp.field[f] = static_cast<int>(parts.size());
        if (from_file(r)) {
          // Read into this layer's staging buffer at `file_bytes` (set below).
          lp.file_parts.push_back({parts.size(), r.data, bytes, lp.file_bytes});
          lp.file_bytes += bytes;
        }
        parts.push_back({r.data, bytes});
      }
      if (!parts.empty()) {
        lp.stream = static_cast<std::int64_t>(streamed.size());
        streamed.push_back(std::move(parts));
      }
      plans_.push_back(std::move(lp));
    }
    ctx.sync_compute();  // the ends' uploads
    if (streamed.empty()) return;

    // Staging: streamed layers j and j + 1 (cyclically) are in flight together, so they never
    // share a buffer: j % 2, and a third buffer for the last one when the count is odd.
    const auto m = static_cast<std::int64_t>(streamed.size());
    std::array<std::size_t, 3> need{};
    for (auto& lp : plans_) {
      if (lp.stream < 0 || lp.file_parts.empty()) continue;
      lp.buffer = (m % 2 == 1 && m > 1 && lp.stream == m - 1) ? 2 : static_cast<int>(lp.stream % 2);
      need[static_cast<std::size_t>(lp.buffer)] =
          std::max(need[static_cast<std::size_t>(lp.buffer)], lp.file_bytes);
    }
    for (std::size_t b = 0; b < staging_.size(); ++b) {
      if (need[b] == 0) continue;
      staging_[b].mem = gpu::pinned_buffer(need[b]);
      staging_[b].copied = std::make_unique<gpu::event>();
    }
    for (auto& lp : plans_) {
      if (lp.stream < 0) continue;
      stream_of_.push_back(static_cast<std::size_t>(&lp - plans_.data()));
      auto& parts = streamed[static_cast<std::size_t>(lp.stream)];
      for (const auto& fp : lp.file_parts)
        parts[fp.part].data = staging_[static_cast<std::size_t>(lp.buffer)].mem.data() + fp.offset;
    }
    streamer_ = std::make_unique<gpu::layer_streamer>(ctx, std::move(streamed), true);
  }
  dispatched_llama_device_weights(const dispatched_llama_device_weights&) = delete;
  dispatched_llama_device_weights& operator=(const dispatched_llama_device_weights&) = delete;
  ~dispatched_llama_device_weights() override {
    // The staging buffers must not be freed under a copy still reading them.
    streamer_.reset();
  }

  exec::cuda::device_weight embed_tokens() override { return embed_; }
  exec::cuda::llama_device_layer layer(std::int64_t i) override {
    const layer_plan& lp = plan(i);
    if (lp.stream < 0) return lp.layer;
    const auto m = streamer_->num_layers();
    const std::int64_t next = (lp.stream + 1) % m;
    // acquire(j) copies layer j unless a slot holds it, and starts the copy of j + 1.
    stage(lp.stream);
    if (m > 1) stage(next);
    const auto ptrs = streamer_->acquire(lp.stream);
    mark_copied(lp.stream);
    if (m > 1) mark_copied(next);
    exec::cuda::llama_device_layer dl = lp.layer;
    for (std::size_t f = 0; f < lp.field.size(); ++f)
      if (lp.field[f] >= 0)
        (dl.*exec::cuda::detail::device_fields[f]).data =
            ptrs[static_cast<std::size_t>(lp.field[f])];
    return dl;
  }
  void release_layer(std::int64_t i) override {
    const layer_plan& lp = plan(i);
    if (lp.stream >= 0) streamer_->release(lp.stream);
  }
  exec::cuda::device_weight final_norm() override { return norm_; }
  exec::cuda::device_weight lm_head() override { return head_; }

  /// Decoder layers that run from the GPU's own memory / that are streamed to it.
  std::int64_t resident_layers() const noexcept {
    return static_cast<std::int64_t>(plans_.size()) - streamed_layers();
  }
  std::int64_t streamed_layers() const noexcept { return streamer_ ? streamer_->num_layers() : 0; }
  /// Of the streamed layers, those read from the offload folder (or checkpoint) on disk.
  std::int64_t disk_layers() const noexcept {
    return static_cast<std::int64_t>(std::count_if(
        plans_.begin(), plans_.end(), [](const layer_plan& p) { return !p.file_parts.empty(); }));
  }
  /// Device bytes of the ends copied to the GPU at construction (0 when the map put them there).
  std::size_t uploaded_bytes() const noexcept { return store_.bytes(); }
  /// The streamer (nullptr when every layer is resident).
  const exec::cuda::layer_streamer* streamer() const noexcept { return streamer_.get(); }

 private:
  struct file_part {
    std::size_t part;         ///< index among the layer's streamed tensors
    const std::byte* source;  ///< the mapped file bytes
    std::size_t bytes;
    std::size_t offset;  ///< in the staging buffer
  };
  struct layer_plan {
    exec::cuda::llama_device_layer layer;  ///< resident fields' device addresses
    std::array<int, 16> field = {-1, -1, -1, -1, -1, -1, -1, -1,
                                 -1, -1, -1, -1, -1, -1, -1, -1};  ///< streamed tensor index
    std::int64_t stream = -1;                                      ///< streamer layer, -1: resident
    std::vector<file_part> file_parts;
    std::size_t file_bytes = 0;
    int buffer = -1;  ///< staging buffer of the file parts
  };
  struct staging {
    exec::cuda::pinned_buffer mem;
    std::unique_ptr<exec::cuda::event> copied;  ///< after the last copy that may read `mem`
    bool recorded = false;
    std::int64_t holds = -1;  ///< streamed layer whose file bytes `mem` holds
  };

  const layer_plan& plan(std::int64_t i) const {
    if (i < 0 || i >= static_cast<std::int64_t>(plans_.size()))
      throw invalid_size("dispatched_llama_device_weights: layer " + std::to_string(i) + " of " +
                         std::to_string(plans_.size()));
    return plans_[static_cast<std::size_t>(i)];
  }
  layer_plan& plan_of_stream(std::int64_t j) {
    return plans_[stream_of_[static_cast<std::size_t>(j)]];
  }

  /// Makes the staging buffer of streamed layer j hold its file bytes (no-op without any):
  /// waits until the copies issued from the buffer are done, then reads the file bytes.
  void stage(std::int64_t j) {
    layer_plan& lp = plan_of_stream(j);
    if (lp.file_parts.empty()) return;
    staging& s = staging_[static_cast<std::size_t>(lp.buffer)];
    if (s.holds == j) return;
    if (s.recorded) s.copied->synchronize();
    s.holds = -1;
    for (const auto& fp : lp.file_parts)
      if (fp.bytes != 0) std::memcpy(s.mem.data() + fp.offset, fp.source, fp.bytes);
    s.holds = j;
  }
  /// Records, on the copy stream, that every copy issued so far from j's buffer is enqueued.
  void mark_copied(std::int64_t j) {
    layer_plan& lp = plan_of_stream(j);
    if (lp.file_parts.empty()) return;
    staging& s = staging_[static_cast<std::size_t>(lp.buffer)];
    s.copied->record(ctx_.copy());
    s.recorded = true;
  }

  const exec::cuda::context& ctx_;
  exec::cuda::detail::device_store store_;
  exec::cuda::device_weight embed_, norm_, head_;
  std::vector<layer_plan> plans_;
  std::vector<std::size_t> stream_of_;  ///< streamed layer -> index into plans_
  std::array<staging, 3> staging_;
  std::unique_ptr<exec::cuda::layer_streamer> streamer_;  // last: destroyed (synced) first
};

}  // namespace stowage
