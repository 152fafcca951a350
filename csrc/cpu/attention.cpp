// Attention (dense with key padding mask, causal, variable-length), forward and backward, on the CPU.
//
// Forward (FlashAttention): one task owns a block of kForwardQueryBlock query rows of one (sequence, head). It walks
// the sequence's key chunks (blocks of kKeyBlock keys), computing the score tile S = scale * Q K^T, updating
// each row's running max and sum (online softmax) and accumulating P V into an fp32 (rows, D) accumulator, so
// no thread ever holds more than one (kForwardQueryBlock, kKeyBlock) tile of scores: memory is O(S * D).
// Backward (FlashAttention-2): one task owns one (sequence, head). For each key chunk it recomputes P from the
// saved log-sum-exp block by block of queries and accumulates dK, dV of the chunk and dQ of the whole sequence
// in fp32; owning the whole head makes every gradient a single thread's, so there are no atomic adds and the
// result does not depend on the schedule.
// Padding is skipped, not masked: each key block is trimmed to the span of its real keys, and a block with
// none is dropped; only a chunk with padding inside its span adds the mask (0 / -inf). Causality
// skips the key chunks no row of the query block may see and masks only the chunks on the diagonal.
// Threads claim tasks one at a time, so uneven work (causal, variable lengths) is spread evenly.
// fp16/bf16 rows are widened to fp32 tile by tile; every product and sum runs in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "../attention_checks.h"
#include "attention_microkernel.h"
#include "attention_tile.h"

namespace ctxkern {
namespace {

// The forward's query block is twice the backward's: each block packs K^T once per key chunk for the
// microkernel, and at S = 128 one block per head packs it once.
constexpr int64_t kForwardQueryBlock = 128;
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 128;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Keys [lo, hi) of one key block: its first to last real key, the span rounded up to whole vectors where the
// block has room. `padded`: some key inside is padding.
struct KeyChunk {
  int64_t lo, hi;
  bool padded;
};

// The key chunks of every sequence of a batch, and the padding mask as an additive bias.
struct KeyPlan {
  std::vector<KeyChunk> chunks;  // sequence b's chunks are chunks[start[b], start[b + 1]), in key order
  std::vector<int64_t> start;    // (B + 1,)
  std::vector<float> bias;       // (B, Sk) 0 for a real key, -inf for padding; empty without a mask

