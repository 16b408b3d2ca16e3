// stowage/exec/cuda/layer_streamer.cuh: double-buffered streaming of decoder layers from host
// (pinned) memory into two device slots, each sized for the largest layer. While the compute
// stream runs layer i from one slot, the copy stream fills the other with layer i + 1
// (wrapping to layer 0 after the last, so the next forward's first layer arrives during this
// one's tail). Two events a slot order the streams on the device, never blocking the host:
// `ready` (recorded on the copy stream after a slot's copies; the compute stream waits on it
// before using the layer) and `freed` (recorded on the compute stream after the last work
// that reads the slot; the copy stream waits on it before overwriting). So the transfer of
// the non-resident bytes overlaps compute, and a decode step costs max(copy, compute), not
// their sum. Copies from pageable memory are correct too, but not asynchronous.
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/exec/cuda/context.cuh>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace stowage::exec::cuda {

/// One tensor of a layer in host memory (pinned for overlapped copies).
struct host_tensor {
  const void* data = nullptr;
  std::size_t bytes = 0;
};

class layer_streamer {
 public:
  static constexpr std::size_t alignment = 256;  // every tensor of a slot starts 256-aligned

  /// `layers[i]` lists layer i's tensors; acquire(i) returns their device addresses in that
  /// order. The host memory must stay valid and unchanged while the streamer exists.
  /// With `prefetch_next`, acquire(i) starts copying layer (i + 1) % n into the other slot.
  layer_streamer(const context& ctx, std::vector<std::vector<host_tensor>> layers,
                 bool prefetch_next = true)
      : ctx_(ctx), layers_(std::move(layers)), prefetch_next_(prefetch_next) {
    if (layers_.empty()) throw invalid_size("layer_streamer: no layers to stream");
    offsets_.resize(layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      std::size_t off = 0;
      for (const auto& t : layers_[i]) {
        if (t.data == nullptr && t.bytes != 0)
          throw invalid_size("layer_streamer: layer " + std::to_string(i) +
                             " has a tensor without data");
        offsets_[i].push_back(off);
        off += (t.bytes + alignment - 1) / alignment * alignment;
      }
      slot_bytes_ = std::max(slot_bytes_, off);
    }
    for (auto& s : slots_) {
      s.mem.resize(std::max<std::size_t>(slot_bytes_, 1));
      s.ready = std::make_unique<event>();
      s.freed = std::make_unique<event>();
    }
  }
  layer_streamer(const layer_streamer&) = delete;
  layer_streamer& operator=(const layer_streamer&) = delete;
  ~layer_streamer() {
    // The slots must not be freed under a copy or a kernel still in flight.
    cudaStreamSynchronize(ctx_.copy());
    cudaStreamSynchronize(ctx_.compute());
  }

  std::int64_t num_layers() const noexcept { return static_cast<std::int64_t>(layers_.size()); }
  /// Device bytes of one slot (the largest layer, tensors 256-aligned); two are allocated.
  std::size_t slot_bytes() const noexcept { return slot_bytes_; }
  /// Host-to-device bytes issued so far.
  std::size_t bytes_copied() const noexcept { return copied_; }
  /// Layers copied so far (a layer found in a slot is not copied again).
  std::size_t copies() const noexcept { return copies_; }

  /// Starts copying layer i into a slot not in use, on the copy stream, unless a slot holds
  /// it already. Throws when both slots are in use (two layers acquired and not released).
  void prefetch(std::int64_t i) {
    check_index(i, "prefetch");
    if (find(i) != nullptr) return;
    slot* s = nullptr;
    for (auto& c : slots_)
      if (!c.in_use && (s == nullptr || c.stamp < s->stamp)) s = &c;  // least recently used
    if (s == nullptr)
      throw error("layer_streamer: prefetch of layer " + std::to_string(i) +
                  ": both slots hold acquired layers (release one first)");
    // Wait for the compute stream to finish reading the slot's previous layer.
    if (s->freed_recorded) stream_wait(ctx_.copy(), *s->freed);
    const auto& ts = layers_[static_cast<std::size_t>(i)];
    const auto& offs = offsets_[static_cast<std::size_t>(i)];
    s->ptrs.resize(ts.size());
    for (std::size_t k = 0; k < ts.size(); ++k) {
      std::byte* dst = s->mem.data() + offs[k];
      s->ptrs[k] = dst;
      if (ts[k].bytes != 0)
        check(cudaMemcpyAsync(dst, ts[k].data, ts[k].bytes, cudaMemcpyHostToDevice, ctx_.copy()),
              "layer_streamer: cudaMemcpyAsync (host to device)");
      copied_ += ts[k].bytes;
    }
    s->ready->record(ctx_.copy());
    s->layer = i;
    s->stamp = ++clock_;
    ++copies_;
  }

  /// The device addresses of layer i's tensors, usable by work enqueued on the compute stream
  /// after this call (the compute stream waits for the copy). Valid until release(i).
  std::span<void* const> acquire(std::int64_t i) {
    check_index(i, "acquire");
    prefetch(i);
    slot* s = find(i);
    if (s->in_use)
      throw error("layer_streamer: layer " + std::to_string(i) + " is already acquired");
    stream_wait(ctx_.compute(), *s->ready);
    s->in_use = true;
    s->stamp = ++clock_;
    // Best effort: when the caller holds the other slot too, the next layer waits for it.
    const bool other_free = !slots_[0].in_use || !slots_[1].in_use;
    if (prefetch_next_ && layers_.size() > 1 && other_free)
      prefetch((i + 1) % static_cast<std::int64_t>(layers_.size()));
    return s->ptrs;
  }

  /// Marks layer i done: the work that reads it has been enqueued on the compute stream.
  void release(std::int64_t i) {
    check_index(i, "release");
    slot* s = find(i);
    if (s == nullptr || !s->in_use)
      throw error("layer_streamer: release of layer " + std::to_string(i) +
                  ", which is not acquired");
    s->freed->record(ctx_.compute());
    s->freed_recorded = true;
    s->in_use = false;
  }

 private:
  struct slot {
    device_buffer<std::byte> mem;
    std::unique_ptr<event> ready, freed;
    std::vector<void*> ptrs;
    std::int64_t layer = -1;
    std::uint64_t stamp = 0;
    bool in_use = false;
    bool freed_recorded = false;
  };

  void check_index(std::int64_t i, const char* what) const {
    if (i < 0 || i >= num_layers())
      throw invalid_size(std::string("layer_streamer: ") + what + " of layer " + std::to_string(i) +
                         " of " + std::to_string(num_layers()));
  }
  slot* find(std::int64_t i) noexcept {
    for (auto& s : slots_)
      if (s.layer == i) return &s;
    return nullptr;
  }

  const context& ctx_;
  std::vector<std::vector<host_tensor>> layers_;
  std::vector<std::vector<std::size_t>> offsets_;
  bool prefetch_next_ = true;
  std::size_t slot_bytes_ = 0;
  std::array<slot, 2> slots_;
  std::uint64_t clock_ = 0;
  std::size_t copied_ = 0;
  std::size_t copies_ = 0;
};

}  // namespace stowage::exec::cuda
