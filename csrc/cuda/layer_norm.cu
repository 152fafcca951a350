// LayerNorm forward and backward over the last dim of an (M, N) matrix, with an optional residual added
// first (s = x + residual), fp32 statistics and fp32 arithmetic for every storage dtype.
//
// Three shapes of kernel, chosen by N on the host:
//   warp  (N <= 1024):          one warp per row, the row in registers, shuffle-only reductions;
//   block (N <= 16384 / 8192):  one block per row, the row in registers, block reductions;
//   stream (larger N):          one block per row, the row re-read from global memory (L2) per pass,
//                               because it no longer fits in registers.
// Each comes as a 16-byte vector path (VEC = 16 / sizeof(T)) and a scalar path (VEC = 1); the launcher picks
// the vector one when N, every row stride and every pointer allow 16-byte accesses.
// The backward writes dweight / dbias as per-block fp32 partials (a (2, blocks, N) workspace) that a
// second kernel reduces in a fixed order: deterministic, and no atomics on any dtype.
#include "layer_norm.h"

#include "common.cuh"

namespace ctxkern {
namespace cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;  // warp kernels: 4 independent rows per 128-thread block
constexpr int kWarpThreads = kWarpRowsPerBlock * kWarpSize;
constexpr int kWarpMaxN = 1024;       // 32 fp32 values of the row per lane
constexpr int kRowThreads = 512;      // block and stream kernels
constexpr int kFwdRowMaxN = 16384;    // block forward: <= 32 row values per thread
constexpr int kBwdRowMaxN = 8192;     // block backward: <= 16 per thread, it also keeps w*dy and two partials
constexpr int kFinalCols = 32;        // finalize: a warp's worth of columns per block ...
constexpr int kFinalRows = 16;        // ... and 16 threads splitting the partial rows of each column
constexpr int kMaxThreadsPerSm = 2048;  // sm_80 and sm_90; bounds the persistent backward grid
constexpr int64_t kMaxGrid = 0x7fffffff;

// ---------------------------------------------------------------------------------------------------------
// Row helpers shared by the kernels. A "team" is the set of threads that owns one row: a warp or a block.

// s = x + residual for the VEC columns starting at col.
template <typename T, int VEC>
__device__ __forceinline__ void load_row_sum(const T* __restrict__ x_row, const T* __restrict__ res_row,
                                             int64_t col, float (&s)[VEC]) {
  load_float<T, VEC>(x_row + col, s);
  if (res_row != nullptr) {
    float r[VEC];
    load_float<T, VEC>(res_row + col, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] += r[j];
  }
}

// p[col..col+VEC) as floats, or fill everywhere when the optional parameter p is absent.
template <typename T, int VEC>
__device__ __forceinline__ void load_or_fill(const T* __restrict__ p, int64_t col, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    load_float<T, VEC>(p + col, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  }
}

// Max over the 32 lanes of a warp; all lanes must call it, and all get the same bits (max is exact).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max over a block of THREADS threads, with block_sum's contract (scratch: THREADS / 32 floats, reusable
// back to back).
template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  constexpr int kWarps = THREADS / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = fmaxf(total, scratch[w]);
  return total;
}

// Whether the fp32 sum of squares m2 of a row of n can be trusted: finite (it overflows from |s - mean| ~ 1e19
// at N = 768, and is NaN when the mean overflowed), and not so small that squares in the subnormal range
// (|s - mean| below ~1e-19) lose digits that var + eps would show: each is off by at most 2^-150, below 2^-50
// relative past n * 2^-100. NaN compares false: not trusted.
__device__ __forceinline__ bool plain_moments_ok(float m2, float n, float eps) {
  return m2 <= 3.40282347e38f && m2 + n * eps >= n * 0x1p-100f;
}

// The rescaling of a row whose plain moments are not trusted: s * down, with down = 2^-k and up = 2^k, 2^k
// about the row's max-abs amax, brings the row to [2^-23, 4), where its squares neither overflow nor
// underflow. k is clamped to [-126, 126] so that both are normal floats; scaling by a power of two is exact.
__device__ __forceinline__ void row_scale(float amax, float* up, float* down) {
  int k = ((__float_as_int(amax) >> 23) & 0xff) - 127;
  k = min(max(k, -126), 126);
  *up = __int_as_float((k + 127) << 23);
  *down = __int_as_float((127 - k) << 23);
}

// Thread t's part of a row's sum of (s - mean)^2, over its chunks inside the row (layer_norm_fwd_row's layout).
template <int VEC, int ITERS, int TEAM>
__device__ __forceinline__ float centered_squares(const float (&v)[ITERS][VEC], float mean, int N, int t) {
  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
    if ((c * TEAM + t) * VEC < N) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[c][j] - mean;
        sq += d * d;
      }
    }
  }
  return sq;
}

