// Fused attention forward (FlashAttention-2 structure) for dense, padded, causal and variable-length input.
//
// Ownership. A CTA owns one block of kRows = 16 * kStrips * kWarps consecutive queries of one (sequence b,
// head h); warp w owns kStrips 16-row strips, rows [16 kStrips w, 16 kStrips (w + 1)) of that block, and
// lane (g, t) = (lane / 4, lane % 4) owns rows g and g + 8 of each strip (attention_tile.cuh has the
// fragment layout). The CTA streams the sequence's keys in blocks of kCols through shared memory (K and V
// double-buffered with cp.async, the Q block loaded once). Per key block each warp computes its scores
// S = Q K^T (16 x kCols per strip) on tensor cores (CUDA cores for fp32), masks them, updates the running
// row max m and row sum l of the online softmax in registers, rescales its 16 x D output accumulators and
// adds P V. The S x S score matrix never exists.
//
// Skipped work: keys >= 1 + the last real key of the sequence (padding) and, when causal, keys beyond the
// block's last diagonal are never loaded; blocks of padding only are skipped; in a key block where nothing
// is masked for a warp's rows, the per-element mask test is skipped.
//
// Empty rows: a query row that sees no key keeps m = -inf and l = 0; it stores out = 0 and lse = +inf.
#include "attention.h"

#include "attention_launch.cuh"
#include "attention_tile.cuh"

