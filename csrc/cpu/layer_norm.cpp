// LayerNorm of (x + residual) over the last dim, forward and backward, on the CPU.
//
// Work split: at::parallel_for over rows; one thread owns whole rows. A row (N <= a few thousand floats)
// fits in L1, so each row is read from memory once (into a float scratch row holding x + residual in fp32,
// or in place for fp32 without residual), and the statistics and the output then come from cache. Mean and
// variance take two passes over the scratch (not E[x^2] - E[x]^2) for accuracy at no memory cost.
// The backward reduces dweight/dbias per fixed chunk of rows into fp32 partials, then sums the partials:
// deterministic whatever the thread schedule, and no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"

namespace ctxkern {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kStreamBytes = 8 << 20;

// out[j] = x[j] (+ r[j]) in fp32 (out may be null: only the sum is wanted); returns the sum, so the mean
// costs no extra pass.
template <typename T>
float load_row(const T* x, const T* r, float* out, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kVec <= n; j += kVec) {
      Vec v = Vec::loadu(x + j);
      if (r) v = v + Vec::loadu(r + j);
      if (out) v.store(out + j);
      acc = acc + v;
    }
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(x + j));
      if (r) {
        auto [c, d] = at::vec::convert_to_float<T>(VecT::loadu(r + j));
        a = a + c;
        b = b + d;
      }
      a.store(out + j);
      b.store(out + j + kVec);
      acc = acc + a + b;
    }
  }
  float sum = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc);
  for (; j < n; ++j) {
    const float v = static_cast<float>(x[j]) + (r ? static_cast<float>(r[j]) : 0.f);
    if (out) out[j] = v;
    sum += v;
  }
  return sum;
}

// One 32-byte vector of output to y, with a non-temporal store when `stream`: an output larger than the
// caches is then written without first being read in (no read-for-ownership), a third less memory traffic.
template <typename V, typename T>
inline void store_vec(const V& v, T* y, bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(y, v);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(y), v);
    }
    return;
  }
#endif
  v.store(y);
}

// out[j] = v[j] rounded to T; `stream` as for store_vec.
template <typename T>
void store_row(const float* v, T* out, int64_t n, bool stream = false) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kVec <= n; j += kVec) store_vec(Vec::loadu(v + j), out + j, stream);
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      store_vec(at::vec::convert_from_float<T>(Vec::loadu(v + j), Vec::loadu(v + j + kVec)), out + j, stream);
    }
  }
  for (; j < n; ++j) out[j] = static_cast<T>(v[j]);
}

// y[j] = (s[j] - mean) * rstd * w[j] + b[j], rounded to T; w, b are fp32 or null. `stream` requires y to be
// 32-byte aligned.
template <typename T>
void normalize_row(const float* s, float mean, float rstd, const float* w, const float* b, T* y, int64_t n,
                   bool stream) {
  const Vec vmu(mean), vrs(rstd);
  auto affine = [&](int64_t j) {
    Vec v = (Vec::loadu(s + j) - vmu) * vrs;
    if (w) v = v * Vec::loadu(w + j);
    if (b) v = v + Vec::loadu(b + j);
    return v;
  };
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kVec <= n; j += kVec) store_vec(affine(j), y + j, stream);
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      store_vec(at::vec::convert_from_float<T>(affine(j), affine(j + kVec)), y + j, stream);
    }
  }
  for (; j < n; ++j) {
    float v = (s[j] - mean) * rstd;
    if (w) v *= w[j];
    if (b) v += b[j];
    y[j] = static_cast<T>(v);
  }
}

float row_centered_sumsq(const float* v, float mean, int64_t n) {
  const Vec m(mean);
  Vec acc0(0.f), acc1(0.f);
  int64_t j = 0;
  for (; j + 2 * kVec <= n; j += 2 * kVec) {
    Vec d0 = Vec::loadu(v + j) - m, d1 = Vec::loadu(v + j + kVec) - m;
    acc0 = at::vec::fmadd(d0, d0, acc0);
    acc1 = at::vec::fmadd(d1, d1, acc1);
  }
  for (; j + kVec <= n; j += kVec) {
    Vec d = Vec::loadu(v + j) - m;
    acc0 = at::vec::fmadd(d, d, acc0);
  }
  float s = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc0 + acc1);
  for (; j < n; ++j) s += (v[j] - mean) * (v[j] - mean);
  return s;
}

