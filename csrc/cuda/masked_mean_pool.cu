// Masked mean pooling forward and backward: the mean of each sequence's real tokens of hidden, fp32 arithmetic for
// every storage dtype, optionally L2-normalized.
//
// Forward, two kernels:
//   sum:    block (column tile, split, sequence) sums one tile of 32 * VEC columns over one split of the sequence's
//           tokens into an fp32 workspace row. Lanes split the columns (VEC-wide 16-byte loads, a warp covers one
//           token's tile in one coalesced sweep); the 8 warps split the tokens; splits spread a long sequence over
//           several blocks when B * D alone would leave SMs idle. Padding tokens are skipped whole by their warp,
//           so only real tokens are read.
//   finish: block b adds its sequence's splits in a fixed order (deterministic, no atomics), divides by the token
//           count and normalizes with one block reduction; writing the output needs the whole row's norm, which
//           no single sum block has.
// Backward, two kernels:
//   grad:      block b computes g[b] = dL/dmean[b] / count, the gradient every real token of b receives.
//   broadcast: warp per token writes g[b] or zeros over the token's D columns: a pure streaming write.
#include "masked_mean_pool.h"

#include "common.cuh"

namespace ctxkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;                 // tokens per warp in flight: 4 independent 16-byte loads per lane
constexpr int64_t kMinSplitTokens = 64;    // a split of fewer tokens would not hide its own reduction
constexpr int kBlocksPerSm = 4;            // 8-warp blocks: 4 per SM is half of the SM's warps, enough to stream
constexpr int64_t kMaxGrid = 0x7fffffff;
constexpr float kNormEps = 1e-12f;

// Where sequence b lives: its first token and token count.
struct Span {
  int64_t first;
  int64_t len;
};

__device__ __forceinline__ Span sequence_span(const int32_t* __restrict__ cu_seqlens, int64_t b, int64_t S) {
  if (cu_seqlens != nullptr) return {cu_seqlens[b], static_cast<int64_t>(cu_seqlens[b + 1]) - cu_seqlens[b]};
  return {0, S};
}

// Number of real tokens of sequence b; every thread of the block must call it and gets the same count.
__device__ __forceinline__ int64_t token_count(const uint8_t* __restrict__ mask, const int32_t* __restrict__ cu_seqlens,
                                               int64_t b, int64_t S) {
  if (cu_seqlens != nullptr) return static_cast<int64_t>(cu_seqlens[b + 1]) - cu_seqlens[b];
  int64_t count = 0;
  for (int64_t s0 = 0; s0 < S; s0 += kThreads) {
    const int64_t s = s0 + threadIdx.x;
    count += __syncthreads_count(s < S && mask[b * S + s] != 0);
  }
  return count;
}

// Sum over the block's threads, every thread gets it (the shared helper with this file's block size).
__device__ __forceinline__ float block_total(float v) {
  __shared__ float scratch[kWarps];
  return block_sum<kThreads>(v, scratch);
}

// Block (tile + col_tiles * b, split) owns columns [tile * 32 * VEC, (tile + 1) * 32 * VEC) of sequence b and the
// split-th of its tokens; lane l owns the VEC columns at tile * 32 * VEC + l * VEC; warp w owns the tokens
// w, w + 8, w + 16, ... of the split, kUnroll of them loaded at once. Partial sums of the 8 warps meet in shared
// memory; the block writes its tile of workspace row (split, b).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    masked_mean_pool_sum_kernel(const T* __restrict__ hidden,             // (B, S, D) or (total, D)
                                int64_t batch_stride, int64_t token_stride,
                                const uint8_t* __restrict__ mask,         // (B, S) or nullptr
                                const int32_t* __restrict__ cu_seqlens,   // (B + 1,) or nullptr
                                float* __restrict__ workspace,            // (splits, B, D)
                                int64_t B, int64_t S, int D, int col_tiles) {
  __shared__ float partial[kWarps][kWarpSize * VEC];
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t b = blockIdx.x / col_tiles;
  const int tile_col = static_cast<int>(blockIdx.x % col_tiles) * kWarpSize * VEC;
  const int col = tile_col + lane * VEC;
  const bool active = col < D;  // D % VEC == 0: a lane's VEC columns are all inside or all outside

  const Span span = sequence_span(cu_seqlens, b, S);
  const T* seq = hidden + (cu_seqlens != nullptr ? span.first * token_stride : b * batch_stride);
  const uint8_t* seq_mask = mask != nullptr ? mask + b * S : nullptr;
  const int64_t s_begin = span.len * blockIdx.y / gridDim.y;
  const int64_t s_end = span.len * (blockIdx.y + 1) / gridDim.y;

  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  for (int64_t s0 = s_begin + warp; s0 < s_end; s0 += kWarps * kUnroll) {
    float v[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = s0 + u * kWarps;
      // Warp-uniform: every lane reads the same mask byte, so a padding token costs the warp no hidden load.
      const bool real = s < s_end && (seq_mask == nullptr || seq_mask[s] != 0);
      if (real && active) {
        load_float<T, VEC>(seq + s * token_stride + col, v[u]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[u][j] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += v[u][j];
    }
  }

#pragma unroll
  for (int j = 0; j < VEC; ++j) partial[warp][lane * VEC + j] = acc[j];
  __syncthreads();
  // kWarpSize * VEC <= kThreads (VEC <= 8): one thread per column of the tile adds the warps in order.
  const int t = static_cast<int>(threadIdx.x);
  if (t < kWarpSize * VEC && tile_col + t < D) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][t];
    workspace[(static_cast<int64_t>(blockIdx.y) * B + b) * D + tile_col + t] = sum;
  }
}

