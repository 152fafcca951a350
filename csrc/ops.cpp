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
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef CTXKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
