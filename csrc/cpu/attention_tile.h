// Tile helpers of the CPU attention kernels (csrc/cpu/attention.cpp): the tile matrix product, fp32 staging of
// fp16/bf16 rows, and the vectorized row operations of the online softmax. Everything here works on one
// thread's tiles; the parallel split lives in attention.cpp. In an anonymous namespace for the reason
// vec_helpers.h gives.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "vec_helpers.h"

// Fortran BLAS sgemm. torch's x86 wheels link MKL into libtorch_cpu and export it (ATen's own cpublas::gemm
// wrapper is not exported). Weak, so that a torch without it still loads this library and uses the loop below.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace ctxkern {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// C (m, n) = alpha * op(A) op(B) + beta * C, all row-major with leading dims lda/ldb/ldc; op(A) is (m, k) and
// op(B) (k, n), each stored transposed when its flag says so. beta = 0 ignores C's old contents (even NaN).
inline void matmul(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                   int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // BLAS wants leading dims that cover a row; rows of a broadcast view (stride 0) take the plain loop below.
  const bool lds_valid = lda >= std::max<int64_t>(1, trans_a ? m : k) && ldb >= std::max<int64_t>(1, trans_b ? k : n);
  if (sgemm_ != nullptr && lds_valid) {
    // BLAS is column-major: a row-major C is the column-major C^T = op(B)^T op(A)^T, hence the swapped operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m_ = static_cast<int>(n), n_ = static_cast<int>(m), k_ = static_cast<int>(k);
    const int lda_ = static_cast<int>(ldb), ldb_ = static_cast<int>(lda), ldc_ = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, b, &lda_, a, &ldb_, &beta, c, &ldc_);
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.f;
      for (int64_t l = 0; l < k; ++l) {
        sum += (trans_a ? a[l * lda + i] : a[i * lda + l]) * (trans_b ? b[j * ldb + l] : b[l * ldb + j]);
      }
      c[i * ldc + j] = alpha * sum + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
    }
  }
}

// A block of fp32 rows: rows[r * ld + d].
struct Rows {
  const float* data;
  int64_t ld;
};

// dst[0, n) = src[0, n) widened to fp32.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, float>) {
    using VecT = at::vec::Vectorized<T>;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + j));
      lo.store(dst + j);
      hi.store(dst + j + kVec);
    }
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// `count` rows of `d` elements (row stride ld) as fp32 rows: fp32 input is used in place, fp16/bf16 is
// widened into `staging` (count, d).
template <typename T>
inline Rows stage_rows(const T* src, int64_t ld, int64_t count, int64_t d, float* staging) {
  if constexpr (std::is_same_v<T, float>) {
    return {src, ld};
  } else {
    for (int64_t r = 0; r < count; ++r) widen(src + r * ld, staging + r * d, d);
    return {staging, d};
  }
}

// dst[0, n) = src[0, n) * mul, rounded to T.
template <typename T>
inline void store_scaled(const float* src, float mul, T* dst, int64_t n) {
  const Vec vmul(mul);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kVec <= n; j += kVec) (Vec::loadu(src + j) * vmul).store(dst + j);
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      at::vec::convert_from_float<T>(Vec::loadu(src + j) * vmul, Vec::loadu(src + j + kVec) * vmul).store(dst + j);
    }
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j] * mul);
}

// The row's largest element. clamp_min is the plain max instruction (maximum adds two more to propagate NaN):
// a NaN score here may give a smaller max, but that row's sum, and so its output, is NaN either way.
inline float row_max(const float* x, int64_t n) {
  Vec acc(kNegInf);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc = at::vec::clamp_min(Vec::loadu(x + j), acc);
  float result = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

// x[0, n) = exp(x - shift); returns their sum when kSum. exp_u20 (about 1e-6 relative) is the
// fast exponential torch's own CPU flash attention uses; it returns 0 for -inf, so masked scores vanish.
template <bool kSum>
inline float exp_shifted(float* x, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const Vec e = (Vec::loadu(x + j) - vshift).exp_u20();
    e.store(x + j);
    if constexpr (kSum) acc = acc + e;
  }
  float sum = kSum ? at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc) : 0.f;
  if (j < n) {
    (Vec::loadu(x + j, n - j) - vshift).exp_u20().store(x + j, n - j);
    for (; kSum && j < n; ++j) sum += x[j];
  }
  return sum;
}