// One forward row by a team of TEAM threads, thread t of the team. Thread t owns chunks c = 0..ITERS-1, chunk c
// being the VEC columns from (c * TEAM + t) * VEC: consecutive threads touch consecutive VEC-wide pieces, so
// each chunk is one coalesced sweep of the team. The row stays in registers from the load to the output, so
// x and residual are read from global memory once; the variance is a second pass over those registers
// (sum of (s - mean)^2), which cannot cancel the way E[s^2] - mean^2 does. Columns >= N are masked per chunk:
// the launcher guarantees N % VEC == 0, so a chunk is entirely inside or entirely outside the row.
// When the fp32 moments overflow or underflow (plain_moments_ok), they are taken again from the registers scaled
// by row_scale, and y from the scaled row: rstd = 2^-k / sqrt(var(s * 2^-k) + eps * 2^-2k). A row holding inf or
// NaN stays NaN on either path, as in torch.
// team_sum / team_max must be called by every thread of the team and return the same bits to all of them.
template <typename T, int VEC, int ITERS, int TEAM, typename TeamSum, typename TeamMax>
__device__ __forceinline__ void layer_norm_fwd_row(const T* __restrict__ x_row,    // (N,)
                                                   const T* __restrict__ res_row,  // (N,) or nullptr
                                                   const T* __restrict__ weight,   // (N,) or nullptr
                                                   const T* __restrict__ bias,     // (N,) or nullptr
                                                   T* __restrict__ y_row,          // (N,)
                                                   T* __restrict__ sum_row,        // (N,) x + residual, or nullptr
                                                   float* __restrict__ mean_out,   // this row's mean
                                                   float* __restrict__ rstd_out,   // this row's rstd
                                                   int N, float eps, int t, TeamSum team_sum, TeamMax team_max) {
  float v[ITERS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
    const int col = (c * TEAM + t) * VEC;
    if (col < N) {
      load_row_sum<T, VEC>(x_row, res_row, col, v[c]);
      if (sum_row != nullptr) store_float<T, VEC>(sum_row + col, v[c]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[c][j];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[c][j] = 0.f;
    }
  }
  float mean = team_sum(sum) / static_cast<float>(N);

  const float m2 = team_sum(centered_squares<VEC, ITERS, TEAM>(v, mean, N, t));
  float rstd = rsqrtf(m2 / static_cast<float>(N) + eps);
  if (t == 0) {
    *mean_out = mean;
    *rstd_out = rstd;
  }

  if (!plain_moments_ok(m2, static_cast<float>(N), eps)) {  // uniform: m2 has the same bits in the whole team
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < ITERS; ++c) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, fabsf(v[c][j]));  // chunks past N hold 0
    }
    float up, down;
    row_scale(team_max(amax), &up, &down);
    float sum_t = 0.f;
#pragma unroll
    for (int c = 0; c < ITERS; ++c) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[c][j] *= down;
        sum_t += v[c][j];
      }
    }
    mean = team_sum(sum_t) / static_cast<float>(N);
    const float sq_t = centered_squares<VEC, ITERS, TEAM>(v, mean, N, t);
    // eps * 2^-2k as (eps * down) * down: with eps = 0 it stays 0 (never 0 * inf).
    rstd = rsqrtf(team_sum(sq_t) / static_cast<float>(N) + eps * down * down);
    // The statistics of s itself, for the backward: exact rescalings, normal while 2^-k / std(s) is.
    if (t == 0) {
      *mean_out = mean * up;
      *rstd_out = rstd * down;
    }
  }

#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
    const int col = (c * TEAM + t) * VEC;
    if (col < N) {
      float w[VEC], b[VEC], out[VEC];
      load_or_fill<T, VEC>(weight, col, 1.f, w);
      load_or_fill<T, VEC>(bias, col, 0.f, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (v[c][j] - mean) * rstd * w[j] + b[j];
      store_float<T, VEC>(y_row + col, out);
    }
  }
}

