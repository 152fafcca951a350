// Fused attention backward, FlashAttention-2 algorithm: P = exp(scale * q k^T - lse) is recomputed from the
// forward's log-sum-exp, never stored. With dP = dO V^T, delta_i = rowsum(dO * O)_i and dS = P * (dP - delta):
//     dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.
// Two kernels, no atomics (deterministic, and dq is written straight in q's dtype):
//
// dq kernel: a CTA owns kRows = 16 * kWarps queries of one (b, h), warp w rows [16 w, 16 w + 16), lane (g, t)
//   rows g and g + 8 of the strip, exactly like the forward. It first computes delta for its rows (and writes
//   it to the delta workspace for the next kernel), then streams K and V blocks (double-buffered cp.async,
//   the same key range and padding skips as the forward) and accumulates dQ in registers.
// dk/dv kernel: a CTA owns kRows keys of one (b, h), warp w keys [16 w, 16 w + 16): the roles of queries and
//   keys are swapped, so the warp computes S^T = K Q^T and dP^T = V dO^T with its keys as rows, and both of
//   its products (P^T dO and dS^T Q) take the transposed probabilities straight from registers, with no
//   round trip through shared memory. It streams Q, dO, lse and delta blocks over the queries that can see
//   its keys (from the diagonal on when causal) and accumulates dK, dV in registers.
// S and dP are computed twice (once per kernel): 7 tile products instead of FlashAttention-2's 5, bought
// for determinism and the absence of an fp32 dq workspace.
#include "attention.h"

#include "attention_launch.cuh"
#include "attention_tile.cuh"

namespace ctxkern {
namespace cuda {
namespace attn {
namespace {

// Two stationary [kRows][kLd] tiles (Q, dO or K, V), then 2 stages of two streamed [kCols][kLd] tiles.
template <typename T, int D, int kWarps, int kCols>
struct BwdTile {
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = SmemRow<T, D>::kLd;
  static constexpr int kTileBytes = (2 * kRows + 4 * kCols) * kLd * static_cast<int>(sizeof(T));
};

// The dk/dv kernel adds 2 stages of kCols lse and delta values after the tiles.
template <typename T, int D, int kWarps, int kCols>
constexpr int dkdv_smem_bytes() {
  return BwdTile<T, D, kWarps, kCols>::kTileBytes + 4 * kCols * static_cast<int>(sizeof(float));
}

template <typename T, int D, int kWarps, int kCols>
__global__ void __launch_bounds__(32 * kWarps, 1)
    attention_bwd_dq_kernel(const AttentionProblem p, const TokenTensor q, const TokenTensor k, const TokenTensor v,
                            const TokenTensor out, const TokenTensor dout, const RowStats lse, const RowStats delta,
                            const TokenTensor dq, int m_blocks) {
  using Tile = BwdTile<T, D, kWarps, kCols>;
  constexpr int kRows = Tile::kRows;
  constexpr int kLd = Tile::kLd;
  constexpr int kNT = kCols / 8;
  constexpr int kDT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* sdO = sQ + kRows * kLd;                // [kRows][kLd]
  T* sK = sdO + kRows * kLd;                // [2][kCols][kLd]
  T* sV = sK + 2 * kCols * kLd;             // [2][kCols][kLd]

  const CtaIndex cta = cta_index(m_blocks, p.heads);
  const int m_block = m_blocks - 1 - cta.block;  // heaviest query blocks first, as in the forward
  const int h = cta.h;
  const int b = cta.b;
  const Sequence s = sequence_of(p, b);
  const int m0 = m_block * kRows;
  if (m0 >= s.len_q) return;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = m0 + 16 * warp;
  const int rows_valid = s.len_q - warp_row0;  // of the warp's strip; may be <= 0
  const T* k_seq = token_row<const T>(k, b, h, s.k_tok0);
  const T* v_seq = token_row<const T>(v, b, h, s.k_tok0);

  const int n_blocks = key_blocks_for_queries<kCols>(s, p.causal, m0, kRows);
  int nb = next_key_block<kCols>(s, 0, n_blocks);
  auto load_kv = [&](int block, int stage) {
    const int n0 = block * kCols;
    load_tile_async<T, kCols, D, Tile::kThreads>(sK + stage * kCols * kLd, k_seq + n0 * k.row, k.row, s.len_k - n0);
    load_tile_async<T, kCols, D, Tile::kThreads>(sV + stage * kCols * kLd, v_seq + n0 * v.row, v.row, s.len_k - n0);
  };
  if (nb < n_blocks) {
    load_tile_async<T, kRows, D, Tile::kThreads>(sQ, token_row<const T>(q, b, h, s.q_tok0 + m0), q.row,
                                                 s.len_q - m0);
    load_tile_async<T, kRows, D, Tile::kThreads>(sdO, token_row<const T>(dout, b, h, s.q_tok0 + m0), dout.row,
                                                 s.len_q - m0);
    load_kv(nb, 0);
  }
  cp_async_commit();

  // delta = rowsum(dO * O) for the warp's 16 rows (while the first tiles load): lanes split the head dim,
  // a warp sum gives every lane the row's total; lane (g, t) keeps rows g and g + 8.
  float row_delta[2] = {0.f, 0.f};
  {
    const T* o_strip = token_row<const T>(out, b, h, s.q_tok0 + warp_row0);
    const T* do_strip = token_row<const T>(dout, b, h, s.q_tok0 + warp_row0);
    float* delta_strip = stats_row(delta, b, h, s.q_tok0 + warp_row0);
    for (int r = 0; r < 16 && r < rows_valid; ++r) {
      float part = 0.f;
#pragma unroll
      for (int d = lane; d < D; d += kWarpSize) part += to_float(o_strip[r * out.row + d]) * to_float(do_strip[r * dout.row + d]);
      const float total = warp_sum(part);
      if (lane == 0) delta_strip[r] = total;
      if (r == g) row_delta[0] = total;
      if (r == g + 8) row_delta[1] = total;
    }
  }
  float row_lse[2];  // log2 units; rows past the sequence never reach a visible score
  {
    const float* lse_strip = stats_row(lse, b, h, s.q_tok0 + warp_row0);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) row_lse[hh] = g + 8 * hh < rows_valid ? lse_strip[g + 8 * hh] * kLog2e : 0.f;
  }

