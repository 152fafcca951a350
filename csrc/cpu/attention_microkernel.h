// A register-blocked fp32 matrix product for the attention's tiles (csrc/cpu/attention.cpp): C (m, n) =
// alpha * op(A) B + beta * C with B row-major, op(A) = A or A^T. A is read in place, B in place when row-major
// (V, dO, K, Q); a B^T (K^T, V^T) is packed once per key chunk by the caller with pack_transposed. The kernels
// use it from 64 keys on, and everywhere when torch exports no sgemm_ (attention.cpp's use_microkernel says
// what was measured: two threads on a quiet machine, 1.02-1.28x MKL's speed from 128 keys on, 0.82-0.94x at 32).
//
// The register block is kMR rows by kNV vectors: 6 x 64 floats on AVX-512 (24 of the 32 zmm registers
// accumulate), 6 x 16 on AVX2 (12 of 16 ymm), 6 x 2 vectors in the portable build. Each step of the reduction
// loads kNV vectors of a B row and broadcasts kMR elements of A into them. Compiled once per instruction set
// (setup.py), in an anonymous namespace for the reason vec_helpers.h gives.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "vec_helpers.h"

namespace ctxkern {
namespace {

constexpr int kMR = 6;
constexpr int kNV = kVec >= 16 ? 4 : 2;

// One register block: C rows [0, MR) x vectors [0, NV), the last vector `last` floats wide when kPartial.
template <bool kTransA, int MR, int NV, bool kPartial>
inline void micro_tile(int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc, int64_t last) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec(0.f);
  }
  for (int64_t l = 0; l < k; ++l) {
    const float* brow = b + l * ldb;
    Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = kPartial && v == NV - 1 ? Vec::loadu(brow + v * kVec, last) : Vec::loadu(brow + v * kVec);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec ai(kTransA ? a[l * lda + i] : a[i * lda + l]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(ai, bv[v], acc[i][v]);
    }
  }
  const Vec valpha(alpha), vbeta(beta);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* crow = c + i * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const bool partial = kPartial && v == NV - 1;
      Vec r = acc[i][v] * valpha;
      if (beta != 0.f) {  // beta = 0 ignores C's old contents, even NaN, as BLAS does
        r = at::vec::fmadd(vbeta, partial ? Vec::loadu(crow + v * kVec, last) : Vec::loadu(crow + v * kVec), r);
      }
      if (partial) {
        r.store(crow + v * kVec, last);
      } else {
        r.store(crow + v * kVec);
      }
    }
  }
}

// The register block for `mr` rows (<= kMR) and `nv` vectors (<= kNV, the last one `last` floats wide, or
// whole when last == 0).
template <bool kTransA, int MR>
inline void micro_tile_cols(int nv, int64_t last, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float beta, float* c, int64_t ldc) {
#define CTXKERN_MICRO_CASE(NV)                                                                           \
  case NV:                                                                                               \
    if constexpr (NV <= kNV) {                                                                           \
      if (last) {                                                                                        \
        micro_tile<kTransA, MR, NV, true>(k, alpha, a, lda, b, ldb, beta, c, ldc, last);                 \
      } else {                                                                                           \
        micro_tile<kTransA, MR, NV, false>(k, alpha, a, lda, b, ldb, beta, c, ldc, last);                \
      }                                                                                                  \
    }                                                                                                    \
    return;
  switch (nv) {
    CTXKERN_MICRO_CASE(1)
    CTXKERN_MICRO_CASE(2)
    CTXKERN_MICRO_CASE(3)
    CTXKERN_MICRO_CASE(4)
  }
#undef CTXKERN_MICRO_CASE
}

template <bool kTransA>
inline void micro_tile_rows(int mr, int nv, int64_t last, int64_t k, float alpha, const float* a, int64_t lda,
                            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  switch (mr) {
    case 6: return micro_tile_cols<kTransA, 6>(nv, last, k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 5: return micro_tile_cols<kTransA, 5>(nv, last, k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 4: return micro_tile_cols<kTransA, 4>(nv, last, k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 3: return micro_tile_cols<kTransA, 3>(nv, last, k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 2: return micro_tile_cols<kTransA, 2>(nv, last, k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 1: return micro_tile_cols<kTransA, 1>(nv, last, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}
static_assert(kMR == 6, "micro_tile_rows dispatches 1..6 rows");

// C (m, n) = alpha * op(A) B + beta * C, row-major: op(A) (m, k) is a[i * lda + l], or a[l * lda + i] when
// trans_a; B (k, n) is b[l * ldb + j]. Column panels outside, so a panel of B (k x kNV vectors) stays in L1
// while the rows of A pass over it.
inline void micro_gemm(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                       const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int64_t panel = kNV * kVec;
  for (int64_t j0 = 0; j0 < n; j0 += panel) {
    const int64_t width = std::min(panel, n - j0);
    const int nv = static_cast<int>((width + kVec - 1) / kVec);
    const int64_t last = width % kVec;
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, m - i0));
      const float* a0 = trans_a ? a + i0 : a + i0 * lda;
      if (trans_a) {
        micro_tile_rows<true>(mr, nv, last, k, alpha, a0, lda, b + j0, ldb, beta, c + i0 * ldc + j0, ldc);
      } else {
        micro_tile_rows<false>(mr, nv, last, k, alpha, a0, lda, b + j0, ldb, beta, c + i0 * ldc + j0, ldc);
      }
    }
  }
}

// dst (d, n) = src^T for src (n, d) with row stride ld, dst's rows `ldd` apart: the B^T operand of Q K^T and
// dO V^T laid out as micro_gemm's row-major B. ATen's in-register transposes (16 x 16 blocks on AVX-512, 8 x 8
// on AVX2).
inline void pack_transposed(const float* src, int64_t ld, int64_t n, int64_t d, float* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  at::vec::transpose_mxn<float>(src, ld, dst, ldd, static_cast<int>(n), static_cast<int>(d));
#else
  int64_t j0 = 0;
#if defined(CPU_CAPABILITY_AVX2)
  for (; j0 + 8 <= n; j0 += 8) {
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) at::vec::transpose_mxn<float, 8, 8>(src + j0 * ld + e, ld, dst + e * ldd + j0, ldd);
    for (; e < d; ++e) {
      for (int64_t j = j0; j < j0 + 8; ++j) dst[e * ldd + j] = src[j * ld + e];
    }
  }
#endif
  for (int64_t e = 0; e < d; ++e) {
    for (int64_t j = j0; j < n; ++j) dst[e * ldd + j] = src[j * ld + e];
  }
#endif
}

}  // namespace
}  // namespace ctxkern
