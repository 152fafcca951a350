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
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef CTXKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