namespace ctxkern {
namespace cuda {
namespace attn {
namespace {

// kWarps warps of kStrips 16-row strips each, kCols keys per streamed block; smem: the Q block, then 2
// stages of K, then 2 stages of V.
template <typename T, int D, int kWarps, int kStrips, int kCols>
struct FwdTile {
  static constexpr int kWarpRows = 16 * kStrips;
  static constexpr int kRows = kWarpRows * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = SmemRow<T, D>::kLd;
  static constexpr int kSmemBytes = (kRows + 4 * kCols) * kLd * static_cast<int>(sizeof(T));
  // Resident CTAs asked of ptxas: 3 (<= 168 registers a thread) for one strip up to D = 64, else 2
  // (<= 255); a 128-register cap (4 CTAs) spills even at D = 32.
  static constexpr int kMinBlocks = kStrips == 1 && !IsF32<T>::value && D <= 64 ? 3 : 2;
};

template <typename T, int D, int kWarps, int kStrips, int kCols>
__global__ void __launch_bounds__(32 * kWarps, (FwdTile<T, D, kWarps, kStrips, kCols>::kMinBlocks))
    attention_fwd_kernel(const AttentionProblem p, const TokenTensor q, const TokenTensor k, const TokenTensor v,
                         const TokenTensor out, const RowStats lse, int m_blocks) {
  using Tile = FwdTile<T, D, kWarps, kStrips, kCols>;
  constexpr int kRows = Tile::kRows;
  constexpr int kLd = Tile::kLd;
  constexpr int kMS = kStrips;
  constexpr int kNT = kCols / 8;  // score n-tiles per key block
  constexpr int kDT = D / 8;      // output n-tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* sK = sQ + kRows * kLd;                 // [2][kCols][kLd]
  T* sV = sK + 2 * kCols * kLd;             // [2][kCols][kLd]

  const CtaIndex cta = cta_index(m_blocks, p.heads);
  const int m_block = m_blocks - 1 - cta.block;  // heaviest query blocks first (the last ones when causal)
  const int h = cta.h;
  const int b = cta.b;
  const Sequence s = sequence_of(p, b);
  const int m0 = m_block * kRows;
  if (m0 >= s.len_q) return;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = m0 + Tile::kWarpRows * warp;  // first query of the warp's strips; strip ms starts
                                                      // 16 ms rows later

  const T* q_blk = token_row<const T>(q, b, h, s.q_tok0 + m0);
  const T* k_seq = token_row<const T>(k, b, h, s.k_tok0);
  const T* v_seq = token_row<const T>(v, b, h, s.k_tok0);
  const float scale_log2 = p.scale * kLog2e;

  const int n_blocks = key_blocks_for_queries<kCols>(s, p.causal, m0, kRows);
  int nb = next_key_block<kCols>(s, 0, n_blocks);
  auto load_kv = [&](int block, int stage) {
    const int n0 = block * kCols;
    load_tile_async<T, kCols, D, Tile::kThreads>(sK + stage * kCols * kLd, k_seq + n0 * k.row, k.row, s.len_k - n0);
    load_tile_async<T, kCols, D, Tile::kThreads>(sV + stage * kCols * kLd, v_seq + n0 * v.row, v.row, s.len_k - n0);
  };
  if (nb < n_blocks) {
    load_tile_async<T, kRows, D, Tile::kThreads>(sQ, q_blk, q.row, s.len_q - m0);
    load_kv(nb, 0);
  }
  cp_async_commit();

  float o_acc[kMS][kDT][4];
  float row_max[kMS][2];  // of rows g, g + 8 of each strip, in log2 units (scores * scale * log2 e)
  float row_sum[kMS][2];  // this lane's partial sums; the quad's total at the end
#pragma unroll
  for (int ms = 0; ms < kMS; ++ms) {
    zero(o_acc[ms]);
    row_max[ms][0] = row_max[ms][1] = -INFINITY;
    row_sum[ms][0] = row_sum[ms][1] = 0.f;
  }

  int stage = 0;
  while (nb < n_blocks) {
    const int next = next_key_block<kCols>(s, nb + 1, n_blocks);
    if (next < n_blocks) load_kv(next, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all groups but the newest" meaning "this stage"
    cp_async_wait<1>();
    __syncthreads();

    const int n0 = nb * kCols;
    float sc[kMS][kNT][4];
#pragma unroll
    for (int ms = 0; ms < kMS; ++ms) zero(sc[ms]);
    GemmNT<T, kMS, kNT, D>::run(sc, sQ + Tile::kWarpRows * warp * kLd, kLd, sK + stage * kCols * kLd, kLd);

    // Scale into log2 units and mask: key real, and (causal) key <= query + offset.
    uint32_t bits[kCols / 32];
    key_bits(bits, s, n0);
    const bool unmasked = all_bits(bits) && (!p.causal || n0 + kCols - 1 <= warp_row0 + s.causal_offset);
#pragma unroll
    for (int ms = 0; ms < kMS; ++ms) {
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = 8 * n + 2 * t + (e & 1);  // key n0 + c; bit c % 32 of bits[n / 4]
          const int row = warp_row0 + 16 * ms + g + 8 * (e >> 1);
          const bool visible = unmasked || (((bits[n / 4] >> (8 * (n % 4) + c % 8)) & 1u) != 0 &&
                                            (!p.causal || n0 + c <= row + s.causal_offset));
          sc[ms][n][e] = visible ? sc[ms][n][e] * scale_log2 : -INFINITY;
        }
      }
    }

    // Online softmax: new row max, rescale what was accumulated under the old one, P = exp2(S - max).
#pragma unroll
    for (int ms = 0; ms < kMS; ++ms) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float blk_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kNT; ++n) blk_max = fmaxf(blk_max, fmaxf(sc[ms][n][2 * hh], sc[ms][n][2 * hh + 1]));
        const float new_max = fmaxf(row_max[ms][hh], quad_max(blk_max));
        // A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 sees -inf, not NaN.
        const float ref = new_max == -INFINITY ? 0.f : new_max;
        const float alpha = exp2f(row_max[ms][hh] - ref);
        row_max[ms][hh] = new_max;
        float blk_sum = 0.f;
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          sc[ms][n][2 * hh] = exp2f(sc[ms][n][2 * hh] - ref);
          sc[ms][n][2 * hh + 1] = exp2f(sc[ms][n][2 * hh + 1] - ref);
          blk_sum += sc[ms][n][2 * hh] + sc[ms][n][2 * hh + 1];
        }
        row_sum[ms][hh] = row_sum[ms][hh] * alpha + blk_sum;
#pragma unroll
        for (int n = 0; n < kDT; ++n) {
          o_acc[ms][n][2 * hh] *= alpha;
          o_acc[ms][n][2 * hh + 1] *= alpha;
        }
      }
    }
    GemmNN<T, kMS, kDT, kNT>::run(o_acc, sc, sV + stage * kCols * kLd, kLd);

    __syncthreads();  // every warp is done with this stage before the next iteration's prefetch refills it
    nb = next;
    stage ^= 1;
  }
  cp_async_wait<0>();

  // Epilogue: out = acc / l (0 for an empty row) and lse = (max + log2 l) * ln 2 (+inf for an empty row).
#pragma unroll
  for (int ms = 0; ms < kMS; ++ms) {
    float inv[2];
    float row_lse[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float l = quad_sum(row_sum[ms][hh]);
      inv[hh] = l > 0.f ? 1.f / l : 0.f;
      row_lse[hh] = l > 0.f ? (row_max[ms][hh] + log2f(l)) * kLn2 : INFINITY;
    }
    const int strip_row0 = warp_row0 + 16 * ms;
    const int rows_valid = s.len_q - strip_row0;
    store_rows<T, kDT>(o_acc[ms], inv, token_row<T>(out, b, h, s.q_tok0 + strip_row0), out.row, rows_valid);
    if (t == 0) {
      float* lse_strip = stats_row(lse, b, h, s.q_tok0 + strip_row0);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        if (g + 8 * hh < rows_valid) lse_strip[g + 8 * hh] = row_lse[hh];
      }
    }
  }
}

