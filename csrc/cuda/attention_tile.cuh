// Warp-level building blocks of the attention kernels: cp.async tile loads, the two tile products every
// kernel is made of, and the per-sequence geometry. Torch-free.
//
// Every product works on the fragment layout of mma.sync m16n8k16: per 16-row strip of a warp (a warp owns
// one or more), an accumulator "acc[NT][4]" holds the strip's 16 x (8 NT) fp32 results, lane = 4 g + t owning
//     acc[n][0..1] = rows g,     columns 8 n + 2 t, 8 n + 2 t + 1
//     acc[n][2..3] = rows g + 8, the same columns.
// The fp32 path (T = float) keeps exactly this layout but computes it with CUDA-core FMAs, so the kernels
// themselves are written once for all three storage types.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention.h"
#include "common.cuh"

namespace ctxkern {
namespace cuda {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// Shared-memory tiles are row-major with kLd = D + 16 bytes of padding per row: consecutive rows then start
// 4 banks apart (mod 32), so the 8 row addresses of an ldmatrix phase, and the rows a quad reads on the fp32
// path, fall in distinct banks for every supported D.
template <typename T, int D>
struct SmemRow {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLd = D + kPad;
};

// ---------------------------------------------------------------------------------------------------------
// cp.async: 16-byte global -> shared copies that bypass registers, grouped so a stage can be waited for.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes, or writes 16 zero bytes (src is then not read) when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ROWS x D tile from global rows g_tile[r * g_row] into smem[r * kLd], by all THREADS threads of the block;
// rows >= rows_valid are zero-filled (zeros, not stale data: a masked probability of 0 times a stale NaN
// would still be NaN). Row 0 must be a readable row whenever rows_valid > 0.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* g_tile, int64_t g_row, int rows_valid) {
  constexpr int kLd = SmemRow<T, D>::kLd;
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = D / kChunk;
  for (int c = static_cast<int>(threadIdx.x); c < ROWS * kChunksPerRow; c += THREADS) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kChunk;
    const bool valid = r < rows_valid;
    const T* src = valid ? g_tile + r * g_row + col : g_tile;
    cp_async_16(smem + r * kLd + col, src, valid);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core primitives (fp16 / bf16).

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// acc (16 x 8, fp32) += a (16 x 16) * b (16 x 8); a and b in the mma.sync fragment layout.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values rounded to T and packed, lo in the low 16 bits (the lower column of an A fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ---------------------------------------------------------------------------------------------------------
// The two tile products. Both are warp-collective (all 32 lanes, converged). A warp may own MS 16-row strips
// (rows [16 s, 16 s + 16) of its A operand for strip s): every B fragment loaded from shared memory then
// feeds MS tensor-core products instead of one, which halves the shared-memory traffic per flop at MS = 2.

// "NT" product, A from shared memory: acc[s] (16 x 8 NT) += A_s (16 x K) * B^T, where
//   sA: the warp's 16 MS rows, row-major, row stride lda;  sB: 8 NT rows of K, row-major, row stride ldb
// (so B's column n is sB's row n: q k^T with keys as sB's rows). K % 16 == 0, NT even.
template <typename T, int MS, int NT, int K>
struct GemmNT {
  static __device__ __forceinline__ void run(float (&acc)[MS][NT][4], const T* sA, int lda, const T* sB,
                                             int ldb) {
    static_assert(K % 16 == 0 && NT % 2 == 0, "mma tiles are 16 deep and loaded two n-tiles at a time");
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    // ldmatrix row addresses: A matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in a0..a3 order;
    // B matrices (n-tile 0: k 0-7, k 8-15; n-tile 1: k 0-7, k 8-15).
    const T* a_lane = sA + (lane % 16) * lda + (lane / 16) * 8;
    const T* b_lane = sB + ((lane % 8) + (lane / 16) * 8) * ldb + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t a[MS][4];
#pragma unroll
      for (int s = 0; s < MS; ++s) ldmatrix_x4(a[s], a_lane + 16 * s * lda + kk * 16);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, b_lane + np * 16 * ldb + kk * 16);
#pragma unroll
        for (int s = 0; s < MS; ++s) {
          mma_16816<T>(acc[s][2 * np], a[s], b[0], b[1]);
          mma_16816<T>(acc[s][2 * np + 1], a[s], b[2], b[3]);
        }
      }
    }
  }
};

