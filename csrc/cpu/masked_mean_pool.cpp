// Masked mean pooling on the CPU, forward and backward, for padded (B, S, D) hidden states with a (B, S) bool
// mask and for packed (total, D) ones with cu_seqlens.
//
// Forward work split: at::parallel_for over units (row b, column chunk). A unit walks its row's tokens, skips the
// padding ones without touching their hidden states, and adds each real token's columns into an fp32
// accumulator row (L1-resident): hidden is read once, and only where mask says so. Rows are cut into column
// chunks only when there are too few rows to give every thread several units, so a batch of 1 still uses every
// core. Dividing by the count and normalizing (the norm needs the whole row) follow in the same unit when it owns
// the whole row, else in a second, cheap pass per row (B x D). sentence-transformers instead multiplies every
// position by the mask and sums: it reads the padding, writes and re-reads a (B, S, D) product, and normalizes
// in another pass.
// Backward: g[b] = d(out[b]) / d(mean[b]) applied to dout[b], divided by the token count, computed once per row
// and rounded to the storage dtype once; then each dhidden token row is a copy of g[b] (real) or zeros (padding),
// with non-temporal stores when dhidden is larger than the caches.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

#include "../masked_mean_pool_checks.h"
#include "vec_helpers.h"

namespace ctxkern {
namespace {

constexpr int64_t kMinChunkCols = 64;  // a narrower column chunk would read partial cache lines per token
constexpr float kNormEps = 1e-12f;

#if defined(CPU_CAPABILITY_AVX512)
using Bits = __m512i;
inline Bits load_bits(const char* p) { return _mm512_load_si512(p); }
inline void stream_bits(char* p, Bits v) { _mm512_stream_si512(reinterpret_cast<Bits*>(p), v); }
inline Bits zero_bits() { return _mm512_setzero_si512(); }
#elif defined(CPU_CAPABILITY_AVX2)
using Bits = __m256i;
inline Bits load_bits(const char* p) { return _mm256_load_si256(reinterpret_cast<const Bits*>(p)); }
inline void stream_bits(char* p, Bits v) { _mm256_stream_si256(reinterpret_cast<Bits*>(p), v); }
inline Bits zero_bits() { return _mm256_setzero_si256(); }
#endif

// Where the tokens of sequence b are: dense rows with a mask, or packed rows delimited by cu_seqlens.
struct Sequences {
  const uint8_t* mask;  // (B, S) 0/1, or nullptr when packed
  const int32_t* cu;    // (B + 1,), or nullptr when dense
  int64_t S;            // dense: tokens per row
  int64_t batch_stride;  // dense: elements between rows of hidden
  int64_t token_stride;  // elements between tokens of hidden

  int64_t begin(int64_t b) const { return cu ? cu[b] : 0; }
  int64_t end(int64_t b) const { return cu ? cu[b + 1] : S; }
  bool real(int64_t b, int64_t s) const { return mask == nullptr || mask[b * S + s] != 0; }
  int64_t offset(int64_t b, int64_t s) const { return (cu ? 0 : b * batch_stride) + s * token_stride; }
  int64_t count(int64_t b) const {
    if (cu) return cu[b + 1] - cu[b];
    int64_t n = 0;
    for (int64_t s = 0; s < S; ++s) n += mask[b * S + s] != 0;
    return n;
  }
};

// acc[0, n) += x[0, n) in fp32.
template <typename T>
inline void accumulate(const T* x, float* acc, int64_t n) {
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec a, c;
    load2(x + j, a, c);
    (Vec::loadu(acc + j) + a).store(acc + j);
    (Vec::loadu(acc + j + kVec) + c).store(acc + j + kVec);
  }
  for (; j < n; ++j) acc[j] += static_cast<float>(x[j]);
}

// mean[b] = sum[b] / count (0 for no token), in place; out[b] = mean[b], or mean[b] / max(||mean[b]||, 1e-12)
// with normalize, rounded to T.
template <typename T>
void finish_row(const Sequences& seq, int64_t b, int64_t D, bool normalize, float* mean, T* out) {
  float* m = mean + b * D;
  const int64_t count = seq.count(b);
  const float inv_count = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
  at::vec::map([inv_count](Vec v) { return v * Vec(inv_count); }, m, m, D);
  const float denom = normalize ? std::max(std::sqrt(dot(m, m, D)), kNormEps) : 1.f;
  for (int64_t j = 0; j < D; ++j) out[b * D + j] = static_cast<T>(normalize ? m[j] / denom : m[j]);
}

// The forward: sum (B, D) fp32 receives the sums, then the means; out (B, D) the result.
template <typename T>
void pool_rows(const T* hidden, const Sequences& seq, int64_t B, int64_t D, bool normalize, float* mean, T* out) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunks_wanted = std::min((4 * threads + B - 1) / B, std::max<int64_t>(1, D / kMinChunkCols));
  const int64_t chunk_cols = (((D + chunks_wanted - 1) / chunks_wanted + kStep - 1) / kStep) * kStep;
  const int64_t chunks = (D + chunk_cols - 1) / chunk_cols;
  at::parallel_for(0, B * chunks, 1, [&](int64_t unit_begin, int64_t unit_end) {
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t b = unit / chunks, c0 = (unit % chunks) * chunk_cols, n = std::min(chunk_cols, D - c0);
      float* acc = mean + b * D + c0;
      std::fill(acc, acc + n, 0.f);
      for (int64_t s = seq.begin(b), end = seq.end(b); s < end; ++s) {
        if (seq.real(b, s)) accumulate(hidden + seq.offset(b, s) + c0, acc, n);
      }
      // A unit that owns its whole row finishes it here: one parallel region instead of two, which matters on a
      // busy machine, where every region's closing barrier may wait for a descheduled thread.
      if (chunks == 1) finish_row(seq, b, D, normalize, mean, out);
    }
  });
  if (chunks == 1) return;
  // Rows cut into chunks are finished once all their chunks are summed.
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) finish_row(seq, b, D, normalize, mean, out);
  });
}