  const float scale_log2 = p.scale * kLog2e;
  float dq_acc[kDT][4];
  zero(dq_acc);
  int stage = 0;
  while (nb < n_blocks) {
    const int next = next_key_block<kCols>(s, nb + 1, n_blocks);
    if (next < n_blocks) load_kv(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int n0 = nb * kCols;
    const T* sK_s = sK + stage * kCols * kLd;
    float sc[kNT][4];
    float dp[kNT][4];
    zero(sc);
    zero(dp);
    GemmNT<T, 1, kNT, D>::run(one_strip(sc), sQ + 16 * warp * kLd, kLd, sK_s, kLd);
    GemmNT<T, 1, kNT, D>::run(one_strip(dp), sdO + 16 * warp * kLd, kLd, sV + stage * kCols * kLd, kLd);

    uint32_t bits[kCols / 32];
    key_bits(bits, s, n0);
    const bool unmasked = all_bits(bits) && (!p.causal || n0 + kCols - 1 <= warp_row0 + s.causal_offset);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * n + 2 * t + (e & 1);
        const int hh = e >> 1;
        const int row = warp_row0 + g + 8 * hh;
        const bool visible =
            unmasked || (((bits[n / 4] >> (8 * (n % 4) + c % 8)) & 1u) != 0 && (!p.causal || n0 + c <= row + s.causal_offset));
        const float prob = visible ? exp2f(sc[n][e] * scale_log2 - row_lse[hh]) : 0.f;
        sc[n][e] = prob * (dp[n][e] - row_delta[hh]);  // dS
      }
    }
    GemmNN<T, 1, kDT, kNT>::run(one_strip(dq_acc), one_strip(sc), sK_s, kLd);

    __syncthreads();
    nb = next;
    stage ^= 1;
  }
  cp_async_wait<0>();