// fp32 inputs: the same contract, on CUDA cores. Lane (g, t) needs rows g and g + 8 of A and rows 8 n + 2 t
// and 8 n + 2 t + 1 of sB; K is walked four floats at a time (the rows are 16-byte aligned).
template <int MS, int NT, int K>
struct GemmNT<float, MS, NT, K> {
  static __device__ __forceinline__ void run(float (&acc)[MS][NT][4], const float* sA, int lda, const float* sB,
                                             int ldb) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int g = lane / 4;
    const int t = lane % 4;
#pragma unroll
    for (int s = 0; s < MS; ++s) {
      const float* sA_s = sA + 16 * s * lda;
#pragma unroll 2
      for (int k = 0; k < K; k += 4) {
        const float4 a0 = *reinterpret_cast<const float4*>(sA_s + g * lda + k);
        const float4 a1 = *reinterpret_cast<const float4*>(sA_s + (g + 8) * lda + k);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const float4 b0 = *reinterpret_cast<const float4*>(sB + (8 * n + 2 * t) * ldb + k);
          const float4 b1 = *reinterpret_cast<const float4*>(sB + (8 * n + 2 * t + 1) * ldb + k);
          acc[s][n][0] += a0.x * b0.x + a0.y * b0.y + a0.z * b0.z + a0.w * b0.w;
          acc[s][n][1] += a0.x * b1.x + a0.y * b1.y + a0.z * b1.z + a0.w * b1.w;
          acc[s][n][2] += a1.x * b0.x + a1.y * b0.y + a1.z * b0.z + a1.w * b0.w;
          acc[s][n][3] += a1.x * b1.x + a1.y * b1.y + a1.z * b1.z + a1.w * b1.w;
        }
      }
    }
  }
};

// "NN" product, A from registers: acc[s] (16 x 8 NT) += P_s (16 x 8 KT) * B, where P_s is an fp32
// accumulator of the warp (probabilities or dS, rounded to T here) and sB holds B row-major: 8 KT rows of
// 8 NT columns, row stride ldb (p v with keys as sB's rows). KT, NT even.
template <typename T, int MS, int NT, int KT>
struct GemmNN {
  static __device__ __forceinline__ void run(float (&acc)[MS][NT][4], const float (&p)[MS][KT][4], const T* sB,
                                             int ldb) {
    static_assert(KT % 2 == 0 && NT % 2 == 0, "mma tiles are 16 deep and loaded two n-tiles at a time");
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    // Transposed ldmatrix: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
    const T* b_lane = sB + (lane % 16) * ldb + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
      // Accumulator tiles 2 kk and 2 kk + 1 are exactly the A fragment of k-step kk.
      uint32_t a[MS][4];
#pragma unroll
      for (int s = 0; s < MS; ++s) {
        a[s][0] = pack2<T>(p[s][2 * kk][0], p[s][2 * kk][1]);
        a[s][1] = pack2<T>(p[s][2 * kk][2], p[s][2 * kk][3]);
        a[s][2] = pack2<T>(p[s][2 * kk + 1][0], p[s][2 * kk + 1][1]);
        a[s][3] = pack2<T>(p[s][2 * kk + 1][2], p[s][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, b_lane + kk * 16 * ldb + np * 16);
#pragma unroll
        for (int s = 0; s < MS; ++s) {
          mma_16816<T>(acc[s][2 * np], a[s], b[0], b[1]);
          mma_16816<T>(acc[s][2 * np + 1], a[s], b[2], b[3]);
        }
      }
    }
  }
};

