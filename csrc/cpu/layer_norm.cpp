// LayerNorm of (x + residual) over the last dim, forward and backward, on the CPU.
//
// Work split: at::parallel_for over rows; one thread owns whole rows. A row (N <= a few thousand floats)
// fits in L1, so each row is read from memory once (into an fp32 scratch row, or in place for fp32 without
// residual) and every later pass over it runs from cache. The forward takes the mean while loading and the
// variance in a second pass over the cached row (not E[x^2] - E[x]^2, which cancels), both as blocked pairwise
// sums; a row whose fp32 moments overflow or underflow takes them again from the row scaled by a power of two.
// The backward needs two passes. It reduces dweight/dbias per fixed chunk of rows into fp32 partials, then sums
// the partials: deterministic whatever the thread schedule, and no atomics.
// Inner loops take 2 * Vec::size() elements at a time: one Vectorized<T> of fp16/bf16 widens to two of fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../layer_norm_checks.h"
#include "vec_helpers.h"

namespace ctxkern {
namespace {

// x[0, kStep) + r[0, kStep) (r may be null) as two fp32 vectors.
template <typename T>
inline void load_sum2(const T* x, const T* r, Vec& a, Vec& b) {
  load2(x, a, b);
  if (r) {
    Vec ra, rb;
    load2(r, ra, rb);
    a = a + ra;
    b = b + rb;
  }
}

inline float reduce(const Vec& a, const Vec& b) { return at::vec::vec_reduce_all<float>(std::plus<Vec>(), a + b); }

// The affine parameter p (N,) in fp32, converted once rather than once per row; empty when p is null.
template <typename T>
std::vector<float> to_fp32(const T* p, int64_t n) {
  std::vector<float> out(p ? n : 0);
  for (int64_t j = 0; p && j < n; ++j) out[j] = static_cast<float>(p[j]);
  return out;
}

// Streaming stores need every output row aligned to a vector, and pay off only for outputs past the caches;
// the portable build has none.
template <typename T>
bool use_streaming_stores(const T* out, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t align = sizeof(Vec);
  return M * N * static_cast<int64_t>(sizeof(T)) >= kStreamBytes && reinterpret_cast<uintptr_t>(out) % align == 0 &&
         (N * static_cast<int64_t>(sizeof(T))) % align == 0;
#else
  return false;
#endif
}

// Sums of a row are taken in blocks of kBlockSteps steps of kStep elements, each block into two fresh
// vectors, and the block sums are merged pairwise like a binary counter. The rounding error of a lane then
// grows with kBlockSteps + log2(n / kBlock) instead of with n / kStep (a row of 100000 fp32 is 3125 sequential
// additions per lane otherwise, several times torch's cascade-sum error); a row of one block (N <= 1024 with
// AVX512) costs nothing extra.
constexpr int64_t kBlockSteps = 32;
constexpr int64_t kBlock = kBlockSteps * kStep;

// sum over j = 0, kStep, ... < n_vec (a multiple of kStep) of the two vectors step(j, a, b) adds into (a, b).
template <typename Step>
inline float blocked_sum(int64_t n_vec, Step&& step) {
  auto block = [&](int64_t j0) {
    Vec a(0.f), b(0.f);
    const int64_t end = std::min(j0 + kBlock, n_vec);
    for (int64_t j = j0; j < end; j += kStep) step(j, a, b);
    return a + b;
  };
  if (n_vec <= kBlock) return at::vec::vec_reduce_all<float>(std::plus<Vec>(), block(0));
  // One partial sum per level, as raw floats (a Vec array would be zeroed on every call); 64 levels cover
  // any int64 count of blocks.
  alignas(64) float pending[64 * kVec];
  int depth = 0;
  uint64_t blocks = 0;
  for (int64_t j0 = 0; j0 < n_vec; j0 += kBlock) {
    Vec s = block(j0);
    // The block count's trailing one bits are the complete levels below this block: fold them in.
    for (uint64_t c = ++blocks; (c & 1) == 0; c >>= 1) s = Vec::loadu(pending + --depth * kVec) + s;
    s.store(pending + depth++ * kVec);
  }
  Vec total(0.f);
  while (depth > 0) total = Vec::loadu(pending + --depth * kVec) + total;
  return at::vec::vec_reduce_all<float>(std::plus<Vec>(), total);
}

// sum_j (s[j] - mean)^2 over the row s (n,) in fp32.
inline float centered_sumsq(const float* s, float mean, int64_t n) {
  const Vec vmean(mean);
  const int64_t n_vec = n - n % kStep;
  float sumsq = blocked_sum(n_vec, [&](int64_t j, Vec& a, Vec& b) {
    const Vec d0 = Vec::loadu(s + j) - vmean, d1 = Vec::loadu(s + j + kVec) - vmean;
    a = at::vec::fmadd(d0, d0, a);
    b = at::vec::fmadd(d1, d1, b);
  });
  for (int64_t j = n_vec; j < n; ++j) sumsq += (s[j] - mean) * (s[j] - mean);
  return sumsq;
}

// Whether the fp32 sum of squares m2 of a row of n can be trusted: finite (it overflows from |s - mean| ~ 1e19 at
// N = 768, and is NaN when the mean overflowed), and not so small that squares in the subnormal range
// (below 2^-126, |s - mean| below ~1e-19) lose digits that var + eps would show. Each such square is off by
// at most 2^-150, so past n * 2^-100 the loss is below 2^-50 relative. NaN compares false: not trusted.
inline bool plain_moments_ok(float m2, int64_t n, float eps) {
  const float nf = static_cast<float>(n);
  return m2 <= std::numeric_limits<float>::max() && m2 + nf * eps >= nf * 0x1p-100f;
}

// The power of two 2^k (as k) that brings a row of max-abs amax to [1, 4): its values times 2^-k square and
// sum in fp32 without overflow or underflow. k is clamped to [-126, 126] so that 2^k and 2^-k are both normal
// floats; a subnormal amax then lands in [2^-23, 1), still far from underflow once squared. Scaling by a power
// of two is exact (but for elements below 2^-126 of the row's max, which do not matter against it).
inline int row_scale_exponent(float amax) {
  int e = 0;
  std::frexp(amax, &e);  // amax = f * 2^e, f in [0.5, 1); inf / NaN give an unspecified e: any clamped k is fine
  return std::min(126, std::max(-126, e - 1));
}

// Forward of one row: s = x + r (r may be null), y = (s - mean) * rstd * w + b (w, b fp32 or null); s is also
// written to sum_out in T when it is not null (prenorm). `scratch` (N,) holds s in fp32 unless the row can be
// read in place (fp32, no residual).
// The moments are taken in fp32 from s; when they overflow or underflow (plain_moments_ok), they are taken
// again from s * 2^-k with 2^k about the row's max-abs, and y comes from the scaled row:
// rstd = 2^-k / sqrt(var(s * 2^-k) + eps * 2^-2k). A row holding inf or NaN stays NaN on either path, as in torch.
template <typename T>
void forward_row(const T* x, const T* r, const float* w, const float* b, T* y, T* sum_out, float* scratch,
                 int64_t n, float eps, bool stream, bool stream_sum, float& mean_out, float& rstd_out) {
  constexpr bool fp32 = std::is_same_v<T, float>;
  const bool in_place = fp32 && r == nullptr;
  const float* s = in_place ? reinterpret_cast<const float*>(x) : scratch;
  const int64_t n_vec = n - n % kStep;

  float sum = blocked_sum(n_vec, [&](int64_t j, Vec& acc0, Vec& acc1) {
    Vec a, c;
    load_sum2(x + j, r ? r + j : nullptr, a, c);
    if (!in_place) {
      a.store(scratch + j);
      c.store(scratch + j + kVec);
    }
    if (sum_out) store2(sum_out + j, a, c, stream_sum);
    acc0 = acc0 + a;
    acc1 = acc1 + c;
  });
  for (int64_t j = n_vec; j < n; ++j) {
    const float v = static_cast<float>(x[j]) + (r ? static_cast<float>(r[j]) : 0.f);
    if (!in_place) scratch[j] = v;
    if (sum_out) sum_out[j] = static_cast<T>(v);
    sum += v;
  }
  float mean = sum / n;
  float m2 = centered_sumsq(s, mean, n);
  float rstd = 1.f / std::sqrt(m2 / n + eps);
  mean_out = mean;
  rstd_out = rstd;

  if (!plain_moments_ok(m2, n, eps)) {
    Vec vmax(0.f);
    for (int64_t j = 0; j + kVec <= n; j += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(s + j).abs());
    float amax = at::vec::vec_reduce_all<float>([](const Vec& p, const Vec& q) { return at::vec::maximum(p, q); },
                                                vmax);
    for (int64_t j = n - n % kVec; j < n; ++j) amax = std::max(amax, std::abs(s[j]));
    const int k = row_scale_exponent(amax);
    const float up = std::ldexp(1.f, k), down = std::ldexp(1.f, -k);
    // scratch holds s unless in place; either way it now receives s * 2^-k.
    const Vec vdown(down);
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) (Vec::loadu(s + j) * vdown).store(scratch + j);
    for (; j < n; ++j) scratch[j] = s[j] * down;
    s = scratch;
    const float sum_t = blocked_sum(n_vec, [&](int64_t i, Vec& acc0, Vec& acc1) {
      acc0 = acc0 + Vec::loadu(s + i);
      acc1 = acc1 + Vec::loadu(s + i + kVec);
    });
    float total = sum_t;
    for (int64_t i = n_vec; i < n; ++i) total += s[i];
    mean = total / n;
    m2 = centered_sumsq(s, mean, n);
    // eps * 2^-2k as (eps * down) * down: with eps = 0 it stays 0 (never 0 * inf).
    rstd = 1.f / std::sqrt(m2 / n + eps * down * down);
    // The statistics of s itself, for the backward: exact rescalings, normal while 2^-k / std(s) is.
    mean_out = mean * up;
    rstd_out = rstd * down;
  }

