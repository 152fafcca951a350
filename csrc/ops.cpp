// Every ctxkern operator schema, in one place. Backends register implementations elsewhere:
// csrc/cpu/<op>.cpp (CPU), csrc/cuda/bindings.cpp (CUDA); fake kernels and autograd live in ctxkern/ops/.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(ctxkern, m) {
  // LayerNorm of (x + residual) over the last dim.
  //   x, residual: (M, N), last dim contiguous, any row stride; weight, bias: (N,) contiguous or None.
  //   -> y (M, N) contiguous in x's dtype; mean (M,) and rstd (M,) in fp32, of x + residual.
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  // Backward of layer_norm_fwd. dresidual equals dx, so it is not returned separately.
  //   dy: (M, N) last dim contiguous; x, residual, weight as in the forward; mean, rstd: (M,) fp32.
  //   -> dx (M, N) in x's dtype; dweight (N,) in weight's dtype, or (0,) when weight is None;
  //      dbias (N,) in x's dtype when has_bias, else (0,).
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor mean, Tensor rstd,"
        " bool has_bias) -> (Tensor, Tensor, Tensor)");

  // Attention in flash-attn's layouts, with the softmax of each query row over the keys it may see.
  //   q: (B, Sq, H, D); k, v: (B, Sk, H, D); last dim contiguous, other strides free (views of a fused QKV
  //   projection are fine). key_padding_mask: (B, Sk) bool, contiguous, true = attend, or None.
  //   causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned). scale multiplies q.k.
  //   -> out (B, Sq, H, D) contiguous in q's dtype; lse (B, H, Sq) fp32, the log-sum-exp of the scaled
  //      scores of each query row, +inf for a row that may see no key (its out is 0 and the backward's
  //      exp(score - lse) is 0 with no special case).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale)"
        " -> (Tensor, Tensor)");
  // Backward of attention_fwd (FlashAttention-2: P recomputed from lse). dout: (B, Sq, H, D), last dim
  // contiguous; out, lse as the forward returned them. -> dq, dk, dv contiguous, in q's / k's / v's shape
  // and dtype.
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // Variable-length attention on packed sequences (flash_attn_varlen_func's convention).
  //   q: (total_q, H, D); k, v: (total_k, H, D); last dim contiguous. cu_seqlens_q, cu_seqlens_k: int32
  //   (B+1,) contiguous, validated by the caller (0 first, non-decreasing, ending at total); max_seqlen_q/k
  //   >= every sequence's length. causal is bottom-right aligned per sequence.
  //   -> out (total_q, H, D) contiguous in q's dtype; lse (H, total_q) fp32, +inf as above.
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal,"
        " float scale) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef CTXKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