// Block b owns sequence b: thread t the columns t, t + 256, ... It adds the splits' partial sums, divides by the
// token count (a sequence without tokens has zero sums and gets zeros), and with normalize divides by
// max(||mean||, 1e-12) after one block reduction, re-reading the fp32 mean it stored (its own writes).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    masked_mean_pool_finish_kernel(const float* __restrict__ workspace,    // (splits, B, D)
                                   int splits,
                                   const uint8_t* __restrict__ mask,       // (B, S) or nullptr
                                   const int32_t* __restrict__ cu_seqlens, // (B + 1,) or nullptr
                                   T* __restrict__ out,                    // (B, D)
                                   float* __restrict__ mean,               // (B, D), or nullptr
                                   int64_t B, int64_t S, int D, bool normalize) {
  const int64_t b = blockIdx.x;
  const int64_t count = token_count(mask, cu_seqlens, b, S);
  const float inv_count = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
  float sq = 0.f;
  for (int c = threadIdx.x; c < D; c += kThreads) {
    float sum = 0.f;
    for (int k = 0; k < splits; ++k) sum += workspace[(k * B + b) * D + c];
    const float m = sum * inv_count;
    if (mean != nullptr) mean[b * D + c] = m;
    if (normalize) {
      sq += m * m;
    } else {
      out[b * D + c] = from_float<T>(m);
    }
  }
  if (!normalize) return;  // uniform over the block
  const float denom = fmaxf(sqrtf(block_total(sq)), kNormEps);
  for (int c = threadIdx.x; c < D; c += kThreads) out[b * D + c] = from_float<T>(mean[b * D + c] / denom);
}

// Block b owns sequence b: thread t the columns t, t + 256, ... g = dL/dmean / count, rounded to T once. With
// normalize, out = mean / max(n, eps), n = ||mean||: dL/dmean = (dout - y (y . dout)) / n when n >= eps (torch's
// clamp_min passes the gradient at equality), dout / eps on the clamped branch; y the fp32 normalized mean.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    masked_mean_pool_grad_kernel(const T* __restrict__ dout,               // (B, D)
                                 const float* __restrict__ mean,           // (B, D), or nullptr
                                 const uint8_t* __restrict__ mask,         // (B, S) or nullptr
                                 const int32_t* __restrict__ cu_seqlens,   // (B + 1,) or nullptr
                                 T* __restrict__ g,                        // (B, D)
                                 int64_t S, int D) {
  const int64_t b = blockIdx.x;
  const int64_t count = token_count(mask, cu_seqlens, b, S);
  const float inv_count = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
  float scale = inv_count;
  float shift = 0.f;
  float denom = 1.f;
  if (mean != nullptr) {  // uniform over the block
    float sq = 0.f;
    for (int c = threadIdx.x; c < D; c += kThreads) sq += mean[b * D + c] * mean[b * D + c];
    const float norm = sqrtf(block_total(sq));
    denom = fmaxf(norm, kNormEps);
    float dot = 0.f;
    for (int c = threadIdx.x; c < D; c += kThreads) dot += mean[b * D + c] / denom * to_float(dout[b * D + c]);
    dot = block_total(dot);
    shift = norm >= kNormEps ? dot : 0.f;
    scale = inv_count / denom;
  }
  for (int c = threadIdx.x; c < D; c += kThreads) {
    const float y = mean != nullptr ? mean[b * D + c] / denom : 0.f;
    g[b * D + c] = from_float<T>((to_float(dout[b * D + c]) - y * shift) * scale);
  }
}