  const Vec vmean(mean), vrstd(rstd);
  auto affine = [&](int64_t k) {
    const Vec v = (Vec::loadu(s + k) - vmean) * vrstd;
    if (w && b) return at::vec::fmadd(v, Vec::loadu(w + k), Vec::loadu(b + k));
    if (w) return v * Vec::loadu(w + k);
    return b ? v + Vec::loadu(b + k) : v;
  };
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) store2(y + j, affine(j), affine(j + kVec), stream);
  for (; j < n; ++j) {
    float v = (s[j] - mean) * rstd;
    if (w) v *= w[j];
    if (b) v += b[j];
    y[j] = static_cast<T>(v);
  }
}

// The backward of LayerNorm, row by row: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w and
// xhat = (x + r - mean) * rstd, plus ds (the gradient of the prenorm sum x + r; r and ds may be null).
// Pass 1 (backward_sums) reads one row from memory, keeps g (and a non-fp32 dy, widened) in fp32 scratch and
// takes both means. Pass 2 (backward_apply) runs from cache for kPairRows rows at once: it recomputes xhat from
// x and r, which costs less than storing it and reading it back, writes dx and adds dy * xhat into dw_acc and
// dy into db_acc, one read-modify-write of the accumulators for all its rows (in row order, as one row at a
// time would add them). g is kept rather than recomputed: a recomputed dy * w could be fused into an FMA with
// the subtraction of mean(g), and then g - mean(g) would not be exactly 0 where it should be (N = 1). An fp32
// dy is read in place.
template <typename T>
struct BackwardRow {
  const T* dy;
  const T* x;
  const T* r;   // or null
  const T* ds;  // or null
  T* dx;
  float mean, rstd;
  float* g;     // (N,) scratch
  float* dy32;  // (N,) scratch for a non-fp32 dy
  float mean_g = 0.f, mean_gx = 0.f;