  const float row_scale[2] = {p.scale, p.scale};
  store_rows<T, kDT>(dq_acc, row_scale, token_row<T>(dq, b, h, s.q_tok0 + warp_row0), dq.row, rows_valid);
}

template <typename T, int D, int kWarps, int kCols>
__global__ void __launch_bounds__(32 * kWarps, 1)
    attention_bwd_dkdv_kernel(const AttentionProblem p, const TokenTensor q, const TokenTensor k,
                              const TokenTensor v, const TokenTensor dout, const RowStats lse, const RowStats delta,
                              const TokenTensor dk, const TokenTensor dv, int n_blocks) {
  using Tile = BwdTile<T, D, kWarps, kCols>;
  constexpr int kRows = Tile::kRows;
  constexpr int kLd = Tile::kLd;
  constexpr int kNT = kCols / 8;
  constexpr int kDT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* sV = sK + kRows * kLd;                 // [kRows][kLd]
  T* sQ = sV + kRows * kLd;                 // [2][kCols][kLd]
  T* sdO = sQ + 2 * kCols * kLd;            // [2][kCols][kLd]
  float* sLse = reinterpret_cast<float*>(smem_raw + Tile::kTileBytes);  // [2][kCols], log2 units
  float* sDelta = sLse + 2 * kCols;                                     // [2][kCols]

  const CtaIndex cta = cta_index(n_blocks, p.heads);
  const int h = cta.h;
  const int b = cta.b;
  const Sequence s = sequence_of(p, b);
  const int n0 = cta.block * kRows;
  if (n0 >= s.len_k) return;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_key0 = n0 + 16 * warp;

  // Bit r of warp_bits: the warp's key warp_key0 + r (r < 16) is real.
  const int lane_key = warp_key0 + lane % 16;
  const bool lane_key_real =
      lane < 16 && lane_key < s.key_end && (s.key_mask == nullptr || s.key_mask[lane_key] != 0);
  const uint32_t warp_bits = __ballot_sync(kFullMask, lane_key_real);
  const bool any_key_real = __syncthreads_or(warp_bits != 0) != 0;

  // Query blocks that can see a real key of this CTA: all of them, or from the first key's diagonal on.
  const int mb_end = any_key_real ? (s.len_q + kCols - 1) / kCols : 0;
  int mb = 0;
  if (p.causal) {
    const int64_t first_query = static_cast<int64_t>(n0) - s.causal_offset;  // first i with n0 <= i + offset
    mb = first_query <= 0 ? 0 : static_cast<int>(first_query < s.len_q ? first_query / kCols : mb_end);
  }
  if (mb > mb_end) mb = mb_end;

  const T* q_seq = token_row<const T>(q, b, h, s.q_tok0);
  const T* do_seq = token_row<const T>(dout, b, h, s.q_tok0);
  const float* lse_seq = stats_row(lse, b, h, s.q_tok0);
  const float* delta_seq = stats_row(delta, b, h, s.q_tok0);
  auto load_queries = [&](int block, int stage) {
    const int i0 = block * kCols;
    load_tile_async<T, kCols, D, Tile::kThreads>(sQ + stage * kCols * kLd, q_seq + i0 * q.row, q.row, s.len_q - i0);
    load_tile_async<T, kCols, D, Tile::kThreads>(sdO + stage * kCols * kLd, do_seq + i0 * dout.row, dout.row,
                                                 s.len_q - i0);
    for (int c = static_cast<int>(threadIdx.x); c < kCols; c += Tile::kThreads) {
      const bool valid = i0 + c < s.len_q;
      sLse[stage * kCols + c] = valid ? lse_seq[i0 + c] * kLog2e : INFINITY;
      sDelta[stage * kCols + c] = valid ? delta_seq[i0 + c] : 0.f;
    }
  };
  if (mb < mb_end) {
    const T* k_blk = token_row<const T>(k, b, h, s.k_tok0 + n0);
    const T* v_blk = token_row<const T>(v, b, h, s.k_tok0 + n0);
    load_tile_async<T, kRows, D, Tile::kThreads>(sK, k_blk, k.row, s.len_k - n0);
    load_tile_async<T, kRows, D, Tile::kThreads>(sV, v_blk, v.row, s.len_k - n0);
    load_queries(mb, 0);
  }
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  const bool warp_all_real = warp_bits == 0xffffu;
  float dk_acc[kDT][4];
  float dv_acc[kDT][4];
  zero(dk_acc);
  zero(dv_acc);
  int stage = 0;
  for (; mb < mb_end; ++mb) {
    if (mb + 1 < mb_end) load_queries(mb + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int i0 = mb * kCols;
    const T* sQ_s = sQ + stage * kCols * kLd;
    const T* sdO_s = sdO + stage * kCols * kLd;
    const float* sLse_s = sLse + stage * kCols;
    const float* sDelta_s = sDelta + stage * kCols;
    float sc[kNT][4];  // S^T: the warp's keys x this block's queries
    float dp[kNT][4];  // dP^T
    zero(sc);
    zero(dp);
    GemmNT<T, 1, kNT, D>::run(one_strip(sc), sK + 16 * warp * kLd, kLd, sQ_s, kLd);
    GemmNT<T, 1, kNT, D>::run(one_strip(dp), sV + 16 * warp * kLd, kLd, sdO_s, kLd);

    const bool unmasked =
        warp_all_real && i0 + kCols <= s.len_q && (!p.causal || warp_key0 + 15 <= i0 + s.causal_offset);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * n + 2 * t + (e & 1);  // query i0 + c
        const int hh = e >> 1;
        const int key = warp_key0 + g + 8 * hh;
        const bool key_real = ((warp_bits >> (g + 8 * hh)) & 1u) != 0;
        const bool visible = unmasked || (key_real && i0 + c < s.len_q &&
                                          (!p.causal || key <= i0 + c + s.causal_offset));
        const float prob = visible ? exp2f(sc[n][e] * scale_log2 - sLse_s[c]) : 0.f;
        sc[n][e] = prob;
        dp[n][e] = prob * (dp[n][e] - sDelta_s[c]);  // dS^T
      }
    }
    GemmNN<T, 1, kDT, kNT>::run(one_strip(dv_acc), one_strip(sc), sdO_s, kLd);
    GemmNN<T, 1, kDT, kNT>::run(one_strip(dk_acc), one_strip(dp), sQ_s, kLd);

    __syncthreads();
    stage ^= 1;
  }
  cp_async_wait<0>();