// Streaming stores pay off only for outputs well past the caches, and need every row 32-byte aligned.
template <typename T>
bool use_streaming_stores(const T* out, int64_t M, int64_t N) {
  return M * N * static_cast<int64_t>(sizeof(T)) >= kStreamBytes && reinterpret_cast<uintptr_t>(out) % 32 == 0 &&
         (N * sizeof(T)) % 32 == 0;
}

inline void fence_streaming_stores(bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();  // orders the non-temporal stores before the parallel region's end
#endif
}

template <typename T>
void forward(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight, const at::Tensor* bias,
             double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t M = x.size(0), N = x.size(1);
  const T* x_ptr = x.const_data_ptr<T>();                            // (M, N), row stride x.stride(0)
  const T* r_ptr = residual ? residual->const_data_ptr<T>() : nullptr;  // (M, N) or null
  const T* w_ptr = weight ? weight->const_data_ptr<T>() : nullptr;      // (N,) or null
  const T* b_ptr = bias ? bias->const_data_ptr<T>() : nullptr;          // (N,) or null
  const int64_t x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  T* y_ptr = y.data_ptr<T>();              // (M, N) contiguous
  float* mean_ptr = mean.data_ptr<float>();  // (M,)
  float* rstd_ptr = rstd.data_ptr<float>();  // (M,)

  // The affine parameters are converted to fp32 once, not once per row.
  std::vector<float> w32(w_ptr ? N : 0), b32(b_ptr ? N : 0);
  if (w_ptr) load_row<T>(w_ptr, nullptr, w32.data(), N);
  if (b_ptr) load_row<T>(b_ptr, nullptr, b32.data(), N);

  const bool stream = use_streaming_stores(y_ptr, M, N);
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(N);
    // An fp32 row with no residual is read in place; anything else is staged in fp32 scratch.
    constexpr bool fp32 = std::is_same_v<T, float>;
    for (int64_t i = begin; i < end; ++i) {
      const T* x_row = x_ptr + i * x_stride;
      const bool in_place = fp32 && !r_ptr;
      const float* row = in_place ? reinterpret_cast<const float*>(x_row) : s.data();
      const float mu = load_row<T>(x_row, r_ptr ? r_ptr + i * r_stride : nullptr, in_place ? nullptr : s.data(), N) / N;
      const float rs = 1.f / std::sqrt(row_centered_sumsq(row, mu, N) / N + static_cast<float>(eps));
      mean_ptr[i] = mu;
      rstd_ptr[i] = rs;
      normalize_row<T>(row, mu, rs, w_ptr ? w32.data() : nullptr, b_ptr ? b32.data() : nullptr, y_ptr + i * N, N,
                       stream);
    }
    fence_streaming_stores(stream);
  });
}