  // Appends the chunks of a sequence of sk keys; `mask` (sk,) true = real key, or null (all real).
  void add_sequence(const bool* mask, int64_t sk) {
    if (start.empty()) start.push_back(0);
    for (int64_t block = 0; block < sk; block += kKeyBlock) {
      int64_t lo = block, hi = std::min(sk, block + kKeyBlock);
      if (mask) {
        while (lo < hi && !mask[lo]) ++lo;
        while (hi > lo && !mask[hi - 1]) --hi;
      }
      if (lo == hi) continue;
      // BLAS runs a whole number of vectors faster than a ragged tail: a few padding keys more, masked, cost less.
      hi = std::min(std::min(sk, block + kKeyBlock), lo + (hi - lo + kVec - 1) / kVec * kVec);
      bool padded = false;
      for (int64_t j = lo; mask && j < hi; ++j) padded |= !mask[j];
      chunks.push_back({lo, hi, padded});
    }
    start.push_back(static_cast<int64_t>(chunks.size()));
  }
};

// One (sequence, head): its rows in every tensor. Row i of q is q + i * q_ld, and so on. Unused outputs
// (the forward's gradients, the backward's out) are null.
template <typename T>
struct Head {
  const T* q;  // (sq, D)
  const T* k;  // (sk, D)
  const T* v;  // (sk, D)
  int64_t q_ld, k_ld, v_ld;
  int64_t sq, sk;
  const KeyChunk* chunks;  // (n_chunks,)
  int64_t n_chunks;
  const float* key_bias;  // (sk,) or null
  T* out;                 // (sq, D), the forward's output; the backward reads it
  int64_t out_ld;
  float* lse;     // (sq,)
  const T* dout;  // (sq, D)
  int64_t dout_ld;
  T* dq;  // (sq, D), zero-initialized
  T* dk;  // (sk, D), zero-initialized
  T* dv;  // (sk, D), zero-initialized
  int64_t dq_ld, dkv_ld;
};

// Which tile product the kernels use: MKL's sgemm_ (attention_tile.h's matmul) or the register-blocked
// microkernel (attention_microkernel.h). Measured side by side on a quiet machine, two threads
// (benchmarks/cpu_attention_gemm.py, README "CPU attention: the tile products"), the microkernel was
// 1.02-1.28x sgemm_'s speed from 128 keys on (forward and backward, D = 32 to 128) and at S = 8, and
// 0.82-0.94x at S = 32, where a packed K^T serves only 32 query rows: so auto takes it from kMicroMinKeys keys
// on, sgemm_ below, and the microkernel everywhere when torch does not export sgemm_.
// CTXKERN_CPU_ATTENTION_GEMM=blas|microkernel forces one, for that benchmark and the tests.
constexpr int64_t kMicroMinKeys = 64;

inline bool use_microkernel(int64_t max_keys) {
  const char* choice = std::getenv("CTXKERN_CPU_ATTENTION_GEMM");
  if (choice == nullptr || std::strcmp(choice, "auto") == 0) return sgemm_ == nullptr || max_keys >= kMicroMinKeys;
  if (std::strcmp(choice, "microkernel") == 0) return true;
  TORCH_CHECK(std::strcmp(choice, "blas") == 0, "CTXKERN_CPU_ATTENTION_GEMM must be auto, blas or microkernel, not '",
              choice, "'");
  return false;
}

// Shared by both passes: the attention's scale and causality, the head dim, and the tile product.
struct Params {
  int64_t d;
  float scale;
  bool causal;
  bool micro;  // use_microkernel(the most keys a sequence has)
};

// C (m, n) = alpha * op(A) B + beta * C, B row-major (k, n).
inline void product(const Params& p, bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (p.micro) {
    micro_gemm(trans_a, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    matmul(trans_a, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

// The B^T operand of a product with B (n, D) rows (K of Q K^T, V of dO V^T): the microkernel reads it packed
// transposed (D, n) into `packed`, once per key chunk; sgemm reads the rows as they are.
struct TransposedOperand {
  Rows rows;
  const float* packed;  // (D, n), or null on the sgemm path
};

inline TransposedOperand transposed_operand(const Params& p, Rows rows, int64_t n, float* packed) {
  if (!p.micro) return {rows, nullptr};
  pack_transposed(rows.data, rows.ld, n, p.d, packed, n);
  return {rows, packed};
}

// C (m, n) = alpha * A B^T (beta 0), A (m, D) rows.
inline void product_bt(const Params& p, int64_t m, int64_t n, float alpha, Rows a, const TransposedOperand& b,
                       float* c, int64_t ldc) {
  if (b.packed) {
    micro_gemm(false, m, n, p.d, alpha, a.data, a.ld, b.packed, n, 0.f, c, ldc);
  } else {
    matmul(false, true, m, n, p.d, alpha, a.data, a.ld, b.rows.data, b.rows.ld, 0.f, c, ldc);
  }
}

// Sets the masked scores of a (m, n) tile of rows i0.. and keys lo.. to -inf: padding (bias) and, when
// `causal_cut`, the keys past row i's last visible key i + offset.
inline void mask_tile(float* scores, int64_t m, int64_t n, const float* bias, bool causal_cut, int64_t i0,
                      int64_t lo, int64_t offset) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = scores + r * kKeyBlock;
    if (bias) mask_row(row, bias, n);
    if (causal_cut) {
      const int64_t first_hidden = std::clamp<int64_t>(i0 + r + offset + 1 - lo, 0, n);
      std::fill(row + first_hidden, row + n, kNegInf);
    }
  }
}

// One thread's tiles, allocated once per parallel task.
struct ForwardScratch {
  std::vector<float> q, k, v;  // fp32 staging of fp16/bf16 rows: (kForwardQueryBlock, D), (kKeyBlock, D) x 2
  std::vector<float> kt;       // (D, kKeyBlock): K^T packed for the microkernel
  std::vector<float> scores;   // (kForwardQueryBlock, kKeyBlock)
  std::vector<float> acc;      // (kForwardQueryBlock, D)
  std::vector<float> max, sum;  // (kForwardQueryBlock,)
  explicit ForwardScratch(int64_t d)
      : q(kForwardQueryBlock * d), k(kKeyBlock * d), v(kKeyBlock * d), kt(d * kKeyBlock),
        scores(kForwardQueryBlock * kKeyBlock), acc(kForwardQueryBlock * d), max(kForwardQueryBlock),
        sum(kForwardQueryBlock) {}
};

// Rows of a tile whose maxima are found before their exponentials: the max reductions of a group, independent
// of each other, overlap in the core, where one row at a time made each row's exponentials wait for its max
// (16 rows: 4-8% less forward time at S 128 than one).
constexpr int64_t kMaxGroup = 16;

// The online softmax's update for one stored (m, n) tile of masked scores (row stride kKeyBlock): each row's
// running max and sum, its acc rescaled when the max grows, and the scores replaced by P = exp(S - max).
// Row r also issues its share of the prefetches in `ahead`.
template <size_t N>
inline void online_softmax_update(float* scores, int64_t m, int64_t n, int64_t d, ForwardScratch& s,
                                  const std::array<RowPrefetch, N>& ahead) {
  for (int64_t r0 = 0; r0 < m; r0 += kMaxGroup) {
    const int64_t group = std::min(kMaxGroup, m - r0);
    float group_max[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) group_max[g] = row_max(scores + (r0 + g) * kKeyBlock, n);
    for (int64_t r = r0; r < r0 + group; ++r) {
      for (const RowPrefetch& rows : ahead) rows.issue(r, m);
      float* row = scores + r * kKeyBlock;
      // std::max drops a NaN second argument, so new_max is never NaN; a NaN score makes the sum NaN below.
      const float old_max = s.max[r], new_max = std::max(old_max, group_max[r - r0]);
      if (new_max == kNegInf) {  // no visible key yet, or only NaN scores: p = 0 for -inf, NaN stays NaN
        bool has_nan = false;
        for (int64_t j = 0; j < n; ++j) {
          has_nan |= std::isnan(row[j]);
          row[j] = std::isnan(row[j]) ? row[j] : 0.f;
        }
        if (has_nan) s.sum[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float row_sum = exp_shifted<true>(row, n, new_max);
      if (old_max != new_max && old_max != kNegInf) {
        const float correction = std::exp(old_max - new_max);
        s.sum[r] *= correction;
        scale_row(s.acc.data() + r * d, d, correction);
      }
      s.sum[r] += row_sum;
      s.max[r] = new_max;
    }
  }
}

// Forward of query rows [i0, i0 + m) of one head: out rows and their lse. `next` (or null): the head of the
// task this thread will probably run next, whose query rows [next_i0, next_i0 + m) and first key chunk are
// prefetched during the last chunk's softmax (each earlier chunk's softmax prefetches the following chunk).
template <typename T>
void forward_block(const Head<T>& hd, int64_t i0, int64_t m, const Params& p, ForwardScratch& s,
                   const Head<T>* next, int64_t next_i0) {
  const int64_t d = p.d, offset = hd.sk - hd.sq;  // causal: row i sees keys j <= i + offset
  // Keys from key_end on are hidden from every row of the block.
  const int64_t key_end = p.causal ? std::clamp<int64_t>(i0 + m + offset, 0, hd.sk) : hd.sk;
  const Rows q = stage_rows(hd.q + i0 * hd.q_ld, hd.q_ld, m, d, s.q.data());
  std::fill(s.max.begin(), s.max.begin() + m, kNegInf);
  std::fill(s.sum.begin(), s.sum.begin() + m, 0.f);
  float* scores = s.scores.data();

  // The first chunk's P V overwrites acc (beta 0), so acc needs no zeroing; a row no chunk reaches has sum 0
  // and is written as zeros below without reading it.
  for (int64_t c = 0; c < hd.n_chunks && hd.chunks[c].lo < key_end; ++c) {
    const KeyChunk& ch = hd.chunks[c];
    const int64_t n = ch.hi - ch.lo;
    const Rows k = stage_rows(hd.k + ch.lo * hd.k_ld, hd.k_ld, n, d, s.k.data());
    Rows v = stage_rows(hd.v + ch.lo * hd.v_ld, hd.v_ld, n, d, s.v.data());
    // Only V's padding rows meet p = 0 (in P V): the mask overwrites the padding keys' scores.
    if (ch.padded) v = zero_nonfinite_padding(v, n, d, hd.key_bias + ch.lo, s.v.data());
    product_bt(p, m, n, p.scale, q, transposed_operand(p, k, n, s.kt.data()), scores, kKeyBlock);
    mask_tile(scores, m, n, ch.padded ? hd.key_bias + ch.lo : nullptr, p.causal && ch.hi - 1 > i0 + offset, i0,
              ch.lo, offset);
    std::array<RowPrefetch, 4> ahead{};  // the next chunk's K and V, or the next task's Q, K, V and our out rows
    const bool last = c + 1 == hd.n_chunks || hd.chunks[c + 1].lo >= key_end;
    const Head<T>* upcoming = last ? next : &hd;
    const KeyChunk* upcoming_chunk = last ? (next && next->n_chunks > 0 ? next->chunks : nullptr) : &hd.chunks[c + 1];
    if (upcoming_chunk) {
      const int64_t rows = upcoming_chunk->hi - upcoming_chunk->lo;
      ahead[0] = RowPrefetch::of(upcoming->k + upcoming_chunk->lo * upcoming->k_ld, upcoming->k_ld, rows, d);
      ahead[1] = RowPrefetch::of(upcoming->v + upcoming_chunk->lo * upcoming->v_ld, upcoming->v_ld, rows, d);
    }
    if (last) {
      if (next && next_i0 < next->sq) {
        ahead[2] = RowPrefetch::of(next->q + next_i0 * next->q_ld, next->q_ld, std::min(m, next->sq - next_i0), d);
      }
      ahead[3] = RowPrefetch::of(hd.out + i0 * hd.out_ld, hd.out_ld, m, d, /*write=*/true);
    }
    online_softmax_update(scores, m, n, d, s, ahead);
    product(p, false, m, d, n, 1.f, scores, kKeyBlock, v.data, v.ld, c == 0 ? 0.f : 1.f, s.acc.data(), d);
  }

  // sum is 0 exactly when the row saw no key (the max score adds exp(0) = 1), and NaN if a score was NaN.
  finish_rows(s.max.data(), s.sum.data(), m, hd.lse + i0);  // sum becomes 1 / sum
  for (int64_t r = 0; r < m; ++r) {
    T* out_row = hd.out + (i0 + r) * hd.out_ld;
    // 1 / sum is +inf exactly when the row saw no key. Not lse: a row whose max score is +inf (an inf in q or k)
    // has lse +inf too, and its output is acc / sum, NaN as torch's.
    if (s.sum[r] != kInf) {
      store_scaled(s.acc.data() + r * d, s.sum[r], out_row, d);
    } else {  // the row may see no key
      std::fill(out_row, out_row + d, T(0));
    }
  }
}

// Runs `task(t, scratch)` for t in [0, n_tasks): each thread builds one scratch from `make_scratch()` and claims
// tasks from a shared counter until none is left. Claiming (rather than a fixed split) balances uneven tasks
// (causal, variable lengths) and lets one thread take over the share of another the OS has descheduled on a
// busy machine. Each task writes its own outputs, so the result does not depend on who ran it.
template <typename MakeScratch, typename Task>
void parallel_tasks(int64_t n_tasks, MakeScratch make_scratch, Task task) {
  if (n_tasks == 0) return;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_tasks), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next_task++; t < n_tasks; t = next_task++) task(t, scratch);
  });
}

// Forward of every (sequence, head): head_at(b, h) -> Head<T>; max_sq bounds every sequence's query count.
template <typename T, typename HeadAt>
void forward(int64_t batch, int64_t heads, int64_t max_sq, const Params& p, HeadAt head_at) {
  const int64_t q_blocks = (max_sq + kForwardQueryBlock - 1) / kForwardQueryBlock;
  const int64_t n_tasks = batch * heads * q_blocks;
  // Threads claim tasks in turn, so a thread's next task is most often `workers` further on.
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  parallel_tasks(
      n_tasks, [&] { return ForwardScratch(p.d); },
      [&](int64_t t, ForwardScratch& s) {
        const int64_t bh = t / q_blocks, i0 = (t % q_blocks) * kForwardQueryBlock;
        const Head<T> hd = head_at(bh / heads, bh % heads);
        if (i0 >= hd.sq) return;
        const int64_t t_next = t + workers, bh_next = t_next / q_blocks;
        const Head<T> next = t_next < n_tasks ? head_at(bh_next / heads, bh_next % heads) : Head<T>{};
        forward_block(hd, i0, std::min(kForwardQueryBlock, hd.sq - i0), p, s, t_next < n_tasks ? &next : nullptr,
                      (t_next % q_blocks) * kForwardQueryBlock);
      });
}

struct BackwardScratch {
  std::vector<float> q, dout, k, v;  // fp32 staging of fp16/bf16 rows (block, D)
  std::vector<float> kt, vt;         // (D, kKeyBlock): K^T and V^T packed for the microkernel
  std::vector<float> p, dp;          // (kQueryBlock, kKeyBlock): P, then dP and dS
  std::vector<float> delta;          // (max_sq,) rowsum(dout * out)
  std::vector<float> dq, dk, dv;     // fp32 accumulators of fp16/bf16 gradients: (max_sq, D), (kKeyBlock, D) x 2
  std::vector<float> out_row;        // (D,)
  BackwardScratch(int64_t max_sq, int64_t d, bool fp32)
      : q(kQueryBlock * d), dout(kQueryBlock * d), k(kKeyBlock * d), v(kKeyBlock * d), kt(d * kKeyBlock),
        vt(d * kKeyBlock), p(kQueryBlock * kKeyBlock), dp(kQueryBlock * kKeyBlock), delta(max_sq), dq(fp32 ? 0 : max_sq * d),
        dk(fp32 ? 0 : kKeyBlock * d), dv(fp32 ? 0 : kKeyBlock * d), out_row(d) {}
};

// fp32 gradients accumulate in the (zero-initialized) output; fp16/bf16 ones in `buffer` (rows, D), zeroed.
template <typename T>
std::pair<float*, int64_t> grad_accumulator(T* grad, int64_t ld, std::vector<float>& buffer, int64_t rows,
                                            int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    return {grad, ld};
  } else {
    std::fill(buffer.begin(), buffer.begin() + rows * d, 0.f);
    return {buffer.data(), d};
  }
}

template <typename T>
void store_rows(const float* acc, int64_t rows, int64_t d, T* dst, int64_t ld) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t r = 0; r < rows; ++r) store_scaled(acc + r * d, 1.f, dst + r * ld, d);
  }
}