// One backward row by a team, with the same column ownership as layer_norm_fwd_row. Only xhat and g = w * dy
// stay in registers across the reduction; dy * xhat and dy are added into the caller's per-thread column
// accumulators, which persist over all the rows this thread's team handles.
template <typename T, int VEC, int ITERS, int TEAM, typename TeamSum2>
__device__ __forceinline__ void layer_norm_bwd_row(const T* __restrict__ dy_row,   // (N,)
                                                   const T* __restrict__ x_row,    // (N,)
                                                   const T* __restrict__ res_row,  // (N,) or nullptr
                                                   const T* __restrict__ weight,   // (N,) or nullptr
                                                   float mean, float rstd,
                                                   T* __restrict__ dx_row,         // (N,)
                                                   int N, int t,
                                                   float (&dw_acc)[ITERS][VEC],    // sum of dy * xhat, per column
                                                   float (&db_acc)[ITERS][VEC],    // sum of dy, per column
                                                   TeamSum2 team_sum2) {
  float xhat[ITERS][VEC];
  float g[ITERS][VEC];
  float sum_g = 0.f;
  float sum_gx = 0.f;
#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
    const int col = (c * TEAM + t) * VEC;
    if (col < N) {
      float s[VEC], d[VEC], w[VEC];
      load_row_sum<T, VEC>(x_row, res_row, col, s);
      load_float<T, VEC>(dy_row + col, d);
      load_or_fill<T, VEC>(weight, col, 1.f, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[c][j] = (s[j] - mean) * rstd;
        g[c][j] = w[j] * d[j];
        sum_g += g[c][j];
        sum_gx += g[c][j] * xhat[c][j];
        dw_acc[c][j] += d[j] * xhat[c][j];
        db_acc[c][j] += d[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[c][j] = 0.f;
        g[c][j] = 0.f;
      }
    }
  }
  const float2 sums = team_sum2(sum_g, sum_gx);
  const float mean_g = sums.x / static_cast<float>(N);
  const float mean_gx = sums.y / static_cast<float>(N);

#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
    const int col = (c * TEAM + t) * VEC;
    if (col < N) {
      float out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = rstd * (g[c][j] - mean_g - xhat[c][j] * mean_gx);
      store_float<T, VEC>(dx_row + col, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward kernels.

// Warp per row, N <= 1024. Warp w of block b owns rows b * 4 + w (+ a grid stride, used only past 2^31 blocks);
// lane l owns the columns of layer_norm_fwd_row. A row fits in a warp's registers (<= 32 values per lane),
// so the two reductions are shuffles only: no shared memory, no barriers, and rows never wait on each other.
// Four warps per block keep blocks small enough for many to be resident per SM.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpThreads)
    layer_norm_fwd_warp_kernel(const T* __restrict__ x,         // (M, N), row stride x_stride
                               int64_t x_stride,
                               const T* __restrict__ residual,  // (M, N), row stride residual_stride, or nullptr
                               int64_t residual_stride,
                               const T* __restrict__ weight,    // (N,) or nullptr
                               const T* __restrict__ bias,      // (N,) or nullptr
                               T* __restrict__ y,               // (M, N) contiguous
                               T* __restrict__ sum_out,         // (M, N) contiguous x + residual, or nullptr
                               float* __restrict__ mean,        // (M,)
                               float* __restrict__ rstd,        // (M,)
                               int64_t M, int N, float eps) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const auto team_sum = [](float v) { return warp_sum(v); };
  const auto team_max = [](float v) { return warp_max(v); };
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + warp; row < M;
       row += static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock) {
    layer_norm_fwd_row<T, VEC, ITERS, kWarpSize>(
        x + row * x_stride, residual != nullptr ? residual + row * residual_stride : nullptr, weight, bias,
        y + row * N, sum_out != nullptr ? sum_out + row * N : nullptr, mean + row, rstd + row, N, eps, lane,
        team_sum, team_max);
  }
}

// Block per row, 1024 < N <= 16384. Block b owns row b (+ a grid stride past 2^31 rows); thread t owns the
// columns of layer_norm_fwd_row with a team of 512, so the row is still read once and held in registers
// (<= 32 values per thread). A row is large enough to keep 512 threads busy, and block_sum's barriers are
// the only synchronisation.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_fwd_block_kernel(const T* __restrict__ x,         // (M, N), row stride x_stride
                                int64_t x_stride,
                                const T* __restrict__ residual,  // (M, N), row stride residual_stride, or nullptr
                                int64_t residual_stride,
                                const T* __restrict__ weight,    // (N,) or nullptr
                                const T* __restrict__ bias,      // (N,) or nullptr
                                T* __restrict__ y,               // (M, N) contiguous
                                T* __restrict__ sum_out,         // (M, N) contiguous x + residual, or nullptr
                                float* __restrict__ mean,        // (M,)
                                float* __restrict__ rstd,        // (M,)
                                int64_t M, int N, float eps) {
  __shared__ float scratch[kRowThreads / kWarpSize];
  const int t = static_cast<int>(threadIdx.x);
  const auto team_sum = [&](float v) { return block_sum<kRowThreads>(v, scratch); };
  const auto team_max = [&](float v) { return block_max<kRowThreads>(v, scratch); };
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    layer_norm_fwd_row<T, VEC, ITERS, kRowThreads>(
        x + row * x_stride, residual != nullptr ? residual + row * residual_stride : nullptr, weight, bias,
        y + row * N, sum_out != nullptr ? sum_out + row * N : nullptr, mean + row, rstd + row, N, eps, t,
        team_sum, team_max);
  }
}

// a[0] + ... + a[VEC - 1].
template <int VEC>
__device__ __forceinline__ float lane_total(const float (&a)[VEC]) {
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) total += a[j];
  return total;
}

// This thread's part of sum (s * scale - mu)^2 over a row re-read from global memory (the stream kernel's
// columns), one accumulator per vector lane.
template <typename T, int VEC>
__device__ __forceinline__ float stream_sumsq(const T* __restrict__ x_row, const T* __restrict__ res_row,
                                              int64_t first, int64_t N, float scale, float mu) {
  constexpr int64_t kStep = static_cast<int64_t>(kRowThreads) * VEC;
  float sq[VEC] = {};
  for (int64_t col = first; col < N; col += kStep) {
    float s[VEC];
    load_row_sum<T, VEC>(x_row, res_row, col, s);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = s[j] * scale - mu;
      sq[j] += d * d;
    }
  }
  return lane_total<VEC>(sq);
}

