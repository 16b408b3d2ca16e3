// stowage/exec/cuda/llama_forward.cuh: the Llama / Mistral / Qwen2 decoder forward on one GPU,
// the twin of exec::llama_cpu_forward (same dims, same make_cache / forward / generate, same
// logits up to float32 summation order). Weights come through llama_device_weights_source,
// asked for one layer at a time right before the layer's work is enqueued and told when it
// has been: resident_llama_weights keeps every layer in device memory; streamed_llama_weights
// keeps embeddings, final norm and lm_head resident and streams the decoder layers from pinned
// host memory through a layer_streamer (the next layer's copy overlapping this layer's
// compute). Everything runs on the context's compute stream; the host only waits where it
// needs the logits.
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/exec/cuda/context.cuh>
#include <stowage/exec/cuda/layer_streamer.cuh>
#include <stowage/exec/cuda/ops.cuh>
#include <stowage/exec/llama_forward.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace stowage::exec::cuda {

/// One decoder layer's weights in device memory (biases empty when the model has none).
struct llama_device_layer {
  device_weight input_layernorm, post_attention_layernorm;
  device_weight q_proj, k_proj, v_proj, o_proj;
  device_weight q_bias, k_bias, v_bias, o_bias;
  device_weight gate_proj, up_proj, down_proj;
  device_weight gate_bias, up_bias, down_bias;
};

namespace detail {
// The sixteen fields of a layer, in the same order for the host and the device struct.
inline constexpr std::array<weight_ref llama_layer_weights::*, 16> host_fields{
    &llama_layer_weights::input_layernorm, &llama_layer_weights::post_attention_layernorm,
    &llama_layer_weights::q_proj,          &llama_layer_weights::k_proj,
    &llama_layer_weights::v_proj,          &llama_layer_weights::o_proj,
    &llama_layer_weights::q_bias,          &llama_layer_weights::k_bias,
    &llama_layer_weights::v_bias,          &llama_layer_weights::o_bias,
    &llama_layer_weights::gate_proj,       &llama_layer_weights::up_proj,
    &llama_layer_weights::down_proj,       &llama_layer_weights::gate_bias,
    &llama_layer_weights::up_bias,         &llama_layer_weights::down_bias};
inline constexpr std::array<device_weight llama_device_layer::*, 16> device_fields{
    &llama_device_layer::input_layernorm, &llama_device_layer::post_attention_layernorm,
    &llama_device_layer::q_proj,          &llama_device_layer::k_proj,
    &llama_device_layer::v_proj,          &llama_device_layer::o_proj,
    &llama_device_layer::q_bias,          &llama_device_layer::k_bias,
    &llama_device_layer::v_bias,          &llama_device_layer::o_bias,
    &llama_device_layer::gate_proj,       &llama_device_layer::up_proj,
    &llama_device_layer::down_proj,       &llama_device_layer::gate_bias,
    &llama_device_layer::up_bias,         &llama_device_layer::down_bias};

/// A host weight as bytes the device reads: fp32/bf16/fp16 as stored, any other layout (a
/// row decoder: int8, nf4, ...) decoded to float32 into `tmp`.
struct host_bytes {
  const void* data = nullptr;
  std::size_t bytes = 0;
  stowage::dtype type = dtype::float32;
};
inline host_bytes bytes_of(const weight_ref& w, std::vector<float>& tmp) {
  cpu::check_readable(w);
  if (w.decode == nullptr)
    return {w.data, static_cast<std::size_t>(w.numel()) * element_size(w.type), w.type};
  tmp.resize(static_cast<std::size_t>(w.numel()));
  if (!tmp.empty()) cpu::decode_rows(w, 0, w.rows, tmp.data());
  return {tmp.data(), tmp.size() * sizeof(float), dtype::float32};
}

inline device_weight describe(const weight_ref& w, const void* dev, stowage::dtype t) {
  return device_weight{dev, t, w.rows, w.cols, w.name};
}
}  // namespace detail

/// Where the GPU forward gets its weights. layer(i) is called right before layer i's work is
/// enqueued on the compute stream and release_layer(i) right after: the pointers layer(i)
/// returns must be valid for work enqueued in between (a streaming source makes the compute
/// stream wait for their copy), and may be reused once work enqueued later has run.
class llama_device_weights_source {
 public:
  virtual ~llama_device_weights_source() = default;
  virtual device_weight embed_tokens() = 0;
  virtual llama_device_layer layer(std::int64_t i) = 0;
  virtual void release_layer(std::int64_t /*i*/) {}
  virtual device_weight final_norm() = 0;
  virtual device_weight lm_head() = 0;
};