template <typename T>
void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight,
              const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, at::Tensor& dx, at::Tensor& dweight,
              at::Tensor& dbias) {
  const int64_t M = x.size(0), N = x.size(1);
  const T* dy_ptr = dy.const_data_ptr<T>();                          // (M, N), row stride dy.stride(0)
  const T* x_ptr = x.const_data_ptr<T>();                            // (M, N), row stride x.stride(0)
  const T* r_ptr = residual ? residual->const_data_ptr<T>() : nullptr;  // (M, N) or null
  const float* mean_ptr = mean.const_data_ptr<float>();              // (M,)
  const float* rstd_ptr = rstd.const_data_ptr<float>();              // (M,)
  const int64_t dy_stride = dy.stride(0), x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  T* dx_ptr = dx.data_ptr<T>();  // (M, N) contiguous
  const bool want_dw = weight != nullptr;

  std::vector<float> w32(want_dw ? N : 0);
  if (want_dw) load_row<T>(weight->const_data_ptr<T>(), nullptr, w32.data(), N);

  // Fixed chunks (not per-thread buffers) keep dweight/dbias bitwise reproducible across thread counts' schedules.
  const int64_t n_chunks = std::min<int64_t>(M, 4 * at::get_num_threads());
  const int64_t rows_per_chunk = (M + n_chunks - 1) / n_chunks;
  const bool want_partials = want_dw || has_bias;
  const bool stream = use_streaming_stores(dx_ptr, M, N);
  std::vector<float> dw_part(want_dw ? n_chunks * N : 0, 0.f), db_part(has_bias ? n_chunks * N : 0, 0.f);

  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> xhat(N), g(N);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      float* dw_c = want_dw ? dw_part.data() + c * N : nullptr;
      float* db_c = has_bias ? db_part.data() + c * N : nullptr;
      const int64_t row_end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < row_end; ++i) {
        load_row<T>(x_ptr + i * x_stride, r_ptr ? r_ptr + i * r_stride : nullptr, xhat.data(), N);
        load_row<T>(dy_ptr + i * dy_stride, nullptr, g.data(), N);
        const Vec vmu(mean_ptr[i]), vrs(rstd_ptr[i]);
        // xhat = (s - mean) * rstd; g = dy * w. The partials take dy (in g) before it is scaled by w.
        Vec a0(0.f), b0(0.f);
        int64_t j = 0;
        for (; j + kVec <= N; j += kVec) {
          Vec xh = (Vec::loadu(xhat.data() + j) - vmu) * vrs;
          Vec d = Vec::loadu(g.data() + j);
          if (want_partials) {
            if (dw_c) at::vec::fmadd(d, xh, Vec::loadu(dw_c + j)).store(dw_c + j);
            if (db_c) (Vec::loadu(db_c + j) + d).store(db_c + j);
          }
          if (want_dw) d = d * Vec::loadu(w32.data() + j);
          xh.store(xhat.data() + j);
          d.store(g.data() + j);
          a0 = a0 + d;
          b0 = at::vec::fmadd(d, xh, b0);
        }
        float sum_g = at::vec::vec_reduce_all<float>(std::plus<Vec>(), a0);
        float sum_gx = at::vec::vec_reduce_all<float>(std::plus<Vec>(), b0);
        for (; j < N; ++j) {
          const float xh = (xhat[j] - mean_ptr[i]) * rstd_ptr[i];
          float d = g[j];
          if (dw_c) dw_c[j] += d * xh;
          if (db_c) db_c[j] += d;
          if (want_dw) d *= w32[j];
          xhat[j] = xh;
          g[j] = d;
          sum_g += d;
          sum_gx += d * xh;
        }
        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), written into g before the store to T.
        const Vec va(sum_g / N), vb(sum_gx / N);
        j = 0;
        for (; j + kVec <= N; j += kVec) {
          Vec xh = Vec::loadu(xhat.data() + j);
          (vrs * (Vec::loadu(g.data() + j) - va - xh * vb)).store(g.data() + j);
        }
        for (; j < N; ++j) g[j] = rstd_ptr[i] * (g[j] - sum_g / N - xhat[j] * (sum_gx / N));
        store_row<T>(g.data(), dx_ptr + i * N, N, stream);
      }
    }
    fence_streaming_stores(stream);
  });

  // Second stage: sum the per-chunk partials column by column.
  auto reduce_partials = [&](const std::vector<float>& part, at::Tensor& out) {
    std::vector<float> total(N, 0.f);
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t c = 0; c < n_chunks; ++c) {
        for (int64_t j = begin; j < end; ++j) total[j] += part[c * N + j];
      }
    });
    store_row<T>(total.data(), out.data_ptr<T>(), N);
  };
  if (want_dw) reduce_partials(dw_part, dweight);
  if (has_bias) reduce_partials(db_part, dbias);
}

const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_fwd_args(x, residual, weight, bias, at::kCPU);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  CTXKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    forward<scalar_t>(x, opt_ptr(residual), opt_ptr(weight), opt_ptr(bias), eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias) {
  check_layer_norm_bwd_args(dy, x, residual, weight, mean, rstd, at::kCPU);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  at::Tensor dweight = weight ? at::zeros({N}, weight->options()) : at::empty({0}, x.options());
  at::Tensor dbias = has_bias ? at::zeros({N}, x.options()) : at::empty({0}, x.options());
  if (M == 0) return {dx, dweight, dbias};
  CTXKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    backward<scalar_t>(dy, x, opt_ptr(residual), opt_ptr(weight), mean, rstd, has_bias, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace ctxkern