// Block per row, N > 16384: the row no longer fits in registers, so each pass (mean, variance, output)
// re-reads x and residual; a row of this size stays in L2 between passes. Thread t owns the VEC-wide
// pieces at t * VEC + k * 512 * VEC, which keeps every sweep coalesced.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_fwd_stream_kernel(const T* __restrict__ x,         // (M, N), row stride x_stride
                                 int64_t x_stride,
                                 const T* __restrict__ residual,  // (M, N), row stride residual_stride, or nullptr
                                 int64_t residual_stride,
                                 const T* __restrict__ weight,    // (N,) or nullptr
                                 const T* __restrict__ bias,      // (N,) or nullptr
                                 T* __restrict__ y,               // (M, N) contiguous
                                 T* __restrict__ sum_out,         // (M, N) contiguous x + residual, or nullptr
                                 float* __restrict__ mean,        // (M,)
                                 float* __restrict__ rstd,        // (M,)
                                 int64_t M, int64_t N, float eps) {
  __shared__ float scratch[kRowThreads / kWarpSize];
  constexpr int64_t kStep = static_cast<int64_t>(kRowThreads) * VEC;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* x_row = x + row * x_stride;
    const T* res_row = residual != nullptr ? residual + row * residual_stride : nullptr;
    T* y_row = y + row * N;
    T* sum_row = sum_out != nullptr ? sum_out + row * N : nullptr;

    // One accumulator per vector lane: a row of 100000 is ~200 values per thread, and VEC chains of
    // ~200 / VEC additions each keep the rounding error (and the latency chain) shorter.
    float sum[VEC] = {};
    for (int64_t col = first; col < N; col += kStep) {
      float s[VEC];
      load_row_sum<T, VEC>(x_row, res_row, col, s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[j] += s[j];
    }
    float mu = block_sum<kRowThreads>(lane_total<VEC>(sum), scratch) / static_cast<float>(N);
    float m2 = block_sum<kRowThreads>(stream_sumsq<T, VEC>(x_row, res_row, first, N, 1.f, mu), scratch);
    float rs = rsqrtf(m2 / static_cast<float>(N) + eps);
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }

    // A row whose fp32 moments overflow or underflow: as in layer_norm_fwd_row, from the row scaled by
    // row_scale (one more pass for the max, one for the scaled mean).
    float down = 1.f;
    if (!plain_moments_ok(m2, static_cast<float>(N), eps)) {  // uniform over the block
      float amax = 0.f;
      for (int64_t col = first; col < N; col += kStep) {
        float s[VEC];
        load_row_sum<T, VEC>(x_row, res_row, col, s);
#pragma unroll
        for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, fabsf(s[j]));
      }
      float up;
      row_scale(block_max<kRowThreads>(amax, scratch), &up, &down);
      float sum_t[VEC] = {};
      for (int64_t col = first; col < N; col += kStep) {
        float s[VEC];
        load_row_sum<T, VEC>(x_row, res_row, col, s);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum_t[j] += s[j] * down;
      }
      mu = block_sum<kRowThreads>(lane_total<VEC>(sum_t), scratch) / static_cast<float>(N);
      m2 = block_sum<kRowThreads>(stream_sumsq<T, VEC>(x_row, res_row, first, N, down, mu), scratch);
      // eps * 2^-2k as (eps * down) * down: with eps = 0 it stays 0 (never 0 * inf).
      rs = rsqrtf(m2 / static_cast<float>(N) + eps * down * down);
      if (threadIdx.x == 0) {
        mean[row] = mu * up;
        rstd[row] = rs * down;
      }
    }

    for (int64_t col = first; col < N; col += kStep) {
      float s[VEC], w[VEC], b[VEC], out[VEC];
      load_row_sum<T, VEC>(x_row, res_row, col, s);
      if (sum_row != nullptr) store_float<T, VEC>(sum_row + col, s);
      load_or_fill<T, VEC>(weight, col, 1.f, w);
      load_or_fill<T, VEC>(bias, col, 0.f, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (s[j] * down - mu) * rs * w[j] + b[j];
      store_float<T, VEC>(y_row + col, out);
    }
  }
}