// Backward of one head: dq, dk, dv.
template <typename T>
void backward_head(const Head<T>& hd, const Params& p, BackwardScratch& s) {
  const int64_t d = p.d, offset = hd.sk - hd.sq;
  for (int64_t i = 0; i < hd.sq; ++i) {
    const Rows dout = stage_rows(hd.dout + i * hd.dout_ld, hd.dout_ld, 1, d, s.dout.data());
    const Rows out = stage_rows<T>(hd.out + i * hd.out_ld, hd.out_ld, 1, d, s.out_row.data());
    s.delta[i] = dot(dout.data, out.data, d);
  }
  const auto [dq, dq_ld] = grad_accumulator(hd.dq, hd.dq_ld, s.dq, hd.sq, d);
  float* scores = s.p.data();
  float* dscores = s.dp.data();

  for (int64_t c = 0; c < hd.n_chunks; ++c) {
    const KeyChunk& ch = hd.chunks[c];
    const int64_t n = ch.hi - ch.lo;
    const int64_t first_q = p.causal ? std::max<int64_t>(0, ch.lo - offset) : 0;  // first row that sees the chunk
    if (first_q >= hd.sq) break;
    Rows k = stage_rows(hd.k + ch.lo * hd.k_ld, hd.k_ld, n, d, s.k.data());
    Rows v = stage_rows(hd.v + ch.lo * hd.v_ld, hd.v_ld, n, d, s.v.data());
    if (ch.padded) {  // dS K and dO V^T multiply the padding rows too (by dS = 0, and into dS = 0 * dP)
      k = zero_nonfinite_padding(k, n, d, hd.key_bias + ch.lo, s.k.data());
      v = zero_nonfinite_padding(v, n, d, hd.key_bias + ch.lo, s.v.data());
    }
    const TransposedOperand kt = transposed_operand(p, k, n, s.kt.data());
    const TransposedOperand vt = transposed_operand(p, v, n, s.vt.data());
    const auto [dk, dk_ld] = grad_accumulator(hd.dk + ch.lo * hd.dkv_ld, hd.dkv_ld, s.dk, n, d);
    const auto [dv, dv_ld] = grad_accumulator(hd.dv + ch.lo * hd.dkv_ld, hd.dkv_ld, s.dv, n, d);

    for (int64_t i0 = first_q; i0 < hd.sq; i0 += kQueryBlock) {
      const int64_t m = std::min(kQueryBlock, hd.sq - i0);
      const Rows q = stage_rows(hd.q + i0 * hd.q_ld, hd.q_ld, m, d, s.q.data());
      const Rows dout = stage_rows(hd.dout + i0 * hd.dout_ld, hd.dout_ld, m, d, s.dout.data());
      product_bt(p, m, n, p.scale, q, kt, scores, kKeyBlock);
      mask_tile(scores, m, n, ch.padded ? hd.key_bias + ch.lo : nullptr, p.causal && ch.hi - 1 > i0 + offset, i0,
                ch.lo, offset);
      // P = exp(S - lse); a row that sees no key has lse = +inf, hence P = 0.
      for (int64_t r = 0; r < m; ++r) exp_shifted<false>(scores + r * kKeyBlock, n, hd.lse[i0 + r]);
      product(p, true, n, d, m, 1.f, scores, kKeyBlock, dout.data, dout.ld, 1.f, dv, dv_ld);  // dV += P^T dO
      product_bt(p, m, n, 1.f, dout, vt, dscores, kKeyBlock);                                 // dP = dO V^T
      for (int64_t r = 0; r < m; ++r) {
        softmax_grad_row(scores + r * kKeyBlock, dscores + r * kKeyBlock, n, s.delta[i0 + r]);
      }
      product(p, false, m, d, n, p.scale, dscores, kKeyBlock, k.data, k.ld, 1.f, dq + i0 * dq_ld, dq_ld);
      product(p, true, n, d, m, p.scale, dscores, kKeyBlock, q.data, q.ld, 1.f, dk, dk_ld);
    }
    // A padding key's gradient is 0; P^T dO and dS^T Q would make it NaN from a NaN in a padded query row.
    for (int64_t j = 0; ch.padded && j < n; ++j) {
      if (hd.key_bias[ch.lo + j] == kNegInf) {
        std::fill(dk + j * dk_ld, dk + j * dk_ld + d, 0.f);
        std::fill(dv + j * dv_ld, dv + j * dv_ld + d, 0.f);
      }
    }
    store_rows(dk, n, d, hd.dk + ch.lo * hd.dkv_ld, hd.dkv_ld);
    store_rows(dv, n, d, hd.dv + ch.lo * hd.dkv_ld, hd.dkv_ld);
  }
  store_rows(dq, hd.sq, d, hd.dq, hd.dq_ld);
}