  const float* dy_fp32() const {
    if constexpr (std::is_same_v<T, float>) return dy;
    return dy32;
  }
  float xhat_at(int64_t j) const {
    return (static_cast<float>(x[j]) + (r ? static_cast<float>(r[j]) : 0.f) - mean) * rstd;
  }
};

constexpr int kPairRows = 2;

template <typename T>
void backward_sums(BackwardRow<T>& row, const float* w, int64_t n) {
  constexpr bool fp32 = std::is_same_v<T, float>;
  const Vec vmean(row.mean), vrstd(row.rstd);
  Vec sum_g(0.f), sum_gx(0.f);
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec a, c;
    load_sum2(row.x + j, row.r ? row.r + j : nullptr, a, c);
    const Vec xh0 = (a - vmean) * vrstd, xh1 = (c - vmean) * vrstd;
    Vec g0, g1;
    load2(row.dy + j, g0, g1);
    if (!fp32) {
      g0.store(row.dy32 + j);
      g1.store(row.dy32 + j + kVec);
    }
    if (w) {
      g0 = g0 * Vec::loadu(w + j);
      g1 = g1 * Vec::loadu(w + j + kVec);
    }
    g0.store(row.g + j);
    g1.store(row.g + j + kVec);
    sum_g = sum_g + g0 + g1;
    sum_gx = at::vec::fmadd(g0, xh0, at::vec::fmadd(g1, xh1, sum_gx));
  }
  float sg = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum_g);
  float sgx = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum_gx);
  for (; j < n; ++j) {
    const float dyv = static_cast<float>(row.dy[j]);
    if (!fp32) row.dy32[j] = dyv;
    row.g[j] = w ? dyv * w[j] : dyv;
    sg += row.g[j];
    sgx += row.g[j] * row.xhat_at(j);
  }
  row.mean_g = sg / n;
  row.mean_gx = sgx / n;
}