namespace detail {
/// Owns device copies of host weights (uploaded on the compute stream).
class device_store {
 public:
  explicit device_store(const context& ctx) : ctx_(ctx) {}
  device_weight put(const weight_ref& w) {
    if (w.empty()) return {};
    std::vector<float> tmp;
    const auto hb = bytes_of(w, tmp);
    auto& buf = bufs_.emplace_back(std::max<std::size_t>(hb.bytes, 1));
    // Pageable source: the call returns once the bytes are staged, so tmp may die after it.
    upload(buf.data(), static_cast<const std::byte*>(hb.data), hb.bytes, ctx_.compute());
    bytes_ += hb.bytes;
    return describe(w, buf.data(), hb.type);
  }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  const context& ctx_;
  std::vector<device_buffer<std::byte>> bufs_;
  std::size_t bytes_ = 0;
};

/// Uploads embeddings, final norm and lm_head (shared when tied: same host data).
struct resident_ends {
  device_weight embed, norm, head;
  resident_ends(device_store& st, llama_weights_source& host) {
    const auto e = host.embed_tokens();
    embed = st.put(e);
    norm = st.put(host.final_norm());
    const auto h = host.lm_head();
    head = (h.data == e.data && h.decode == e.decode && h.decode_ctx == e.decode_ctx) ? embed
                                                                                      : st.put(h);
  }
};
}  // namespace detail

/// Every weight resident in device memory, copied once from a host source at construction.
class resident_llama_weights final : public llama_device_weights_source {
 public:
  resident_llama_weights(const context& ctx, const llama_dims& d, llama_weights_source& host)
      : store_(ctx), ends_(store_, host) {
    for (std::int64_t i = 0; i < d.num_layers; ++i) {
      const llama_layer_weights hl = host.layer(i);
      llama_device_layer dl;
      for (std::size_t f = 0; f < detail::host_fields.size(); ++f)
        dl.*detail::device_fields[f] = store_.put(hl.*detail::host_fields[f]);
      layers_.push_back(std::move(dl));
      host.release_layer(i);
    }
    ctx.sync_compute();
  }
  device_weight embed_tokens() override { return ends_.embed; }
  llama_device_layer layer(std::int64_t i) override {
    if (i < 0 || i >= static_cast<std::int64_t>(layers_.size()))
      throw invalid_size("resident_llama_weights: layer " + std::to_string(i) + " of " +
                         std::to_string(layers_.size()));
    return layers_[static_cast<std::size_t>(i)];
  }
  device_weight final_norm() override { return ends_.norm; }
  device_weight lm_head() override { return ends_.head; }
  std::size_t device_bytes() const noexcept { return store_.bytes(); }

 private:
  detail::device_store store_;
  detail::resident_ends ends_;
  std::vector<llama_device_layer> layers_;
};

struct stream_options {
  /// Copy each layer into pinned memory owned by the source (overlapped copies); false
  /// streams straight from the host source's memory (pinned already, or slow pageable copies).
  bool pin = true;
  /// Start copying layer i + 1 when layer i is acquired (false: copy on demand, for checks).
  bool prefetch_next = true;
};

/// Embeddings, final norm and lm_head resident; decoder layers streamed from host memory
/// through two device slots (see layer_streamer).
class streamed_llama_weights final : public llama_device_weights_source {
 public:
  streamed_llama_weights(const context& ctx, const llama_dims& d, llama_weights_source& host,
                         stream_options o = {})
      : store_(ctx), ends_(store_, host) {
    std::vector<std::vector<host_tensor>> layers;
    for (std::int64_t i = 0; i < d.num_layers; ++i) {
      const llama_layer_weights hl = host.layer(i);
      layer_info info;
      std::vector<host_tensor> parts;
      for (std::size_t f = 0; f < detail::host_fields.size(); ++f) {
        const weight_ref& w = hl.*detail::host_fields[f];
        if (w.empty()) continue;
        cpu::check_readable(w);
        info.field[f] = static_cast<int>(parts.size());
        info.desc[f] = detail::describe(w, nullptr, w.type);
        if (w.decode != nullptr) {  // int8, nf4, ...: streamed as float32
          auto& dec = decoded_.emplace_back(static_cast<std::size_t>(w.numel()));
          if (!dec.empty()) cpu::decode_rows(w, 0, w.rows, dec.data());
          info.desc[f].type = dtype::float32;
          parts.push_back({dec.data(), dec.size() * sizeof(float)});
        } else {
          parts.push_back({w.data, static_cast<std::size_t>(w.numel()) * element_size(w.type)});
        }
      }
      if (o.pin) {
        std::size_t total = 0;
        for (const auto& p : parts) total += p.bytes;
        auto& pb = pinned_.emplace_back(std::max<std::size_t>(total, 1));
        std::size_t off = 0;
        for (auto& p : parts) {
          if (p.bytes != 0) std::memcpy(pb.data() + off, p.data, p.bytes);
          p.data = pb.data() + off;
          off += p.bytes;
        }
      }
      host.release_layer(i);
      layers.push_back(std::move(parts));
      info_.push_back(std::move(info));
    }
    if (o.pin) decoded_.clear();  // copied into pinned memory
    ctx.sync_compute();
    streamer_ = std::make_unique<layer_streamer>(ctx, std::move(layers), o.prefetch_next);
  }

