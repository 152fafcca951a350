// Torch-free launchers for the attention CUDA kernels (csrc/cuda/attention.cu, attention_bwd.cu);
// csrc/cuda/bindings.cpp checks the tensors and calls these.
//
// One description covers the dense and the variable-length layouts. Element (b, i, h, d) of a token operand
// (q, k, v, out, dout, dq, dk, dv) lives at
//     data + b * batch + (tok0(b) + i) * row + h * head + d
// where tok0(b) is 0 for dense input and cu_seqlens[b] for varlen input (whose batch stride is then 0).
// Row statistics (lse, delta) of query i of (b, h) live at stats + b * batch + h * head + tok0(b) + i:
// dense (B, H, Sq) has batch = H * Sq, head = Sq; varlen (H, total_q) has batch = 0, head = total_q.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace ctxkern {
namespace cuda {

// A (B, S, H, D) or (total, H, D) operand; strides in elements, the last dim contiguous. q, k, v and dout are
// read with 16-byte cp.async: their data and every stride used must be multiples of 16 bytes (the glue copies
// an operand that is not; a stride may be 0). out is read element by element in the backward. Outputs (out,
// dq, dk, dv) are written two elements at a time: data and strides must be even.
struct TokenTensor {
  void* data;
  int64_t batch;
  int64_t row;
  int64_t head;
};

// Per-query fp32 statistics, laid out as described above.
struct RowStats {
  float* data;
  int64_t batch;
  int64_t head;
};

struct AttentionProblem {
  int batch;              // B (varlen: number of sequences)
  int heads;              // H
  int head_dim;           // D: 32, 64, 80, 96 or 128
  int max_seqlen_q;       // dense: Sq; varlen: >= every sequence's query count
  int max_seqlen_k;       // dense: Sk; varlen: >= every sequence's key count
  const int* cu_seqlens_q;  // (B + 1,) int32 prefix sums, or nullptr for dense input
  const int* cu_seqlens_k;  // (B + 1,), or nullptr for dense input
  const uint8_t* key_padding_mask;  // dense only: (B, Sk) bools, nonzero = attend; nullptr = all keys real
  int* key_extent;        // (B,) int32 workspace when key_padding_mask is set (last real key + 1), else nullptr
  bool causal;            // query i sees key j <= i + Sk - Sq of its own sequence
  float scale;            // multiplies q . k
};

// Whether the kernels take head dim D.
bool attention_supports_head_dim(int64_t D);

// out = softmax(scale * q k^T, masked) v and lse = log-sum-exp of the scaled visible scores (+inf, and out
// = 0, for a query that sees no key). q, k, v are only read; out is written for every query row.
// Requires batch, heads, max_seqlen_q >= 1 and a supported head dim; max_seqlen_k may be 0.
cudaError_t attention_fwd_launch(DType dtype, const AttentionProblem& problem,
                                 TokenTensor q,    // (B, Sq, H, D) / (total_q, H, D)
                                 TokenTensor k,    // (B, Sk, H, D) / (total_k, H, D)
                                 TokenTensor v,    // like k
                                 TokenTensor out,  // like q
                                 RowStats lse,     // (B, H, Sq) / (H, total_q)
                                 cudaStream_t stream);

// FlashAttention-2 backward: P is recomputed from lse. Writes delta = rowsum(dout * out) into the delta
// workspace (laid out like lse), then dq, then dk and dv (two kernels, no atomics: deterministic).
// Every row of dq, dk, dv is written (zeros where a row takes part in no visible pair).
cudaError_t attention_bwd_launch(DType dtype, const AttentionProblem& problem,
                                 TokenTensor q, TokenTensor k, TokenTensor v,
                                 TokenTensor out,   // like q, from the forward
                                 TokenTensor dout,  // like q
                                 RowStats lse,      // from the forward
                                 RowStats delta,    // workspace laid out like lse
                                 TokenTensor dq,    // like q
                                 TokenTensor dk,    // like k
                                 TokenTensor dv,    // like v
                                 cudaStream_t stream);

// Fills problem.key_extent[b] with 1 + the index of the last nonzero of key_padding_mask row b (0 when the
// row has none). Both launchers call it first when a mask is given.
cudaError_t attention_key_extent_launch(const AttentionProblem& problem, cudaStream_t stream);

}  // namespace cuda
}  // namespace ctxkern