// The online softmax's last step for m rows, a vector of rows at a time (a scalar logf per row cost about 5% of
// the forward at S 128): lse[r] = max[r] + log(sum[r]), or +inf where sum[r] is 0 (the row saw no key), and
// sum[r] becomes 1 / sum[r]. A NaN sum gives a NaN lse and factor.
inline void finish_rows(const float* max, float* sum, int64_t m, float* lse) {
  const Vec zero(0.f), inf(std::numeric_limits<float>::infinity()), one(1.f);
  for (int64_t r = 0; r < m; r += kVec) {
    const int count = static_cast<int>(std::min<int64_t>(kVec, m - r));
    const Vec s = Vec::loadu(sum + r, count), mx = Vec::loadu(max + r, count);
    Vec::blendv(mx + s.log(), inf, s == zero).store(lse + r, count);
    (one / s).store(sum + r, count);
  }
}

inline void scale_row(float* x, int64_t n, float mul) {
  const Vec vmul(mul);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(x + j) * vmul).store(x + j);
  for (; j < n; ++j) x[j] *= mul;
}

// x[j] = -inf where bias[j] is -inf (the key padding mask, 0 or -inf), for j in [0, n). A select, not an add:
// a padding key's score may be NaN (a NaN in its k), and NaN + -inf is NaN.
inline void mask_row(float* x, const float* bias, int64_t n) {
  const Vec vneg(kNegInf);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const Vec b = Vec::loadu(bias + j);
    Vec::blendv(Vec::loadu(x + j), vneg, b == vneg).store(x + j);
  }
  for (; j < n; ++j) x[j] = bias[j] == kNegInf ? kNegInf : x[j];
}

// `count` fp32 rows of `d` elements whose padding rows (bias -inf) are safe to multiply by their probability 0:
// `rows` itself when they are finite (the common case, no copy), else a copy in `staging` (count, d) with them
// zeroed, since 0 * NaN or 0 * inf is NaN. Rows already staged there are zeroed in place.
inline Rows zero_nonfinite_padding(Rows rows, int64_t count, int64_t d, const float* bias, float* staging) {
  const bool staged = rows.data == staging;
  if (!staged) {
    Vec acc(0.f);  // x - x is 0 for a finite x, NaN otherwise
    float tail = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      if (bias[j] != kNegInf) continue;
      const float* x = rows.data + j * rows.ld;
      int64_t e = 0;
      for (; e + kVec <= d; e += kVec) acc = acc + (Vec::loadu(x + e) - Vec::loadu(x + e));
      for (; e < d; ++e) tail += x[e] - x[e];
    }
    if (!std::isnan(at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc) + tail)) return rows;
  }
  for (int64_t j = 0; j < count; ++j) {
    float* dst = staging + j * d;
    if (bias[j] == kNegInf) {
      std::fill(dst, dst + d, 0.f);
    } else if (!staged) {
      std::copy(rows.data + j * rows.ld, rows.data + j * rows.ld + d, dst);
    }
  }
  return {staging, d};
}

// Rows that the next tile will read (or the epilogue write), fetched into L2 a few at a time while this tile's
// softmax runs. The L2 holds a whole batch's (B, S, H, D) rows only when it is small (at S 128, B 1 took 12% less
// time per sequence than B 8); prefetching the next head's rows took back 1-3% of the forward at B 8.
struct RowPrefetch {
  const char* base = nullptr;
  int64_t ld = 0, rows = 0, bytes = 0;  // row stride and row size in bytes
  bool write = false;

  template <typename T>
  static RowPrefetch of(const T* data, int64_t ld, int64_t rows, int64_t d, bool write = false) {
    return {reinterpret_cast<const char*>(data), ld * static_cast<int64_t>(sizeof(T)), rows,
            d * static_cast<int64_t>(sizeof(T)), write};
  }

  // Step `step` of `steps`: this step's share of the rows.
  void issue(int64_t step, int64_t steps) const {
    if (base == nullptr) return;
    const int64_t end = std::min(rows, (step + 1) * rows / steps);
    for (int64_t r = step * rows / steps; r < end; ++r) {
      const char* row = base + r * ld;
      for (int64_t off = 0; off < bytes; off += 64) {
        if (write) {
          __builtin_prefetch(row + off, 1, 2);
        } else {
          __builtin_prefetch(row + off, 0, 2);
        }
      }
    }
  }
};

// dp[0, n) = p * (dp - delta): the softmax backward of one row, delta = rowsum(dO * O).
inline void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  const Vec vdelta(delta);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(p + j) * (Vec::loadu(dp + j) - vdelta)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

}  // namespace
}  // namespace ctxkern