// Pass 2 for rows[0, count), count <= kPairRows; dw_acc and db_acc are (N,) or null.
template <typename T>
void backward_apply(const BackwardRow<T>* rows, int count, float* dw_acc, float* db_acc, int64_t n, bool stream) {
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec dw[2], db[2];
    if (dw_acc) dw[0] = Vec::loadu(dw_acc + j), dw[1] = Vec::loadu(dw_acc + j + kVec);
    if (db_acc) db[0] = Vec::loadu(db_acc + j), db[1] = Vec::loadu(db_acc + j + kVec);
    for (int q = 0; q < count; ++q) {
      const BackwardRow<T>& row = rows[q];
      const Vec vmean(row.mean), vrstd(row.rstd), vmean_g(row.mean_g), vmean_gx(row.mean_gx);
      Vec xh[2], out[2], ds_v[2];
      load_sum2(row.x + j, row.r ? row.r + j : nullptr, xh[0], xh[1]);
      if (row.ds) load2(row.ds + j, ds_v[0], ds_v[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t k = j + h * kVec;
        xh[h] = (xh[h] - vmean) * vrstd;
        const Vec dyv = Vec::loadu(row.dy_fp32() + k);
        out[h] = vrstd * (Vec::loadu(row.g + k) - vmean_g - xh[h] * vmean_gx);
        if (row.ds) out[h] = out[h] + ds_v[h];
        if (dw_acc) dw[h] = at::vec::fmadd(dyv, xh[h], dw[h]);
        if (db_acc) db[h] = db[h] + dyv;
      }
      store2(row.dx + j, out[0], out[1], stream);
    }
    if (dw_acc) dw[0].store(dw_acc + j), dw[1].store(dw_acc + j + kVec);
    if (db_acc) db[0].store(db_acc + j), db[1].store(db_acc + j + kVec);
  }
  for (; j < n; ++j) {
    for (int q = 0; q < count; ++q) {
      const BackwardRow<T>& row = rows[q];
      const float xh = row.xhat_at(j), dyv = row.dy_fp32()[j];
      row.dx[j] = static_cast<T>(row.rstd * (row.g[j] - row.mean_g - xh * row.mean_gx) +
                                 (row.ds ? static_cast<float>(row.ds[j]) : 0.f));
      if (dw_acc) dw_acc[j] += dyv * xh;
      if (db_acc) db_acc[j] += dyv;
    }
  }
}