// One block of 256 threads per sequence b: key_extent[b] = 1 + the largest j with mask[b, j] != 0, else 0.
constexpr int kExtentThreads = 256;

__global__ void __launch_bounds__(kExtentThreads)
    attention_key_extent_kernel(const uint8_t* __restrict__ mask,  // (B, Sk)
                                int Sk, int* __restrict__ key_extent) {  // (B,)
  __shared__ int warp_max[kExtentThreads / kWarpSize];
  const uint8_t* row = mask + static_cast<int64_t>(blockIdx.x) * Sk;
  int extent = 0;
  for (int j = static_cast<int>(threadIdx.x); j < Sk; j += kExtentThreads) {
    if (row[j] != 0) extent = j + 1;  // j only grows, so the last hit is this thread's largest
  }
  extent = __reduce_max_sync(kFullMask, extent);
  if (threadIdx.x % kWarpSize == 0) warp_max[threadIdx.x / kWarpSize] = extent;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
#pragma unroll
    for (int w = 0; w < kExtentThreads / kWarpSize; ++w) total = max(total, warp_max[w]);
    key_extent[blockIdx.x] = total;
  }
}

// Launch configuration. fp16 / bf16: sequences of more than 64 queries take 128-query blocks of 4 warps
// with two 16-row strips each (every K / V fragment read from shared memory feeds two tensor-core products),
// against 64-key blocks (32 at D = 80, 96, to keep two strips of scores and outputs in registers); at D = 128
// two strips spill even so, and shorter sequences (CLIP: 50, 77 tokens) would waste half a block: both take
// 64-query blocks of one strip per warp and 64-key blocks. fp32: 64-query blocks of one strip, 32 keys per
// block, which keeps its twice-as-wide tiles within shared memory.
template <typename T, int D, int kWarps, int kStrips, int kCols>
cudaError_t launch_fwd(const AttentionProblem& p, const TokenTensor& q, const TokenTensor& k,
                       const TokenTensor& v, const TokenTensor& out, const RowStats& lse, cudaStream_t stream) {
  using Tile = FwdTile<T, D, kWarps, kStrips, kCols>;
  const int m_blocks = (p.max_seqlen_q + Tile::kRows - 1) / Tile::kRows;
  const int64_t grid = static_cast<int64_t>(m_blocks) * p.heads * p.batch;
  if (grid > kMaxGridX) return cudaErrorInvalidConfiguration;
  auto kernel = attention_fwd_kernel<T, D, kWarps, kStrips, kCols>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), Tile::kThreads, Tile::kSmemBytes, stream>>>(p, q, k, v, out, lse, m_blocks);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t fwd_for_head_dim(const AttentionProblem& p, const TokenTensor& q, const TokenTensor& k,
                             const TokenTensor& v, const TokenTensor& out, const RowStats& lse,
                             cudaStream_t stream) {
  if constexpr (IsF32<T>::value) {
    return launch_fwd<T, D, 4, 1, 32>(p, q, k, v, out, lse, stream);
  } else if constexpr (D == 128) {
    return launch_fwd<T, D, 4, 1, 64>(p, q, k, v, out, lse, stream);
  } else {
    if (p.max_seqlen_q <= 64) return launch_fwd<T, D, 4, 1, 64>(p, q, k, v, out, lse, stream);
    return launch_fwd<T, D, 4, 2, (D > 64 ? 32 : 64)>(p, q, k, v, out, lse, stream);
  }
}

}  // namespace
}  // namespace attn

bool attention_supports_head_dim(int64_t D) { return D == 32 || D == 64 || D == 80 || D == 96 || D == 128; }

cudaError_t attention_key_extent_launch(const AttentionProblem& problem, cudaStream_t stream) {
  if (problem.key_padding_mask == nullptr || problem.batch == 0) return cudaSuccess;
  attn::attention_key_extent_kernel<<<problem.batch, attn::kExtentThreads, 0, stream>>>(
      problem.key_padding_mask, problem.max_seqlen_k, problem.key_extent);
  return cudaGetLastError();
}

cudaError_t attention_fwd_launch(DType dtype, const AttentionProblem& problem, TokenTensor q, TokenTensor k,
                                 TokenTensor v, TokenTensor out, RowStats lse, cudaStream_t stream) {
  cudaError_t err = attention_key_extent_launch(problem, stream);
  if (err != cudaSuccess) return err;
  return attn::dispatch(dtype, problem.head_dim, [&](auto type_tag, auto head_dim) {
    using T = typename decltype(type_tag)::type;
    return attn::fwd_for_head_dim<T, decltype(head_dim)::value>(problem, q, k, v, out, lse, stream);
  });
}

}  // namespace cuda
}  // namespace ctxkern