// The per-thread dweight / dbias column accumulators of the backward kernels, zeroed.
template <int ITERS, int VEC>
__device__ __forceinline__ void zero_accumulators(float (&dw_acc)[ITERS][VEC], float (&db_acc)[ITERS][VEC]) {
#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dw_acc[c][j] = 0.f;
      db_acc[c][j] = 0.f;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernels. Their grids are persistent (a few blocks per SM, rows strided over the grid) so that each
// block folds many rows into one set of dweight / dbias partials before writing them out: the workspace,
// and the finalize kernel's reads, scale with the grid rather than with M.

// Warp per row, N <= 1024. Warp w of block b owns rows b * 4 + w + k * 4 * gridDim.x; lane l owns the columns
// of layer_norm_fwd_row in every one of those rows, so it accumulates their dy * xhat and dy in registers.
// At the end the four warps' accumulators meet in shared memory (each warp writes its own slice, one
// barrier, then each thread sums four slices for its columns in warp order) and the block writes one row
// of each partial. A warp with no rows contributes zeros, so there is no early exit before the barrier.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpThreads)
    layer_norm_bwd_warp_kernel(const T* __restrict__ dy,        // (M, N), row stride dy_stride
                               int64_t dy_stride,
                               const T* __restrict__ x,         // (M, N), row stride x_stride
                               int64_t x_stride,
                               const T* __restrict__ residual,  // (M, N), row stride residual_stride, or nullptr
                               int64_t residual_stride,
                               const T* __restrict__ weight,    // (N,) or nullptr
                               const float* __restrict__ mean,  // (M,)
                               const float* __restrict__ rstd,  // (M,)
                               T* __restrict__ dx,              // (M, N) contiguous
                               float* __restrict__ partial,     // (2, gridDim.x, N): dw then db partials, or nullptr
                               int64_t M, int N) {
  constexpr int kCols = ITERS * VEC * kWarpSize;  // >= N; the columns a warp's registers cover
  __shared__ float warp_dw[kWarpRowsPerBlock][kCols];
  __shared__ float warp_db[kWarpRowsPerBlock][kCols];
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const auto team_sum2 = [](float a, float b) { return make_float2(warp_sum(a), warp_sum(b)); };

  float dw_acc[ITERS][VEC];
  float db_acc[ITERS][VEC];
  zero_accumulators(dw_acc, db_acc);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + warp; row < M;
       row += static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock) {
    layer_norm_bwd_row<T, VEC, ITERS, kWarpSize>(
        dy + row * dy_stride, x + row * x_stride, residual != nullptr ? residual + row * residual_stride : nullptr,
        weight, mean[row], rstd[row], dx + row * N, N, lane, dw_acc, db_acc, team_sum2);
  }

  if (partial == nullptr) return;  // uniform over the block: no parameter gradient wanted
#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int col = (c * kWarpSize + lane) * VEC + j;
      warp_dw[warp][col] = dw_acc[c][j];
      warp_db[warp][col] = db_acc[c][j];
    }
  }
  __syncthreads();
  float* dw_part = partial + static_cast<int64_t>(blockIdx.x) * N;
  float* db_part = partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * N;
  for (int col = static_cast<int>(threadIdx.x); col < N; col += kWarpThreads) {
    float sw = 0.f;
    float sb = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpRowsPerBlock; ++w) {
      sw += warp_dw[w][col];
      sb += warp_db[w][col];
    }
    dw_part[col] = sw;
    db_part[col] = sb;
  }
}

// Block per row, 1024 < N <= 8192. Block b owns rows b + k * gridDim.x; thread t owns the columns of
// layer_norm_fwd_row with a team of 512 in every one of them, so its dweight / dbias accumulators stay in
// registers across rows (<= 16 columns per thread keeps xhat, w*dy and both accumulators in registers) and
// no other thread of the block touches those columns: each thread writes its own partials directly.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_bwd_block_kernel(const T* __restrict__ dy,        // (M, N), row stride dy_stride
                                int64_t dy_stride,
                                const T* __restrict__ x,         // (M, N), row stride x_stride
                                int64_t x_stride,
                                const T* __restrict__ residual,  // (M, N), row stride residual_stride, or nullptr
                                int64_t residual_stride,
                                const T* __restrict__ weight,    // (N,) or nullptr
                                const float* __restrict__ mean,  // (M,)
                                const float* __restrict__ rstd,  // (M,)
                                T* __restrict__ dx,              // (M, N) contiguous
                                float* __restrict__ partial,     // (2, gridDim.x, N): dw then db partials, or nullptr
                                int64_t M, int N) {
  __shared__ float2 scratch[kRowThreads / kWarpSize];
  const int t = static_cast<int>(threadIdx.x);
  const auto team_sum2 = [&](float a, float b) { return block_sum2<kRowThreads>(a, b, scratch); };

  float dw_acc[ITERS][VEC];
  float db_acc[ITERS][VEC];
  zero_accumulators(dw_acc, db_acc);

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    layer_norm_bwd_row<T, VEC, ITERS, kRowThreads>(
        dy + row * dy_stride, x + row * x_stride, residual != nullptr ? residual + row * residual_stride : nullptr,
        weight, mean[row], rstd[row], dx + row * N, N, t, dw_acc, db_acc, team_sum2);
  }

  if (partial == nullptr) return;
  float* dw_part = partial + static_cast<int64_t>(blockIdx.x) * N;
  float* db_part = partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * N;
#pragma unroll
  for (int c = 0; c < ITERS; ++c) {
    const int col = (c * kRowThreads + t) * VEC;
    if (col < N) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dw_part[col + j] = dw_acc[c][j];
        db_part[col + j] = db_acc[c][j];
      }
    }
  }
}