// Elements per parallel task, torch's at::internal::GRAIN_SIZE.
constexpr int64_t kParallelGrain = 32768;

template <typename T>
void forward(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight, const at::Tensor* bias,
             double eps, at::Tensor& y, at::Tensor* sum, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t M = x.size(0), N = x.size(1);
  const T* x_ptr = x.const_data_ptr<T>();                               // (M, N), row stride x.stride(0)
  const T* r_ptr = residual ? residual->const_data_ptr<T>() : nullptr;  // (M, N) or null
  const int64_t x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  T* y_ptr = y.data_ptr<T>();                                           // (M, N) contiguous
  T* sum_ptr = sum ? sum->data_ptr<T>() : nullptr;                      // (M, N) contiguous or null
  float* mean_ptr = mean.data_ptr<float>();                             // (M,)
  float* rstd_ptr = rstd.data_ptr<float>();                             // (M,)
  const std::vector<float> w32 = to_fp32(weight ? weight->const_data_ptr<T>() : nullptr, N);  // (N,) or empty
  const std::vector<float> b32 = to_fp32(bias ? bias->const_data_ptr<T>() : nullptr, N);      // (N,) or empty
  const bool stream = use_streaming_stores(y_ptr, M, N);
  const bool stream_sum = sum_ptr && use_streaming_stores(sum_ptr, M, N);

  // At least kParallelGrain elements per task: below that, waking the second thread costs more than the rows
  // (64 x 384 took 22 us on two threads against 9 us inline), as torch's own kernels find with the same grain.
  at::parallel_for(0, M, std::max<int64_t>(1, kParallelGrain / N), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(N);
    for (int64_t i = begin; i < end; ++i) {
      forward_row<T>(x_ptr + i * x_stride, r_ptr ? r_ptr + i * r_stride : nullptr,
                     weight ? w32.data() : nullptr, bias ? b32.data() : nullptr, y_ptr + i * N,
                     sum_ptr ? sum_ptr + i * N : nullptr, scratch.data(), N, static_cast<float>(eps), stream,
                     stream_sum, mean_ptr[i], rstd_ptr[i]);
    }
    fence_streaming_stores(stream || stream_sum);
  });
}

