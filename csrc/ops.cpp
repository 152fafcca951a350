// Every ctxkern operator schema, in one place. Backends register implementations elsewhere:
// csrc/cpu/<op>.cpp (CPU), csrc/cuda/bindings.cpp (CUDA); fake kernels and autograd live in ctxkern/ops/.
#include <torch/library.h>
#include <torch/extension.h>

#include "eager/eager.h"

TORCH_LIBRARY(ctxkern, m) {
  // LayerNorm of (x + residual) over the last dim.
  //   x, residual: (M, N), last dim contiguous, any row stride; weight, bias: (N,) contiguous or None.
  //   -> y (M, N) contiguous in x's dtype; mean (M,) and rstd (M,) in fp32, of x + residual; with prenorm
  //      (which needs residual) the sum x + residual (M, N) contiguous in x's dtype, the residual stream of a
  //      pre-LN block, else a (0,) tensor.
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool prenorm=False)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of layer_norm_fwd. dresidual equals dx, so it is not returned separately.
  //   dy: (M, N) last dim contiguous; x, residual, weight as in the forward; mean, rstd: (M,) fp32;
  //   dsum: the gradient of the prenorm sum (M, N), last dim contiguous, or None.
  //   -> dx (M, N) in x's dtype (dsum added); dweight (N,) in weight's dtype, or (0,) when weight is None;
  //      dbias (N,) in x's dtype when has_bias, else (0,).
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor mean, Tensor rstd,"
        " bool has_bias, Tensor? dsum=None) -> (Tensor, Tensor, Tensor)");

  // Masked mean pooling: out[b] = mean of hidden[b, s] over the tokens s with mask[b, s], zeros for a row with
  // no token; with normalize, out[b] / max(||out[b]||2, 1e-12) of the fp32 mean.
  //   hidden: (B, S, D), last dim contiguous, any batch and token strides; mask: (B, S) bool, contiguous.
  //   -> out (B, D) contiguous in hidden's dtype; mean (B, D) fp32, the un-normalized mean that the backward
  //      of normalize needs, when normalize, else (B, 0).
  m.def("masked_mean_pool_fwd(Tensor hidden, Tensor mask, bool normalize) -> (Tensor, Tensor)");
  // Backward of masked_mean_pool_fwd: dhidden[b, s] = mask[b, s] ? g[b] : 0 with g[b] = d(out[b]) / d(mean[b])
  // applied to dout[b], divided by the token count.
  //   dout: (B, D) contiguous; mask as in the forward; mean: the forward's (B, D) fp32 mean, or None without
  //   normalize. -> dhidden (B, S, D) contiguous in dout's dtype, written everywhere (zeros at padding).
  m.def("masked_mean_pool_bwd(Tensor dout, Tensor mask, Tensor? mean) -> Tensor");
  // The same over packed sequences: sequence b is hidden[cu_seqlens[b] : cu_seqlens[b + 1]].
  //   hidden: (total, D), last dim contiguous, any token stride; cu_seqlens: (B + 1,) int32 contiguous,
  //   0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = total (the CPU kernel checks; the CUDA one trusts its caller).
  m.def("masked_mean_pool_varlen_fwd(Tensor hidden, Tensor cu_seqlens, bool normalize) -> (Tensor, Tensor)");
  //   -> dhidden (total, D) contiguous in dout's dtype.
  m.def("masked_mean_pool_varlen_bwd(Tensor dout, Tensor cu_seqlens, Tensor? mean, int total) -> Tensor");
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
  // LSTM cell, torch's gate order i, f, g, o: gates = input_gates + hidden_gates + bias,
  // c_new = clamp(sigmoid(f) * c + sigmoid(i) * tanh(g), -cell_clip, cell_clip), h = sigmoid(o) * tanh(c_new).
  //   input_gates, hidden_gates: (B, 4H), last dim contiguous, any row stride; c: (B, H) likewise;
  //   bias: (4H,) contiguous or None; cell_clip: >= 0 or None (no clamp).
  //   -> h (B, H), c_new (B, H), contiguous, in input_gates' dtype. Nothing else is saved: the backward
  //      recomputes the gates from its inputs, which it needs anyway.
  m.def("lstm_cell_fwd(Tensor input_gates, Tensor hidden_gates, Tensor c, Tensor? bias, float? cell_clip)"
        " -> (Tensor, Tensor)");
  // Backward of lstm_cell_fwd. dhidden_gates equals dinput_gates, so it is not returned separately.
  //   dh, dc_new: (B, H) last dim contiguous; the other arguments as in the forward.
  //   -> dgates (B, 4H), dc (B, H), in input_gates' dtype; dbias (4H,) = the sum of dgates over the batch
  //      in a fixed order (deterministic), in bias' dtype, or (0,) when bias is None.
  m.def("lstm_cell_bwd(Tensor dh, Tensor dc_new, Tensor input_gates, Tensor hidden_gates, Tensor c, Tensor? bias,"
        " float? cell_clip) -> (Tensor, Tensor, Tensor)");
  // One LSTM layer in one direction over packed rows, without autograd (ctxkern.nn.LSTM's no-grad path on
  // the CPU, where a Python time loop would cost more than the cell itself). Step t owns rows
  // [sum(batch_sizes[:t]), + batch_sizes[t]) of gates_in and out, the batch_sizes[t] sequences still running
  // (a non-increasing prefix of the batch); reverse walks the steps from the last.
  //   gates_in: (N, 4H) = x W_ih^T, last dim contiguous; h0: (B, P); c0: (B, H); w_hh: (4H, P);
  //   w_hr: (P, H) or None (then P = H); bias: (4H,) or None; the clips as in lstm_cell_fwd, proj_clip on h.
  //   -> out (N, P), h_n (B, P), c_n (B, H): each sequence's state after its own last step.
  m.def("lstm_layer_fwd(Tensor gates_in, int[] batch_sizes, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr,"
        " Tensor? bias, float? cell_clip, float? proj_clip, bool reverse) -> (Tensor, Tensor, Tensor)");
  // The same layer for training: lstm_layer_fwd's outputs plus what lstm_layer_bwd needs. The time loop is
  // csrc/lstm_layer_loop.h, shared by the CPU and CUDA kernels. float64 also runs (the gradient tests).
  //   -> out (N, P), h_n (B, P), c_n (B, H) as lstm_layer_fwd; then, for row r of step t:
  //      gates (N, 4H): the pre-activations gates_in + bias + h_prev W_hh^T the cell read;
  //      c_prev (N, H), h_prev (N, P): the state the step started from (the backward's dW_hh is one product
  //      gates'^T h_prev over all N rows); proj_raw (N, P): the projection before proj_clip (its gradient
  //      passes where |proj_raw| <= proj_clip, as torch.clamp's), or (0, P) when proj_clip is None.
  //      The activations are not saved: the backward recomputes them from gates and c_prev in one pass.
  m.def("lstm_layer_fwd_train(Tensor gates_in, int[] batch_sizes, Tensor h0, Tensor c0, Tensor w_hh,"
        " Tensor? w_hr, Tensor? bias, float? cell_clip, float? proj_clip, bool reverse)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward through time of lstm_layer_fwd_train: per step only the recurrent products and the cell's
  // backward; dW_hh, dW_hr and dbias are one product / one reduction each over all N rows at the end
  // (deterministic: no atomics, a fixed order).
  //   dout (N, P), dh_n (B, P), dc_n (B, H): the gradients of out, h_n, c_n (zeros for an unused output);
  //   gates, c_prev, h_prev, proj_raw: as lstm_layer_fwd_train returned them; batch_sizes, w_hh, w_hr, the
  //   clips and reverse: as given to it; has_bias: whether it had a bias.
  //   -> dgates_in (N, 4H) (also the gradient of the gates' bias, row by row), dh0 (B, P), dc0 (B, H),
  //      dw_hh (4H, P), dw_hr (P, H) or (0,) without w_hr, dbias (4H,) or (0,) without bias; all contiguous.
  m.def("lstm_layer_bwd(Tensor dout, Tensor dh_n, Tensor dc_n, Tensor gates, Tensor c_prev, Tensor h_prev,"
        " Tensor proj_raw, int[] batch_sizes, Tensor w_hh, Tensor? w_hr, bool has_bias, float? cell_clip,"
        " float? proj_clip, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef CTXKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  ctxkern::eager::bind_layer_norm(m);
}