  device_weight embed_tokens() override { return ends_.embed; }
  llama_device_layer layer(std::int64_t i) override {
    const auto ptrs = streamer_->acquire(i);
    const auto& info = info_[static_cast<std::size_t>(i)];
    llama_device_layer dl;
    for (std::size_t f = 0; f < info.field.size(); ++f) {
      if (info.field[f] < 0) continue;
      dl.*detail::device_fields[f] = info.desc[f];
      (dl.*detail::device_fields[f]).data = ptrs[static_cast<std::size_t>(info.field[f])];
    }
    return dl;
  }
  void release_layer(std::int64_t i) override { streamer_->release(i); }
  device_weight final_norm() override { return ends_.norm; }
  device_weight lm_head() override { return ends_.head; }

  layer_streamer& streamer() noexcept { return *streamer_; }
  std::size_t resident_bytes() const noexcept { return store_.bytes(); }

 private:
  struct layer_info {
    std::array<int, 16> field = {-1, -1, -1, -1, -1, -1, -1, -1,
                                 -1, -1, -1, -1, -1, -1, -1, -1};  // tensor index or -1
    std::array<device_weight, 16> desc;
  };
  detail::device_store store_;
  detail::resident_ends ends_;
  std::vector<layer_info> info_;
  std::vector<pinned_buffer> pinned_;
  std::vector<std::vector<float>> decoded_;  ///< decoded layers streamed without pinning
  std::unique_ptr<layer_streamer> streamer_;
};

struct forward_options {
  linear_mode mode = linear_mode::weight_type;
};

/// The GPU forward of one model. Not thread-safe; one context (stream) per forward object.
class llama_cuda_forward {
 public:
  llama_cuda_forward(llama_dims d, llama_device_weights_source& w, const context& ctx,
                     forward_options o = {})
      : d_(std::move(d)), w_(w), ctx_(ctx), o_(o), rope_([&] {
          auto r = d_.rope;
          r.dim = d_.head_dim;
          return r;
        }()) {}

  const llama_dims& dims() const noexcept { return d_; }
  const context& ctx() const noexcept { return ctx_; }

  kv_cache make_cache(std::int64_t batch, std::int64_t capacity) const {
    return kv_cache(d_.num_layers, batch, d_.num_kv_heads, d_.head_dim, capacity);
  }