// g[b] = dL/dmean[b] / count, rounded to T, for every row. Without normalize dL/dmean = dout; with it, the
// derivative of mean / max(n, eps), n = ||mean||: (dout - y (y . dout)) / n when n >= eps (torch's clamp_min
// passes the gradient at equality), dout / eps on the clamped branch, y being the fp32 normalized mean.
template <typename T>
void row_gradients(const T* dout, const float* mean, const Sequences& seq, int64_t B, int64_t D, T* g) {
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> dy(D), y(D);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t count = seq.count(b);
      const float inv_count = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
      for (int64_t j = 0; j < D; ++j) dy[j] = static_cast<float>(dout[b * D + j]);
      float shift = 0.f, scale = inv_count;
      if (mean) {
        const float* m = mean + b * D;
        const float n = std::sqrt(dot(m, m, D));
        const float c = std::max(n, kNormEps);
        for (int64_t j = 0; j < D; ++j) y[j] = m[j] / c;
        shift = n >= kNormEps ? dot(y.data(), dy.data(), D) : 0.f;
        scale = inv_count / c;
      }
      for (int64_t j = 0; j < D; ++j) g[b * D + j] = static_cast<T>((dy[j] - y[j] * shift) * scale);
    }
  });
}

// Whether broadcast_rows may use non-temporal stores: dhidden past the caches, and every row start and g row
// aligned to a vector (fresh allocations are). The portable build has none.
bool use_streaming_stores(const void* dhidden, const void* g, int64_t tokens, int64_t row_bytes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t align = sizeof(Bits);
  return tokens * row_bytes >= kStreamBytes && row_bytes % align == 0 &&
         reinterpret_cast<uintptr_t>(dhidden) % align == 0 && reinterpret_cast<uintptr_t>(g) % align == 0;
#else
  return false;
#endif
}

// dst[0, bytes) = src[0, bytes), or zeros when src is null. With `stream`, non-temporal stores: dhidden is only
// written, and far larger than the caches, so this saves reading every line in before overwriting it.
inline void write_row(char* dst, const char* src, size_t bytes, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    for (size_t j = 0; j < bytes; j += sizeof(Bits)) stream_bits(dst + j, src ? load_bits(src + j) : zero_bits());
    return;
  }
#endif
  if (src) {
    std::memcpy(dst, src, bytes);
  } else {
    std::memset(dst, 0, bytes);  // +0.0 in fp32, fp16 and bf16
  }
}

// dhidden (tokens, D) contiguous: token t of sequence b is a copy of g[b] when real, zeros when padding.
template <typename T>
void broadcast_rows(const T* g, const Sequences& seq, int64_t tokens, int64_t B, int64_t D, T* dhidden) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const bool stream = use_streaming_stores(dhidden, g, tokens, row_bytes);
  const char* g_bytes = reinterpret_cast<const char*>(g);
  char* out_bytes = reinterpret_cast<char*>(dhidden);
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    // Packed: the sequence holding token `begin` (the last b with cu[b] <= begin), then walk forward.
    int64_t b = seq.cu ? std::upper_bound(seq.cu, seq.cu + B + 1, begin) - seq.cu - 1 : 0;
    for (int64_t t = begin; t < end; ++t) {
      bool real;
      if (seq.cu) {
        while (t >= seq.cu[b + 1]) ++b;
        real = true;
      } else {
        b = t / seq.S;
        real = seq.mask[t] != 0;
      }
      write_row(out_bytes + t * row_bytes, real ? g_bytes + b * row_bytes : nullptr, row_bytes, stream);
    }
    fence_streaming_stores(stream);
  });
}

std::tuple<at::Tensor, at::Tensor> pool_forward(const at::Tensor& hidden, const Sequences& seq, int64_t B,
                                                bool normalize) {
  const int64_t D = hidden.size(-1);
  at::Tensor out = at::empty({B, D}, hidden.options());
  at::Tensor mean = at::empty({B, D}, hidden.options().dtype(at::kFloat));
  if (B > 0 && D > 0) {
    CTXKERN_DISPATCH_FLOAT_TYPES(hidden.scalar_type(), "masked_mean_pool_fwd_cpu", [&] {
      pool_rows<scalar_t>(hidden.const_data_ptr<scalar_t>(), seq, B, D, normalize, mean.data_ptr<float>(),
                          out.data_ptr<scalar_t>());
    });
  }
  // Only the backward of normalize needs the fp32 mean.
  return {out, normalize ? mean : at::empty({B, 0}, mean.options())};
}