// Block per row, N > 8192. Ownership as in the block kernel, but neither the row nor the accumulators fit
// in registers: the row is read twice (statistics, then dx; the second read mostly hits L2) and thread t
// accumulates straight into its columns of the block's partial rows in global memory. Those columns are
// touched by no other thread, so the read-modify-writes need neither barriers nor atomics.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_bwd_stream_kernel(const T* __restrict__ dy,        // (M, N), row stride dy_stride
                                 int64_t dy_stride,
                                 const T* __restrict__ x,         // (M, N), row stride x_stride
                                 int64_t x_stride,
                                 const T* __restrict__ residual,  // (M, N), row stride residual_stride, or nullptr
                                 int64_t residual_stride,
                                 const T* __restrict__ weight,    // (N,) or nullptr
                                 const float* __restrict__ mean,  // (M,)
                                 const float* __restrict__ rstd,  // (M,)
                                 T* __restrict__ dx,              // (M, N) contiguous
                                 float* __restrict__ partial,     // (2, gridDim.x, N): dw then db partials, or nullptr
                                 int64_t M, int64_t N) {
  __shared__ float2 scratch[kRowThreads / kWarpSize];
  constexpr int64_t kStep = static_cast<int64_t>(kRowThreads) * VEC;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  float* dw_part = partial != nullptr ? partial + static_cast<int64_t>(blockIdx.x) * N : nullptr;
  float* db_part = partial != nullptr ? partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * N : nullptr;
  if (partial != nullptr) {
    for (int64_t col = first; col < N; col += kStep) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dw_part[col + j] = 0.f;
        db_part[col + j] = 0.f;
      }
    }
  }

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* dy_row = dy + row * dy_stride;
    const T* x_row = x + row * x_stride;
    const T* res_row = residual != nullptr ? residual + row * residual_stride : nullptr;
    T* dx_row = dx + row * N;
    const float mu = mean[row];
    const float rs = rstd[row];

    float sum_g = 0.f;
    float sum_gx = 0.f;
    for (int64_t col = first; col < N; col += kStep) {
      float s[VEC], d[VEC], w[VEC];
      load_row_sum<T, VEC>(x_row, res_row, col, s);
      load_float<T, VEC>(dy_row + col, d);
      load_or_fill<T, VEC>(weight, col, 1.f, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (s[j] - mu) * rs;
        const float g = w[j] * d[j];
        sum_g += g;
        sum_gx += g * xhat;
        if (partial != nullptr) {
          dw_part[col + j] += d[j] * xhat;
          db_part[col + j] += d[j];
        }
      }
    }
    const float2 sums = block_sum2<kRowThreads>(sum_g, sum_gx, scratch);
    const float mean_g = sums.x / static_cast<float>(N);
    const float mean_gx = sums.y / static_cast<float>(N);

    for (int64_t col = first; col < N; col += kStep) {
      float s[VEC], d[VEC], w[VEC], out[VEC];
      load_row_sum<T, VEC>(x_row, res_row, col, s);
      load_float<T, VEC>(dy_row + col, d);
      load_or_fill<T, VEC>(weight, col, 1.f, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (s[j] - mu) * rs;
        out[j] = rs * (w[j] * d[j] - mean_g - xhat * mean_gx);
      }
      store_float<T, VEC>(dx_row + col, out);
    }
  }
}