  const int rows_valid = s.len_k - warp_key0;
  const float k_scale[2] = {p.scale, p.scale};
  const float one[2] = {1.f, 1.f};
  store_rows<T, kDT>(dk_acc, k_scale, token_row<T>(dk, b, h, s.k_tok0 + warp_key0), dk.row, rows_valid);
  store_rows<T, kDT>(dv_acc, one, token_row<T>(dv, b, h, s.k_tok0 + warp_key0), dv.row, rows_valid);
}

// fp16 / bf16: 64-query dq blocks against 64-key blocks; 64-key dk/dv blocks against 64-query blocks (32
// for D > 64, which keeps dK, dV, S^T and dP^T in registers without spilling). fp32: 32-wide streamed blocks
// (16 queries for the dk/dv kernel at D > 64), which keeps its twice-as-wide tiles within shared memory.
template <typename T, int D>
struct BwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kDqCols = IsF32<T>::value ? 32 : 64;
  static constexpr int kDkvCols = IsF32<T>::value ? (D > 64 ? 16 : 32) : (D > 64 ? 32 : 64);
};

template <typename T, int D>
cudaError_t bwd_for_head_dim(const AttentionProblem& p, const TokenTensor& q, const TokenTensor& k,
                             const TokenTensor& v, const TokenTensor& out, const TokenTensor& dout,
                             const RowStats& lse, const RowStats& delta, const TokenTensor& dq, const TokenTensor& dk,
                             const TokenTensor& dv, cudaStream_t stream) {
  using Cfg = BwdConfig<T, D>;
  using DqTile = BwdTile<T, D, Cfg::kWarps, Cfg::kDqCols>;
  using DkvTile = BwdTile<T, D, Cfg::kWarps, Cfg::kDkvCols>;

  const int m_blocks = (p.max_seqlen_q + DqTile::kRows - 1) / DqTile::kRows;
  const int64_t dq_grid = static_cast<int64_t>(m_blocks) * p.heads * p.batch;
  const int n_blocks = (p.max_seqlen_k + DkvTile::kRows - 1) / DkvTile::kRows;
  const int64_t dkv_grid = static_cast<int64_t>(n_blocks) * p.heads * p.batch;
  if (dq_grid > kMaxGridX || dkv_grid > kMaxGridX) return cudaErrorInvalidConfiguration;

  // The dq kernel also writes delta, which the dk/dv kernel reads: same stream, so it runs first in full.
  auto dq_kernel = attention_bwd_dq_kernel<T, D, Cfg::kWarps, Cfg::kDqCols>;
  cudaError_t err =
      cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DqTile::kTileBytes);
  if (err != cudaSuccess) return err;
  dq_kernel<<<static_cast<unsigned>(dq_grid), DqTile::kThreads, DqTile::kTileBytes, stream>>>(
      p, q, k, v, out, dout, lse, delta, dq, m_blocks);
  err = cudaGetLastError();
  if (err != cudaSuccess || n_blocks == 0) return err;

  auto dkv_kernel = attention_bwd_dkdv_kernel<T, D, Cfg::kWarps, Cfg::kDkvCols>;
  constexpr int kDkvSmem = dkdv_smem_bytes<T, D, Cfg::kWarps, Cfg::kDkvCols>();
  err = cudaFuncSetAttribute(dkv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kDkvSmem);
  if (err != cudaSuccess) return err;
  dkv_kernel<<<static_cast<unsigned>(dkv_grid), DkvTile::kThreads, kDkvSmem, stream>>>(
      p, q, k, v, dout, lse, delta, dk, dv, n_blocks);
  return cudaGetLastError();
}

}  // namespace
}  // namespace attn

cudaError_t attention_bwd_launch(DType dtype, const AttentionProblem& problem, TokenTensor q, TokenTensor k,
                                 TokenTensor v, TokenTensor out, TokenTensor dout, RowStats lse, RowStats delta,
                                 TokenTensor dq, TokenTensor dk, TokenTensor dv, cudaStream_t stream) {
  cudaError_t err = attention_key_extent_launch(problem, stream);
  if (err != cudaSuccess) return err;
  return attn::dispatch(dtype, problem.head_dim, [&](auto type_tag, auto head_dim) {
    using T = typename decltype(type_tag)::type;
    return attn::bwd_for_head_dim<T, decltype(head_dim)::value>(problem, q, k, v, out, dout, lse, delta, dq, dk,
                                                                 dv, stream);
  });
}

}  // namespace cuda
}  // namespace ctxkern