template <typename T>
void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight,
              const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, const at::Tensor* dsum, at::Tensor& dx,
              at::Tensor& dweight, at::Tensor& dbias) {
  const int64_t M = x.size(0), N = x.size(1);
  const T* dy_ptr = dy.const_data_ptr<T>();                             // (M, N), row stride dy.stride(0)
  const T* x_ptr = x.const_data_ptr<T>();                               // (M, N), row stride x.stride(0)
  const T* r_ptr = residual ? residual->const_data_ptr<T>() : nullptr;  // (M, N) or null
  const T* ds_ptr = dsum ? dsum->const_data_ptr<T>() : nullptr;         // (M, N), row stride ds_stride, or null
  const int64_t ds_stride = dsum ? dsum->stride(0) : 0;
  const float* mean_ptr = mean.const_data_ptr<float>();                 // (M,)
  const float* rstd_ptr = rstd.const_data_ptr<float>();                 // (M,)
  const int64_t dy_stride = dy.stride(0), x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  T* dx_ptr = dx.data_ptr<T>();                                         // (M, N) contiguous
  const std::vector<float> w32 = to_fp32(weight ? weight->const_data_ptr<T>() : nullptr, N);  // (N,) or empty
  const bool want_dw = weight != nullptr;
  const bool stream = use_streaming_stores(dx_ptr, M, N);

  // Fixed chunks of rows, not per-thread buffers, so dweight/dbias do not depend on the thread schedule.
  // A small input is one chunk, run inline (see kParallelGrain); a large one 4 per thread, for balance.
  const int64_t n_chunks =
      std::max<int64_t>(1, std::min({M * N / kParallelGrain, M, int64_t{4} * at::get_num_threads()}));
  const int64_t rows_per_chunk = (M + n_chunks - 1) / n_chunks;
  std::vector<float> dw_part(want_dw ? n_chunks * N : 0, 0.f);   // (n_chunks, N)
  std::vector<float> db_part(has_bias ? n_chunks * N : 0, 0.f);  // (n_chunks, N)

  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> scratch(2 * kPairRows * N);  // g and dy32 of each row in flight
    BackwardRow<T> rows[kPairRows];
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t row_end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < row_end; i += kPairRows) {
        const int count = static_cast<int>(std::min<int64_t>(kPairRows, row_end - i));
        for (int q = 0; q < count; ++q) {
          const int64_t row = i + q;
          rows[q] = {dy_ptr + row * dy_stride,  x_ptr + row * x_stride,
                     r_ptr ? r_ptr + row * r_stride : nullptr, ds_ptr ? ds_ptr + row * ds_stride : nullptr,
                     dx_ptr + row * N,          mean_ptr[row],
                     rstd_ptr[row],             scratch.data() + 2 * q * N,
                     scratch.data() + (2 * q + 1) * N};
          backward_sums(rows[q], want_dw ? w32.data() : nullptr, N);
        }
        backward_apply(rows, count, want_dw ? dw_part.data() + c * N : nullptr,
                       has_bias ? db_part.data() + c * N : nullptr, N, stream);
      }
    }
    fence_streaming_stores(stream);
  });

  // Second stage: sum the per-chunk partials column by column, in chunk order.
  auto reduce_partials = [&](const std::vector<float>& part, at::Tensor& out) {
    T* out_ptr = out.data_ptr<T>();  // (N,)
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        float total = 0.f;
        for (int64_t c = 0; c < n_chunks; ++c) total += part[c * N + j];
        out_ptr[j] = static_cast<T>(total);
      }
    });
  };
  if (want_dw) reduce_partials(dw_part, dweight);
  if (has_bias) reduce_partials(db_part, dbias);
}

const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool prenorm) {
  check_layer_norm_fwd_args(x, residual, weight, bias, at::kCPU, prenorm);
  check_layer_norm_eps(eps);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor sum = prenorm ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd, sum};
  CTXKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    forward<scalar_t>(x, opt_ptr(residual), opt_ptr(weight), opt_ptr(bias), eps, y, prenorm ? &sum : nullptr,
                      mean, rstd);
  });
  return {y, mean, rstd, sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias,
                                                                   const std::optional<at::Tensor>& dsum) {
  check_layer_norm_bwd_args(dy, x, residual, weight, mean, rstd, dsum, at::kCPU);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  // The partials' reduction writes every element; a sum over no rows is zeros.
  const auto make = [&](const at::TensorOptions& options) {
    return M == 0 ? at::zeros({N}, options) : at::empty({N}, options);
  };
  at::Tensor dweight = weight ? make(weight->options()) : at::empty({0}, x.options());
  at::Tensor dbias = has_bias ? make(x.options()) : at::empty({0}, x.options());
  if (M == 0) return {dx, dweight, dbias};
  CTXKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    backward<scalar_t>(dy, x, opt_ptr(residual), opt_ptr(weight), mean, rstd, has_bias, opt_ptr(dsum), dx, dweight,
                       dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace ctxkern