// Second stage of dweight / dbias: block b owns columns [32 b, 32 b + 32); threadIdx.x picks the column,
// so each warp reads 32 consecutive floats of a partial row, and threadIdx.y splits the partial rows 16 ways
// so that a few hundred partial rows become ~20 sequential loads per thread. The 16 sums then meet in shared
// memory and the threadIdx.y == 0 warp adds them in a fixed order: the result does not depend on timing.
template <typename T>
__global__ void __launch_bounds__(kFinalCols * kFinalRows)
    layer_norm_bwd_finalize_kernel(const float* __restrict__ partial,  // (2, num_blocks, N)
                                   int64_t num_blocks, int N,
                                   T* __restrict__ dweight,  // (N,) or nullptr
                                   T* __restrict__ dbias) {  // (N,) or nullptr
  __shared__ float red_dw[kFinalRows][kFinalCols];
  __shared__ float red_db[kFinalRows][kFinalCols];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int col = static_cast<int>(blockIdx.x) * kFinalCols + tx;
  float sw = 0.f;
  float sb = 0.f;
  if (col < N) {
    for (int64_t b = ty; b < num_blocks; b += kFinalRows) {
      sw += partial[b * N + col];
      sb += partial[(num_blocks + b) * N + col];
    }
  }
  red_dw[ty][tx] = sw;
  red_db[ty][tx] = sb;
  __syncthreads();
  if (ty == 0 && col < N) {
    float tw = 0.f;
    float tb = 0.f;
#pragma unroll
    for (int r = 0; r < kFinalRows; ++r) {
      tw += red_dw[r][tx];
      tb += red_db[r][tx];
    }
    if (dweight != nullptr) dweight[col] = from_float<T>(tw);
    if (dbias != nullptr) dbias[col] = from_float<T>(tb);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: path choice and launches.

// A (M, N) operand can take VEC-wide accesses when its base is 16-byte aligned and every row start is too.
bool rows_aligned(const void* p, int64_t stride, int vec) { return aligned16(p) && stride % vec == 0; }

// ITERS values instantiated per path: the first one >= the row's chunk count is launched. The vector paths
// get every count so that registers match the row (N = 768 in fp16 is 3 chunks of 256 per warp, not 4); the
// scalar fallback gets powers of two to bound compile time. The last entry of each list covers that path's
// largest N, which the launchers enforce before dispatching.
template <int... Vs>
struct IterList {};

template <int VEC>
struct WarpIters;  // N <= 1024 with a team of 32
template <>
struct WarpIters<1> {
  using type = IterList<1, 2, 4, 8, 16, 32>;
};
template <>
struct WarpIters<4> {
  using type = IterList<1, 2, 3, 4, 5, 6, 7, 8>;
};
template <>
struct WarpIters<8> {
  using type = IterList<1, 2, 3, 4>;
};

template <int VEC>
struct FwdBlockIters;  // 1024 < N <= 16384 with a team of 512
template <>
struct FwdBlockIters<1> {
  using type = IterList<4, 8, 16, 32>;
};
template <>
struct FwdBlockIters<4> {
  using type = IterList<1, 2, 3, 4, 5, 6, 7, 8>;
};
template <>
struct FwdBlockIters<8> {
  using type = IterList<1, 2, 3, 4>;
};

template <int VEC>
struct BwdBlockIters;  // 1024 < N <= 8192 with a team of 512
template <>
struct BwdBlockIters<1> {
  using type = IterList<4, 8, 16>;
};
template <>
struct BwdBlockIters<4> {
  using type = IterList<1, 2, 3, 4>;
};
template <>
struct BwdBlockIters<8> {
  using type = IterList<1, 2>;
};

// Calls launch(IntConst<I>{}) for the first I in the list with I >= chunks; false when the list is too short.
template <typename F, int First, int... Rest>
bool dispatch_iters(int64_t chunks, IterList<First, Rest...>, F&& launch) {
  if (chunks <= First) {
    launch(IntConst<First>{});
    return true;
  }
  if constexpr (sizeof...(Rest) == 0) {
    return false;
  } else {
    return dispatch_iters(chunks, IterList<Rest...>{}, launch);
  }
}

// layer_norm_fwd_launch with typed pointers (shapes as documented there) once the access width is chosen.
template <typename T, int VEC>
cudaError_t fwd_launch(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, const T* weight,
                       const T* bias, T* y, T* sum_out, float* mean, float* rstd, int64_t M, int N, float eps,
                       cudaStream_t stream) {
  bool dispatched = true;
  if (N <= kWarpMaxN) {
    const unsigned grid = static_cast<unsigned>(min64(ceil_div(M, kWarpRowsPerBlock), kMaxGrid));
    dispatched = dispatch_iters(ceil_div(N, kWarpSize * VEC), typename WarpIters<VEC>::type{}, [&](auto iters) {
      layer_norm_fwd_warp_kernel<T, VEC, decltype(iters)::value><<<grid, kWarpThreads, 0, stream>>>(
          x, x_stride, residual, residual_stride, weight, bias, y, sum_out, mean, rstd, M, N, eps);
    });
  } else if (N <= kFwdRowMaxN) {
    const unsigned grid = static_cast<unsigned>(min64(M, kMaxGrid));
    dispatched = dispatch_iters(ceil_div(N, kRowThreads * VEC), typename FwdBlockIters<VEC>::type{}, [&](auto iters) {
      layer_norm_fwd_block_kernel<T, VEC, decltype(iters)::value><<<grid, kRowThreads, 0, stream>>>(
          x, x_stride, residual, residual_stride, weight, bias, y, sum_out, mean, rstd, M, N, eps);
    });
  } else {
    const unsigned grid = static_cast<unsigned>(min64(M, kMaxGrid));
    layer_norm_fwd_stream_kernel<T, VEC><<<grid, kRowThreads, 0, stream>>>(
        x, x_stride, residual, residual_stride, weight, bias, y, sum_out, mean, rstd, M, N, eps);
  }
  if (!dispatched) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

// Blocks for a persistent backward grid: as many as can be resident at once (so no block waits for a second
// wave while the others idle at the end), but no more than there are row groups nor than the workspace holds.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int threads, int64_t row_groups, int64_t cap, int sm_count,
                            unsigned* grid) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  int64_t blocks = max64(per_sm, 1) * max64(sm_count, 1);
  blocks = min64(blocks, row_groups);
  blocks = min64(blocks, cap);
  *grid = static_cast<unsigned>(max64(blocks, 1));
  return cudaSuccess;
}

// layer_norm_bwd_launch with typed pointers (shapes as documented there) once the access width is chosen;
// partial: (2, max_blocks, N) fp32, or nullptr when neither dweight nor dbias is wanted.
template <typename T, int VEC>
cudaError_t bwd_launch(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const T* residual,
                       int64_t residual_stride, const T* weight, const float* mean, const float* rstd, T* dx,
                       T* dweight, T* dbias, float* partial, int64_t max_blocks, int64_t M, int N, int sm_count,
                       cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  unsigned grid = 1;
  bool dispatched = true;
  if (N <= kWarpMaxN) {
    dispatched = dispatch_iters(ceil_div(N, kWarpSize * VEC), typename WarpIters<VEC>::type{}, [&](auto iters) {
      const auto kernel = layer_norm_bwd_warp_kernel<T, VEC, decltype(iters)::value>;
      err = persistent_grid(kernel, kWarpThreads, ceil_div(M, kWarpRowsPerBlock), max_blocks, sm_count, &grid);
      if (err != cudaSuccess) return;
      kernel<<<grid, kWarpThreads, 0, stream>>>(dy, dy_stride, x, x_stride, residual, residual_stride, weight,
                                                mean, rstd, dx, partial, M, N);
    });
  } else if (N <= kBwdRowMaxN) {
    dispatched = dispatch_iters(ceil_div(N, kRowThreads * VEC), typename BwdBlockIters<VEC>::type{}, [&](auto iters) {
      const auto kernel = layer_norm_bwd_block_kernel<T, VEC, decltype(iters)::value>;
      err = persistent_grid(kernel, kRowThreads, M, max_blocks, sm_count, &grid);
      if (err != cudaSuccess) return;
      kernel<<<grid, kRowThreads, 0, stream>>>(dy, dy_stride, x, x_stride, residual, residual_stride, weight,
                                               mean, rstd, dx, partial, M, N);
    });
  } else {
    const auto kernel = layer_norm_bwd_stream_kernel<T, VEC>;
    err = persistent_grid(kernel, kRowThreads, M, max_blocks, sm_count, &grid);
    if (err == cudaSuccess) {
      kernel<<<grid, kRowThreads, 0, stream>>>(dy, dy_stride, x, x_stride, residual, residual_stride, weight,
                                               mean, rstd, dx, partial, M, N);
    }
  }
  if (!dispatched) return cudaErrorInvalidValue;
  if (err != cudaSuccess) return err;
  err = cudaGetLastError();
  if (err != cudaSuccess || partial == nullptr) return err;

  const dim3 final_block(kFinalCols, kFinalRows);
  const unsigned final_grid = static_cast<unsigned>(ceil_div(N, kFinalCols));
  layer_norm_bwd_finalize_kernel<T><<<final_grid, final_block, 0, stream>>>(partial, grid, N, dweight, dbias);
  return cudaGetLastError();
}

}  // namespace