template <typename T, typename HeadAt>
void backward(int64_t batch, int64_t heads, int64_t max_sq, const Params& p, HeadAt head_at) {
  parallel_tasks(
      batch * heads, [&] { return BackwardScratch(max_sq, p.d, std::is_same_v<T, float>); },
      [&](int64_t t, BackwardScratch& s) { backward_head(head_at(t / heads, t % heads), p, s); });
}

// ---- dense (B, S, H, D) ----

KeyPlan dense_plan(const std::optional<at::Tensor>& key_padding_mask, int64_t batch, int64_t sk) {
  KeyPlan plan;
  const bool* mask = key_padding_mask ? key_padding_mask->const_data_ptr<bool>() : nullptr;  // (B, Sk)
  for (int64_t b = 0; b < batch; ++b) plan.add_sequence(mask ? mask + b * sk : nullptr, sk);
  if (mask) {
    plan.bias.resize(batch * sk);
    for (int64_t j = 0; j < batch * sk; ++j) plan.bias[j] = mask[j] ? 0.f : kNegInf;
  }
  return plan;
}

// Head (b, h) of dense tensors; q, k, v, dout and out strided, the outputs contiguous.
template <typename T>
Head<T> dense_head(int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const KeyPlan& plan, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t sq = q.size(1), sk = k.size(1), heads = q.size(2);
  Head<T> hd{};
  hd.q = q.const_data_ptr<T>() + b * q.stride(0) + h * q.stride(2);
  hd.k = k.const_data_ptr<T>() + b * k.stride(0) + h * k.stride(2);
  hd.v = v.const_data_ptr<T>() + b * v.stride(0) + h * v.stride(2);
  hd.q_ld = q.stride(1);
  hd.k_ld = k.stride(1);
  hd.v_ld = v.stride(1);
  hd.sq = sq;
  hd.sk = sk;
  hd.chunks = plan.chunks.data() + plan.start[b];
  hd.n_chunks = plan.start[b + 1] - plan.start[b];
  hd.key_bias = plan.bias.empty() ? nullptr : plan.bias.data() + b * sk;
  hd.out = const_cast<T*>(out.const_data_ptr<T>()) + b * out.stride(0) + h * out.stride(2);
  hd.out_ld = out.stride(1);
  hd.lse = const_cast<float*>(lse.const_data_ptr<float>()) + (b * heads + h) * sq;
  return hd;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                                     double scale) {
  check_attention_fwd_args(q, k, v, key_padding_mask, scale, at::kCPU);
  const int64_t batch = q.size(0), sq = q.size(1), heads = q.size(2), d = q.size(3), sk = k.size(1);
  at::Tensor out = at::empty({batch, sq, heads, d}, q.options());
  at::Tensor lse = at::empty({batch, heads, sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const KeyPlan plan = dense_plan(key_padding_mask, batch, sk);
  const Params p{d, static_cast<float>(scale), causal, use_microkernel(sk)};
  CTXKERN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
    forward<scalar_t>(batch, heads, sq, p,
                      [&](int64_t b, int64_t h) { return dense_head<scalar_t>(b, h, q, k, v, plan, out, lse); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  check_attention_bwd_args(dout, q, k, v, out, lse, key_padding_mask, scale, at::kCPU);
  const int64_t batch = q.size(0), sq = q.size(1), heads = q.size(2), d = q.size(3), sk = k.size(1);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  const KeyPlan plan = dense_plan(key_padding_mask, batch, sk);
  const Params p{d, static_cast<float>(scale), causal, use_microkernel(sk)};
  CTXKERN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_bwd_cpu", [&] {
    using T = scalar_t;
    backward<T>(batch, heads, sq, p, [&](int64_t b, int64_t h) {
      Head<T> hd = dense_head<T>(b, h, q, k, v, plan, out, lse);
      hd.dout = dout.const_data_ptr<T>() + b * dout.stride(0) + h * dout.stride(2);
      hd.dout_ld = dout.stride(1);
      hd.dq = dq.data_ptr<T>() + (b * sq * heads + h) * d;
      hd.dk = dk.data_ptr<T>() + (b * sk * heads + h) * d;
      hd.dv = dv.data_ptr<T>() + (b * sk * heads + h) * d;
      hd.dq_ld = hd.dkv_ld = heads * d;
      return hd;
    });
  });
  return {dq, dk, dv};
}

// ---- varlen (total, H, D) ----

KeyPlan varlen_plan(const int32_t* cu_k, int64_t batch) {
  KeyPlan plan;
  for (int64_t b = 0; b < batch; ++b) plan.add_sequence(nullptr, cu_k[b + 1] - cu_k[b]);
  return plan;
}

template <typename T>
Head<T> varlen_head(int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const int32_t* cu_q, const int32_t* cu_k, const KeyPlan& plan, const at::Tensor& out,
                    const at::Tensor& lse) {
  const int64_t total_q = q.size(0);
  Head<T> hd{};
  hd.q = q.const_data_ptr<T>() + cu_q[b] * q.stride(0) + h * q.stride(1);
  hd.k = k.const_data_ptr<T>() + cu_k[b] * k.stride(0) + h * k.stride(1);
  hd.v = v.const_data_ptr<T>() + cu_k[b] * v.stride(0) + h * v.stride(1);
  hd.q_ld = q.stride(0);
  hd.k_ld = k.stride(0);
  hd.v_ld = v.stride(0);
  hd.sq = cu_q[b + 1] - cu_q[b];
  hd.sk = cu_k[b + 1] - cu_k[b];
  hd.chunks = plan.chunks.data() + plan.start[b];
  hd.n_chunks = plan.start[b + 1] - plan.start[b];
  hd.out = const_cast<T*>(out.const_data_ptr<T>()) + cu_q[b] * out.stride(0) + h * out.stride(1);
  hd.out_ld = out.stride(0);
  hd.lse = const_cast<float*>(lse.const_data_ptr<float>()) + h * total_q + cu_q[b];
  return hd;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool causal, double scale) {
  check_attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, at::kCPU);
  const int64_t total_q = q.size(0), heads = q.size(1), d = q.size(2), batch = cu_seqlens_q.size(0) - 1;
  // The CPU reads cu_seqlens directly, so it checks their values too: a malformed one must not index out of
  // bounds.
  const int64_t longest_q =
      check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", total_q, "q's length", max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.size(0), "k's length", max_seqlen_k, "max_seqlen_k");
  at::Tensor out = at::empty({total_q, heads, d}, q.options());
  at::Tensor lse = at::empty({heads, total_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const int32_t* cu_q = cu_seqlens_q.const_data_ptr<int32_t>();  // (B + 1,)
  const int32_t* cu_k = cu_seqlens_k.const_data_ptr<int32_t>();  // (B + 1,)
  const KeyPlan plan = varlen_plan(cu_k, batch);
  const Params p{d, static_cast<float>(scale), causal, use_microkernel(max_seqlen_k)};
  CTXKERN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_varlen_fwd_cpu", [&] {
    forward<scalar_t>(batch, heads, longest_q, p, [&](int64_t b, int64_t h) {
      return varlen_head<scalar_t>(b, h, q, k, v, cu_q, cu_k, plan, out, lse);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale) {
  check_attention_varlen_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  scale, at::kCPU);
  const int64_t heads = q.size(1), d = q.size(2), batch = cu_seqlens_q.size(0) - 1;
  const int64_t longest_q =
      check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", q.size(0), "q's length", max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.size(0), "k's length", max_seqlen_k, "max_seqlen_k");
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  const int32_t* cu_q = cu_seqlens_q.const_data_ptr<int32_t>();  // (B + 1,)
  const int32_t* cu_k = cu_seqlens_k.const_data_ptr<int32_t>();  // (B + 1,)
  const KeyPlan plan = varlen_plan(cu_k, batch);
  const Params p{d, static_cast<float>(scale), causal, use_microkernel(max_seqlen_k)};
  CTXKERN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_varlen_bwd_cpu", [&] {
    using T = scalar_t;
    backward<T>(batch, heads, longest_q, p, [&](int64_t b, int64_t h) {
      Head<T> hd = varlen_head<T>(b, h, q, k, v, cu_q, cu_k, plan, out, lse);
      hd.dout = dout.const_data_ptr<T>() + cu_q[b] * dout.stride(0) + h * dout.stride(1);
      hd.dout_ld = dout.stride(0);
      hd.dq = dq.data_ptr<T>() + (cu_q[b] * heads + h) * d;
      hd.dk = dk.data_ptr<T>() + (cu_k[b] * heads + h) * d;
      hd.dv = dv.data_ptr<T>() + (cu_k[b] * heads + h) * d;
      hd.dq_ld = hd.dkv_ld = heads * d;
      return hd;
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cpu);
}

}  // namespace ctxkern