// fp32 inputs: P's row g lives in the quad of lane g's group, so each P value is fetched from the lane that
// owns it with a shuffle (the register index is a compile-time constant: every lane shuffles the same one).
template <int MS, int NT, int KT>
struct GemmNN<float, MS, NT, KT> {
  static __device__ __forceinline__ void run(float (&acc)[MS][NT][4], const float (&p)[MS][KT][4],
                                             const float* sB, int ldb) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int g = lane / 4;
    const int t = lane % 4;
#pragma unroll
    for (int s = 0; s < MS; ++s) {
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
        for (int kc = 0; kc < 8; ++kc) {
          const int owner = g * 4 + kc / 2;  // lane holding columns 8 kt + kc of rows g and g + 8
          const float p_g = __shfl_sync(kFullMask, p[s][kt][kc % 2], owner);
          const float p_g8 = __shfl_sync(kFullMask, p[s][kt][2 + kc % 2], owner);
          const float* b_row = sB + (8 * kt + kc) * ldb + 2 * t;
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const float2 b = *reinterpret_cast<const float2*>(b_row + 8 * n);
            acc[s][n][0] += p_g * b.x;
            acc[s][n][1] += p_g * b.y;
            acc[s][n][2] += p_g8 * b.x;
            acc[s][n][3] += p_g8 * b.y;
          }
        }
      }
    }
  }
};

// One-strip views of single-strip accumulators, for the callers that own one strip per warp.
template <int NT>
__device__ __forceinline__ float (&one_strip(float (&acc)[NT][4]))[1][NT][4] {
  return reinterpret_cast<float(&)[1][NT][4]>(acc);
}
template <int NT>
__device__ __forceinline__ const float (&one_strip(const float (&acc)[NT][4]))[1][NT][4] {
  return reinterpret_cast<const float(&)[1][NT][4]>(acc);
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  }
}

// Max / sum over the 4 lanes of a quad (the lanes sharing a row); every lane gets the same bits.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

// Rows [row0, row0 + 16) of the warp's accumulator, times row_scale[h] for rows g + 8 h, stored as T into
// a token operand (row stride g_row elements); only rows < rows_valid are written.
template <typename T, int NT>
__device__ __forceinline__ void store_rows(const float (&acc)[NT][4], const float (&row_scale)[2], T* g_strip,
                                           int64_t g_row, int rows_valid) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    if (r >= rows_valid) continue;
    T* dst = g_strip + r * g_row + 2 * t;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      Pack<T, 2> pair;
      pair.v[0] = from_float<T>(acc[n][2 * h] * row_scale[h]);
      pair.v[1] = from_float<T>(acc[n][2 * h + 1] * row_scale[h]);
      *reinterpret_cast<Pack<T, 2>*>(dst + 8 * n) = pair;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Geometry of one sequence (batch entry) of an AttentionProblem.

struct Sequence {
  int64_t q_tok0;  // first token of the sequence in q / out (0 when dense)
  int64_t k_tok0;  // first token in k / v
  int len_q;
  int len_k;
  int key_end;     // keys >= key_end are padding: 1 + the last real key, len_k without a mask
  const uint8_t* key_mask;  // (len_k,) row of the padding mask, or nullptr
  int causal_offset;        // len_k - len_q: query i sees key j <= i + causal_offset
};

__device__ __forceinline__ Sequence sequence_of(const AttentionProblem& p, int b) {
  Sequence s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_tok0 = p.cu_seqlens_q[b];
    s.k_tok0 = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.len_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    s.key_end = s.len_k;
    s.key_mask = nullptr;
  } else {
    s.q_tok0 = 0;
    s.k_tok0 = 0;
    s.len_q = p.max_seqlen_q;
    s.len_k = p.max_seqlen_k;
    s.key_mask = p.key_padding_mask != nullptr
                     ? p.key_padding_mask + static_cast<int64_t>(b) * p.max_seqlen_k
                     : nullptr;
    s.key_end = s.key_mask != nullptr ? p.key_extent[b] : s.len_k;
  }
  s.causal_offset = s.len_k - s.len_q;
  return s;
}