cudaError_t layer_norm_fwd_launch(DType dtype, const void* x, int64_t x_stride, const void* residual,
                                  int64_t residual_stride, const void* weight, const void* bias, void* y,
                                  void* sum_out, float* mean, float* rstd, int64_t M, int64_t N, float eps,
                                  cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (N < 1 || N > 0x7fffffff || x_stride < 0 || (residual != nullptr && residual_stride < 0)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = N % kVec == 0 && rows_aligned(x, x_stride, kVec) &&
                     (residual == nullptr || rows_aligned(residual, residual_stride, kVec)) && aligned16(weight) &&
                     aligned16(bias) && aligned16(y) && aligned16(sum_out);
    const auto* x_t = static_cast<const T*>(x);
    const auto* res_t = static_cast<const T*>(residual);
    const auto* w_t = static_cast<const T*>(weight);
    const auto* b_t = static_cast<const T*>(bias);
    auto* y_t = static_cast<T*>(y);
    auto* sum_t = static_cast<T*>(sum_out);
    const int n = static_cast<int>(N);
    if (vec) {
      return fwd_launch<T, kVec>(x_t, x_stride, res_t, residual_stride, w_t, b_t, y_t, sum_t, mean, rstd, M, n, eps,
                                 stream);
    }
    return fwd_launch<T, 1>(x_t, x_stride, res_t, residual_stride, w_t, b_t, y_t, sum_t, mean, rstd, M, n, eps,
                            stream);
  });
}

int64_t layer_norm_bwd_workspace_blocks(int64_t M, int64_t N, int sm_count) {
  if (M <= 0) return 0;
  const int64_t sms = max64(sm_count, 1);
  if (N <= kWarpMaxN) return min64(ceil_div(M, kWarpRowsPerBlock), sms * (kMaxThreadsPerSm / kWarpThreads));
  return min64(M, sms * (kMaxThreadsPerSm / kRowThreads));
}

cudaError_t layer_norm_bwd_launch(DType dtype, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                                  const void* residual, int64_t residual_stride, const void* weight,
                                  const float* mean, const float* rstd, void* dx, void* dweight, void* dbias,
                                  float* workspace, int64_t workspace_blocks, int64_t M, int64_t N, int sm_count,
                                  cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (N < 1 || N > 0x7fffffff || dy_stride < 0 || x_stride < 0 || (residual != nullptr && residual_stride < 0)) {
    return cudaErrorInvalidValue;
  }
  const bool want_params = dweight != nullptr || dbias != nullptr;
  if (want_params && (workspace == nullptr || workspace_blocks < 1)) return cudaErrorInvalidValue;
  float* partial = want_params ? workspace : nullptr;
  // Without parameter gradients nothing bounds the grid but the rows and the device.
  const int64_t max_blocks = want_params ? workspace_blocks : kMaxGrid;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = N % kVec == 0 && rows_aligned(dy, dy_stride, kVec) && rows_aligned(x, x_stride, kVec) &&
                     (residual == nullptr || rows_aligned(residual, residual_stride, kVec)) && aligned16(weight) &&
                     aligned16(dx);
    const auto* dy_t = static_cast<const T*>(dy);
    const auto* x_t = static_cast<const T*>(x);
    const auto* res_t = static_cast<const T*>(residual);
    const auto* w_t = static_cast<const T*>(weight);
    auto* dx_t = static_cast<T*>(dx);
    auto* dw_t = static_cast<T*>(dweight);
    auto* db_t = static_cast<T*>(dbias);
    const int n = static_cast<int>(N);
    if (vec) {
      return bwd_launch<T, kVec>(dy_t, dy_stride, x_t, x_stride, res_t, residual_stride, w_t, mean, rstd, dx_t,
                                 dw_t, db_t, partial, max_blocks, M, n, sm_count, stream);
    }
    return bwd_launch<T, 1>(dy_t, dy_stride, x_t, x_stride, res_t, residual_stride, w_t, mean, rstd, dx_t, dw_t,
                            db_t, partial, max_blocks, M, n, sm_count, stream);
  });
}

}  // namespace cuda
}  // namespace ctxkern