  /// As llama_cpu_forward::forward, leaving the logits in device memory ([batch, vocab] or
  /// [batch, seq, vocab]); the pointer is valid until the next call. Returns before the GPU
  /// has finished (work is ordered on ctx().compute()).
  const float* forward_device(std::span<const std::int64_t> ids, std::int64_t batch,
                              kv_cache& cache, logits_mode mode = logits_mode::last) {
    if (batch <= 0 || ids.empty() || ids.size() % static_cast<std::size_t>(batch) != 0)
      throw invalid_size("llama cuda forward: " + std::to_string(ids.size()) + " ids do not form " +
                         std::to_string(batch) + " equal rows");
    if (cache.batch() != batch)
      throw invalid_size("llama cuda forward: cache batch " + std::to_string(cache.batch()) +
                         " != " + std::to_string(batch));
    const std::int64_t seq = static_cast<std::int64_t>(ids.size()) / batch;
    const std::int64_t rows = batch * seq, hid = d_.hidden_size;
    const std::int64_t past = cache.length();
    if (past + seq > cache.capacity())
      throw invalid_size("llama cuda forward: " + std::to_string(past) + " cached + " +
                         std::to_string(seq) + " new positions exceed the cache capacity " +
                         std::to_string(cache.capacity()));
    const std::int64_t q_out = d_.num_heads * d_.head_dim, kv_out = d_.num_kv_heads * d_.head_dim;
    const std::int64_t out_rows = mode == logits_mode::last ? batch : rows;
    const auto R = static_cast<std::size_t>(rows);
    grow(ids_, ids.size());
    grow(x_, R * hid);
    grow(h_, R * hid);
    grow(tmp_, R * hid);
    grow(q_, R * q_out);
    grow(k_, R * kv_out);
    grow(v_, R * kv_out);
    grow(attn_, R * q_out);
    grow(g_, R * d_.intermediate_size);
    grow(u_, R * d_.intermediate_size);
    grow(sel_, static_cast<std::size_t>(out_rows * hid));
    grow(logits_, static_cast<std::size_t>(out_rows * d_.vocab_size));

    // cos/sin of the new positions from the CPU rope (Transformers' inv_freq, float32).
    rope_.update(past + seq);
    const auto half = static_cast<std::size_t>(d_.head_dim / 2);
    std::vector<float> cosv(static_cast<std::size_t>(seq) * half), sinv(cosv.size());
    for (std::int64_t t = 0; t < seq; ++t)
      rope_.angles(past + t, cosv.data() + static_cast<std::size_t>(t) * half,
                   sinv.data() + static_cast<std::size_t>(t) * half);
    grow(cos_, cosv.size());
    grow(sin_, sinv.size());
    // Pageable uploads return once the bytes are staged: the host vectors may die after.
    upload(cos_.data(), cosv.data(), cosv.size(), ctx_.compute());
    upload(sin_.data(), sinv.data(), sinv.size(), ctx_.compute());
    upload(ids_.data(), ids.data(), ids.size(), ctx_.compute());

    embedding(ctx_, w_.embed_tokens(), ids, ids_.data(), x_.data());
    const attention_shape as{batch,           seq,         d_.num_heads,
                             d_.num_kv_heads, d_.head_dim, d_.sliding_window};
    const auto n = R * static_cast<std::size_t>(hid);
    for (std::int64_t li = 0; li < d_.num_layers; ++li) {
      const llama_device_layer l = w_.layer(li);
      layer_guard guard{w_, li};
      rms_norm(ctx_, x_.data(), rows, l.input_layernorm, d_.rms_norm_eps, h_.data());
      linear(ctx_, h_.data(), rows, l.q_proj, l.q_bias, q_.data(), ws_, o_.mode);
      linear(ctx_, h_.data(), rows, l.k_proj, l.k_bias, k_.data(), ws_, o_.mode);
      linear(ctx_, h_.data(), rows, l.v_proj, l.v_bias, v_.data(), ws_, o_.mode);
      rope(ctx_, q_.data(), rows, seq, d_.num_heads, static_cast<std::int64_t>(half), cos_.data(),
           sin_.data());
      rope(ctx_, k_.data(), rows, seq, d_.num_kv_heads, static_cast<std::int64_t>(half),
           cos_.data(), sin_.data());
      attention(ctx_, q_.data(), k_.data(), v_.data(), cache, li, as, attn_.data());
      linear(ctx_, attn_.data(), rows, l.o_proj, l.o_bias, tmp_.data(), ws_, o_.mode);
      add(ctx_, x_.data(), tmp_.data(), n);
      rms_norm(ctx_, x_.data(), rows, l.post_attention_layernorm, d_.rms_norm_eps, h_.data());
      linear(ctx_, h_.data(), rows, l.gate_proj, l.gate_bias, g_.data(), ws_, o_.mode);
      linear(ctx_, h_.data(), rows, l.up_proj, l.up_bias, u_.data(), ws_, o_.mode);
      silu_mul(ctx_, g_.data(), u_.data(), R * static_cast<std::size_t>(d_.intermediate_size));
      linear(ctx_, g_.data(), rows, l.down_proj, l.down_bias, tmp_.data(), ws_, o_.mode);
      add(ctx_, x_.data(), tmp_.data(), n);
      guard.release();
    }
    cache.advance(seq);

    // Final norm and lm_head only on the rows whose logits are wanted: the last position of
    // each sequence is row (b + 1) * seq - 1, a strided copy of `batch` rows.
    const float* src = x_.data();
    if (mode == logits_mode::last) {
      const std::size_t row_bytes = static_cast<std::size_t>(hid) * sizeof(float);
      check(cudaMemcpy2DAsync(
                sel_.data(), row_bytes, x_.data() + static_cast<std::size_t>((seq - 1) * hid),
                row_bytes * static_cast<std::size_t>(seq), row_bytes,
                static_cast<std::size_t>(batch), cudaMemcpyDeviceToDevice, ctx_.compute()),
            "cudaMemcpy2DAsync (last positions)");
      src = sel_.data();
    }
    rms_norm(ctx_, src, out_rows, w_.final_norm(), d_.rms_norm_eps, sel_.data());
    linear(ctx_, sel_.data(), out_rows, w_.lm_head(), device_weight{}, logits_.data(), ws_,
           o_.mode);
    return logits_.data();
  }