// What a CTA of a 1-D attention grid owns: row block `block` (of `blocks`) of head h of sequence b. The
// launchers' grid is blocks * heads * batch CTAs, the blocks of one (b, h) consecutive, so CTAs that run side
// by side share b and h, and with them the operands they stream, in L2.
struct CtaIndex {
  int block;
  int h;
  int b;
};

__device__ __forceinline__ CtaIndex cta_index(int blocks, int heads) {
  const int64_t bid = blockIdx.x;
  CtaIndex c;
  c.block = static_cast<int>(bid % blocks);
  c.h = static_cast<int>((bid / blocks) % heads);
  c.b = static_cast<int>(bid / (static_cast<int64_t>(blocks) * heads));
  return c;
}

// First row of (b, h) of a token operand, at sequence token `first`.
template <typename T>
__device__ __forceinline__ T* token_row(const TokenTensor& x, int b, int h, int64_t tok) {
  return static_cast<T*>(x.data) + b * x.batch + h * x.head + tok * x.row;
}

__device__ __forceinline__ float* stats_row(const RowStats& s, int b, int h, int64_t tok) {
  return s.data + b * s.batch + h * s.head + tok;
}

// Bit c of bits[c / 32] = key n0 + c is real (below key_end and, with a mask, marked true), c < 32 WORDS.
// Warp-collective; every warp of a block computes the same words.
template <int WORDS>
__device__ __forceinline__ void key_bits(uint32_t (&bits)[WORDS], const Sequence& s, int n0) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
#pragma unroll
  for (int w = 0; w < WORDS; ++w) {
    const int j = n0 + 32 * w + lane;
    const bool real = j < s.key_end && (s.key_mask == nullptr || s.key_mask[j] != 0);
    bits[w] = __ballot_sync(kFullMask, real);
  }
}

template <int WORDS>
__device__ __forceinline__ bool any_bit(const uint32_t (&bits)[WORDS]) {
  uint32_t any = 0;
#pragma unroll
  for (int w = 0; w < WORDS; ++w) any |= bits[w];
  return any != 0;
}

template <int WORDS>
__device__ __forceinline__ bool all_bits(const uint32_t (&bits)[WORDS]) {
  uint32_t all = kFullMask;
#pragma unroll
  for (int w = 0; w < WORDS; ++w) all &= bits[w];
  return all == kFullMask;
}

// The first key block >= nb (blocks of COLS keys, below n_blocks) that holds a real key, or n_blocks.
// Without a mask every block below key_end qualifies; with one, blocks of padding only are skipped.
template <int COLS>
__device__ __forceinline__ int next_key_block(const Sequence& s, int nb, int n_blocks) {
  if (s.key_mask == nullptr) return nb;
  for (; nb < n_blocks; ++nb) {
    uint32_t bits[COLS / 32];
    key_bits(bits, s, nb * COLS);
    if (any_bit(bits)) break;
  }
  return nb;
}

// Key blocks [0, n_blocks) that queries [m0, m0 + rows) may see: bounded by the last real key and, when
// causal, by the last query's diagonal.
template <int COLS>
__device__ __forceinline__ int key_blocks_for_queries(const Sequence& s, bool causal, int m0, int rows) {
  int64_t key_hi = s.key_end;
  if (causal) {
    const int64_t last_query = static_cast<int64_t>(m0) + rows - 1 < s.len_q - 1
                                   ? static_cast<int64_t>(m0) + rows - 1
                                   : s.len_q - 1;
    const int64_t diag_hi = last_query + s.causal_offset + 1;  // keys < diag_hi are seen by the last query
    if (diag_hi < key_hi) key_hi = diag_hi;
  }
  if (key_hi <= 0) return 0;
  return static_cast<int>((key_hi + COLS - 1) / COLS);
}

}  // namespace attn
}  // namespace cuda
}  // namespace ctxkern