at::Tensor pool_backward(const at::Tensor& dout, const std::optional<at::Tensor>& mean, const Sequences& seq,
                         int64_t tokens, at::IntArrayRef dhidden_shape) {
  const int64_t B = dout.size(0), D = dout.size(1);
  at::Tensor dhidden = at::empty(dhidden_shape, dout.options());
  if (tokens == 0 || D == 0) return dhidden;
  at::Tensor g = at::empty({B, D}, dout.options());
  CTXKERN_DISPATCH_FLOAT_TYPES(dout.scalar_type(), "masked_mean_pool_bwd_cpu", [&] {
    row_gradients<scalar_t>(dout.const_data_ptr<scalar_t>(), mean ? mean->const_data_ptr<float>() : nullptr, seq, B,
                            D, g.data_ptr<scalar_t>());
    broadcast_rows<scalar_t>(g.const_data_ptr<scalar_t>(), seq, tokens, B, D, dhidden.data_ptr<scalar_t>());
  });
  return dhidden;
}

Sequences dense_sequences(const at::Tensor& mask, const at::Tensor* hidden) {
  return {reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()), nullptr, mask.size(1),
          hidden ? hidden->stride(0) : 0, hidden ? hidden->stride(1) : 0};
}

Sequences packed_sequences(const at::Tensor& cu_seqlens, const at::Tensor* hidden) {
  return {nullptr, cu_seqlens.const_data_ptr<int32_t>(), 0, 0, hidden ? hidden->stride(0) : 0};
}

std::tuple<at::Tensor, at::Tensor> masked_mean_pool_fwd_cpu(const at::Tensor& hidden, const at::Tensor& mask,
                                                            bool normalize) {
  check_pool_hidden(hidden, 3, at::kCPU);
  check_pool_mask(mask, hidden.size(0), hidden);
  TORCH_CHECK(mask.size(1) == hidden.size(1), "mask must have shape (", hidden.size(0), ", ", hidden.size(1),
              "), got ", mask.sizes());
  return pool_forward(hidden, dense_sequences(mask, &hidden), hidden.size(0), normalize);
}

at::Tensor masked_mean_pool_bwd_cpu(const at::Tensor& dout, const at::Tensor& mask,
                                    const std::optional<at::Tensor>& mean) {
  check_pool_bwd_args(dout, mean, at::kCPU);
  check_pool_mask(mask, dout.size(0), dout);
  const int64_t B = dout.size(0), S = mask.size(1), D = dout.size(1);
  return pool_backward(dout, mean, dense_sequences(mask, nullptr), B * S, {B, S, D});
}

std::tuple<at::Tensor, at::Tensor> masked_mean_pool_varlen_fwd_cpu(const at::Tensor& hidden,
                                                                   const at::Tensor& cu_seqlens, bool normalize) {
  check_pool_hidden(hidden, 2, at::kCPU);
  check_pool_cu_seqlens(cu_seqlens, hidden);
  // The kernels trust cu_seqlens to delimit hidden's rows; the CPU reads them anyway, so it checks them.
  check_cu_seqlens_values(cu_seqlens, "cu_seqlens", hidden.size(0), "hidden's length");
  return pool_forward(hidden, packed_sequences(cu_seqlens, &hidden), cu_seqlens.size(0) - 1, normalize);
}

at::Tensor masked_mean_pool_varlen_bwd_cpu(const at::Tensor& dout, const at::Tensor& cu_seqlens,
                                           const std::optional<at::Tensor>& mean, int64_t total) {
  check_pool_bwd_args(dout, mean, at::kCPU);
  check_pool_cu_seqlens(cu_seqlens, dout);
  TORCH_CHECK(cu_seqlens.size(0) == dout.size(0) + 1, "cu_seqlens must have B + 1 = ", dout.size(0) + 1,
              " entries, got ", cu_seqlens.size(0));
  TORCH_CHECK(total >= 0, "total must be >= 0, got ", total);
  check_cu_seqlens_values(cu_seqlens, "cu_seqlens", total, "total");
  return pool_backward(dout, mean, packed_sequences(cu_seqlens, nullptr), total, {total, dout.size(1)});
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CPU, m) {
  m.impl("masked_mean_pool_fwd", &masked_mean_pool_fwd_cpu);
  m.impl("masked_mean_pool_bwd", &masked_mean_pool_bwd_cpu);
  m.impl("masked_mean_pool_varlen_fwd", &masked_mean_pool_varlen_fwd_cpu);
  m.impl("masked_mean_pool_varlen_bwd", &masked_mean_pool_varlen_bwd_cpu);
}

}  // namespace ctxkern