  /// Runs `ids` ([batch, seq] row-major) at positions cache.length() ... and returns the
  /// logits in host memory, [batch, vocab] (last) or [batch, seq, vocab] (all).
  std::vector<float> forward(std::span<const std::int64_t> ids, std::int64_t batch, kv_cache& cache,
                             logits_mode mode = logits_mode::last) {
    const float* dev = forward_device(ids, batch, cache, mode);
    const auto rows = mode == logits_mode::last ? batch : static_cast<std::int64_t>(ids.size());
    std::vector<float> out(static_cast<std::size_t>(rows * d_.vocab_size));
    download(out.data(), dev, out.size(), ctx_.compute());
    ctx_.sync_compute();
    return out;
  }

  /// As llama_cpu_forward::generate. Greedy rows take the argmax on the device (only `batch`
  /// indices come back); sampled rows bring their logits back for cpu::sampler, so a seed
  /// gives the same tokens as on the CPU for the same logits.
  std::vector<std::vector<std::int64_t>> generate(std::span<const std::int64_t> prompt,
                                                  std::int64_t batch, const generate_options& o) {
    if (o.max_new_tokens < 0) throw invalid_config("generate: max_new_tokens must be >= 0");
    if (batch <= 0 || prompt.empty() || prompt.size() % static_cast<std::size_t>(batch) != 0)
      throw invalid_size("generate: prompt does not form " + std::to_string(batch) + " equal rows");
    const auto seq = static_cast<std::int64_t>(prompt.size()) / batch;
    auto cache = make_cache(batch, seq + std::max<std::int64_t>(o.max_new_tokens, 1));
    std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(batch));
    if (o.max_new_tokens == 0) return out;
    std::vector<bool> done(static_cast<std::size_t>(batch), false);
    std::vector<cpu::sampler> samplers;
    for (std::int64_t b = 0; b < batch; ++b) {
      auto so = o.sampling;
      so.seed += static_cast<std::uint64_t>(b);
      samplers.emplace_back(so);
    }
    const auto V = static_cast<std::size_t>(d_.vocab_size);
    std::vector<std::int64_t> next(static_cast<std::size_t>(batch)), chosen(next.size());
    std::vector<float> logits;
    std::span<const std::int64_t> input = prompt;
    for (std::int64_t step = 0; step < o.max_new_tokens; ++step) {
      const float* dev = forward_device(input, batch, cache, logits_mode::last);
      if (o.sampling.do_sample) {
        logits.resize(static_cast<std::size_t>(batch) * V);
        download(logits.data(), dev, logits.size(), ctx_.compute());
      } else {
        grow(argmax_, static_cast<std::size_t>(batch));
        argmax(ctx_, dev, batch, d_.vocab_size, argmax_.data());
        download(chosen.data(), argmax_.data(), chosen.size(), ctx_.compute());
      }
      ctx_.sync_compute();
      bool all_done = true;
      for (std::size_t b = 0; b < next.size(); ++b) {
        // A finished row keeps feeding its EOS token (its outputs are discarded).
        if (done[b]) continue;
        next[b] = o.sampling.do_sample
                      ? samplers[b].next(std::span<const float>(logits.data() + b * V, V))
                      : chosen[b];
        out[b].push_back(next[b]);
        if (std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), next[b]) !=
            o.eos_token_ids.end())
          done[b] = true;
        all_done = all_done && done[b];
      }
      if (all_done) break;
      input = next;
    }
    return out;
  }

 private:
  /// Releases a layer also when its work throws half-way (so the streamer's slot is free).
  struct layer_guard {
    llama_device_weights_source& w;
    std::int64_t i;
    bool done = false;
    void release() {
      done = true;
      w.release_layer(i);
    }
    ~layer_guard() {
      if (!done) try {
          w.release_layer(i);
        } catch (...) {  // already unwinding from the first error
        }
    }
  };

  /// Grows a scratch buffer; waits for in-flight work first (cudaFree under it is unsafe).
  template <class T>
  void grow(device_buffer<T>& b, std::size_t n) {
    if (b.size() >= n) return;
    ctx_.sync_compute();
    b.resize(n);
  }

  llama_dims d_;
  llama_device_weights_source& w_;
  const context& ctx_;
  forward_options o_;
  cpu::rotary_embedding rope_;
  device_buffer<std::int64_t> ids_, argmax_;
  device_buffer<float> x_, h_, tmp_, q_, k_, v_, attn_, g_, u_, sel_, logits_, cos_, sin_;
  linear_workspace ws_;
};

}  // namespace stowage::exec::cuda