// Warp w of block i owns tokens i * 8 + w, then a grid stride; lane l the VEC-wide column chunks l, l + 32, ...
// Lane 0 finds the token's sequence (t / S, or a binary search of cu_seqlens) and whether it is real, and
// shares both with the warp. Every element of dhidden is written exactly once.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    masked_mean_pool_broadcast_kernel(const T* __restrict__ g,                 // (B, D)
                                      const uint8_t* __restrict__ mask,        // (B, S) or nullptr
                                      const int32_t* __restrict__ cu_seqlens,  // (B + 1,) or nullptr
                                      T* __restrict__ dhidden,                 // (tokens, D)
                                      int64_t tokens, int64_t B, int64_t S, int D) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
  const int chunks = D / VEC;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; t < tokens;
       t += warps_total) {
    int64_t b = 0;
    int real = 0;
    if (lane == 0) {
      if (cu_seqlens != nullptr) {
        // The last b with cu_seqlens[b] <= t, keeping cu_seqlens[lo] <= t < cu_seqlens[hi].
        int64_t lo = 0, hi = B;
        while (hi - lo > 1) {
          const int64_t mid = (lo + hi) / 2;
          if (cu_seqlens[mid] <= t) {
            lo = mid;
          } else {
            hi = mid;
          }
        }
        b = lo;
        real = 1;
      } else {
        b = t / S;
        real = mask[t] != 0;
      }
    }
    b = __shfl_sync(0xffffffffu, b, 0);
    real = __shfl_sync(0xffffffffu, real, 0);
    T* row = dhidden + t * D;
    for (int c = lane; c < chunks; c += kWarpSize) {
      float v[VEC];
      if (real) {
        load_float<T, VEC>(g + b * D + c * VEC, v);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = 0.f;
      }
      store_float<T, VEC>(row + c * VEC, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

template <typename T, int VEC>
cudaError_t fwd_launch(const T* hidden, int64_t batch_stride, int64_t token_stride, const uint8_t* mask,
                       const int32_t* cu_seqlens, float* workspace, int64_t splits, T* out, float* mean, int64_t B,
                       int64_t S, int D, bool normalize, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(D, kWarpSize * VEC);
  if (B * col_tiles > kMaxGrid) return cudaErrorInvalidValue;
  const dim3 sum_grid(static_cast<unsigned>(B * col_tiles), static_cast<unsigned>(splits));
  masked_mean_pool_sum_kernel<T, VEC><<<sum_grid, kThreads, 0, stream>>>(
      hidden, batch_stride, token_stride, mask, cu_seqlens, workspace, B, S, D, static_cast<int>(col_tiles));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  masked_mean_pool_finish_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      workspace, static_cast<int>(splits), mask, cu_seqlens, out, mean, B, S, D, normalize);
  return cudaGetLastError();
}

}  // namespace

int64_t masked_mean_pool_fwd_splits(int64_t B, int64_t tokens_per_sequence, int64_t D, int sm_count) {
  // Column tiles of the narrowest access (fp32, 128 columns): an estimate of the sum kernel's blocks per split.
  const int64_t blocks = max64(B, 1) * ceil_div(max64(D, 1), kWarpSize * 4);
  const int64_t wanted = static_cast<int64_t>(max64(sm_count, 1)) * kBlocksPerSm;
  if (blocks >= wanted) return 1;
  const int64_t most = max64(1, tokens_per_sequence / kMinSplitTokens);
  return min64(min64(ceil_div(wanted, blocks), most), 65535);
}

cudaError_t masked_mean_pool_fwd_launch(DType dtype, const void* hidden, int64_t batch_stride, int64_t token_stride,
                                        const uint8_t* mask, const int32_t* cu_seqlens, float* workspace,
                                        int64_t splits, void* out, float* mean, int64_t B, int64_t S, int64_t D,
                                        bool normalize, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (D < 1 || D > 0x7fffffff || B > kMaxGrid || splits < 1 || splits > 65535 || batch_stride < 0 ||
      token_stride < 0 || (mask == nullptr) == (cu_seqlens == nullptr) || (normalize && mean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = D % kVec == 0 && aligned16(hidden) && batch_stride % kVec == 0 && token_stride % kVec == 0;
    const auto* h = static_cast<const T*>(hidden);
    auto* o = static_cast<T*>(out);
    const int d = static_cast<int>(D);
    if (vec) {
      return fwd_launch<T, kVec>(h, batch_stride, token_stride, mask, cu_seqlens, workspace, splits, o, mean, B, S,
                                 d, normalize, stream);
    }
    return fwd_launch<T, 1>(h, batch_stride, token_stride, mask, cu_seqlens, workspace, splits, o, mean, B, S, d,
                            normalize, stream);
  });
}

cudaError_t masked_mean_pool_bwd_launch(DType dtype, const void* dout, const float* mean, const uint8_t* mask,
                                        const int32_t* cu_seqlens, void* g, void* dhidden, int64_t tokens, int64_t B,
                                        int64_t S, int64_t D, int sm_count, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  if (D < 1 || D > 0x7fffffff || B < 1 || B > kMaxGrid || (mask == nullptr) == (cu_seqlens == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const int d = static_cast<int>(D);
    auto* g_t = static_cast<T*>(g);
    auto* dh = static_cast<T*>(dhidden);
    masked_mean_pool_grad_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        static_cast<const T*>(dout), mean, mask, cu_seqlens, g_t, S, d);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // Enough blocks to fill every SM several times over; the warps stride over the remaining tokens.
    const int64_t grid = min64(ceil_div(tokens, kWarps), static_cast<int64_t>(max64(sm_count, 1)) * 32);
    const bool vec = D % kVec == 0 && aligned16(g) && aligned16(dhidden);
    if (vec) {
      masked_mean_pool_broadcast_kernel<T, kVec><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          g_t, mask, cu_seqlens, dh, tokens, B, S, d);
    } else {
      masked_mean_pool_broadcast_kernel<T, 1><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
          g_t, mask, cu_seqlens, dh, tokens, B, S, d);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ctxkern
