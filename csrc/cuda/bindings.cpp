// Torch glue for the CUDA kernels (built only when torch has CUDA): each op checks its arguments once, with
// messages that name them, makes x's device current, allocates outputs and workspaces with the torch
// allocator on the current stream, and calls the torch-free launcher from csrc/cuda/<op>.cu.
// Schemas are in csrc/ops.cpp; one section per op below, registrations at the end.
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS / cuSPARSE / cuSOLVER
// headers, which a bare CUDA toolkit lacks, and the glue needs nothing from them
// (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../lstm_cell_checks.h"
#include "layer_norm.h"
#include "lstm_cell.h"

namespace {

using ctxkern::cuda::DType;

// ---------------------------------------------------------------------------------------------------------
// Shared helpers. Argument checks common to the CPU and CUDA glue live in csrc/checks.h; what is here is
// specific to the CUDA launchers.

DType storage_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      return DType::F32;  // checks.h has already restricted t to the three storage dtypes
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The kernels index columns with 32-bit ints.
void check_columns(const at::Tensor& x) {
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), "x has too many columns for the CUDA kernels: N = ",
              x.size(1));
}

// Row stride of an (M, N) operand that checks.h has validated. Torch leaves the stride of a size-1 dim
// arbitrary (a reshape may put any value there); a single row is given stride N so that the launcher's
// alignment test sees a real layout. Any other stride is used as is, 0 and overlapping rows included:
// these operands are only read.
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

const void* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Multiprocessor count of t's device, which sizes the persistent backward grids.
int sm_count_of(const at::Tensor& t) {
  int sm_count = 0;
  check_cuda(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, t.get_device()),
             "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
  return sm_count;
}

// ---------------------------------------------------------------------------------------------------------
// layer_norm

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps) {
  ctxkern::check_layer_norm_fwd_args(x, residual, weight, bias, at::kCUDA);
  check_columns(x);
  TORCH_CHECK(eps >= 0.0 && eps <= std::numeric_limits<float>::max(), "eps must be finite and >= 0, got ", eps);
  const DType dtype = storage_dtype(x);
  const int64_t x_stride = row_stride(x);
  const int64_t residual_stride = residual.has_value() ? row_stride(*residual) : 0;

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};

  check_cuda(ctxkern::cuda::layer_norm_fwd_launch(dtype, x.data_ptr(), x_stride, data_or_null(residual),
                                                  residual_stride, data_or_null(weight), data_or_null(bias),
                                                  y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
                                                  static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
             "layer_norm_fwd kernel launch");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias) {
  ctxkern::check_layer_norm_bwd_args(dy, x, residual, weight, mean, rstd, at::kCUDA);
  check_columns(x);
  const DType dtype = storage_dtype(x);
  const int64_t x_stride = row_stride(x);
  const int64_t dy_stride = row_stride(dy);
  const int64_t residual_stride = residual.has_value() ? row_stride(*residual) : 0;

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  if (M == 0) {
    // A sum over no rows: the parameter gradients are zeros, not uninitialised memory.
    at::Tensor dweight = weight.has_value() ? at::zeros({N}, weight->options()) : at::empty({0}, x.options());
    at::Tensor dbias = has_bias ? at::zeros({N}, x.options()) : at::empty({0}, x.options());
    return {dx, dweight, dbias};
  }
  at::Tensor dweight = weight.has_value() ? at::empty({N}, weight->options()) : at::empty({0}, x.options());
  at::Tensor dbias = has_bias ? at::empty({N}, x.options()) : at::empty({0}, x.options());

  // Per-block fp32 partials of dweight and dbias, reduced by the launcher's second kernel.
  const int sm_count = sm_count_of(x);
  const bool want_params = weight.has_value() || has_bias;
  const int64_t workspace_blocks = want_params ? ctxkern::cuda::layer_norm_bwd_workspace_blocks(M, N, sm_count) : 0;
  std::optional<at::Tensor> workspace;
  if (want_params) workspace = at::empty({2, workspace_blocks, N}, x.options().dtype(at::kFloat));

  check_cuda(ctxkern::cuda::layer_norm_bwd_launch(
                 dtype, dy.data_ptr(), dy_stride, x.data_ptr(), x_stride, data_or_null(residual), residual_stride,
                 data_or_null(weight), mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                 weight.has_value() ? dweight.data_ptr() : nullptr, has_bias ? dbias.data_ptr() : nullptr,
                 want_params ? workspace->data_ptr<float>() : nullptr, workspace_blocks, M, N, sm_count,
                 c10::cuda::getCurrentCUDAStream()),
             "layer_norm_bwd kernel launch");
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------------------------------------
// lstm_cell

// The kernels take one row stride per operand; a single row gets its width (see row_stride).
std::tuple<at::Tensor, at::Tensor> lstm_cell_fwd_cuda(const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                                                      const at::Tensor& c, const std::optional<at::Tensor>& bias,
                                                      std::optional<double> cell_clip) {
  ctxkern::check_lstm_cell_fwd_args(input_gates, hidden_gates, c, bias, cell_clip, at::kCUDA);
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t B = c.size(0), H = c.size(1);
  at::Tensor h = at::empty({B, H}, c.options());
  at::Tensor c_new = at::empty({B, H}, c.options());
  check_cuda(ctxkern::cuda::lstm_cell_fwd_launch(storage_dtype(c), input_gates.data_ptr(), row_stride(input_gates),
                                                 hidden_gates.data_ptr(), row_stride(hidden_gates), c.data_ptr(),
                                                 row_stride(c), data_or_null(bias), h.data_ptr(), c_new.data_ptr(), B,
                                                 H, ctxkern::clip_bound(cell_clip), c10::cuda::getCurrentCUDAStream()),
             "lstm_cell_fwd kernel launch");
  return {h, c_new};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cuda(
    const at::Tensor& dh, const at::Tensor& dc_new, const at::Tensor& input_gates, const at::Tensor& hidden_gates,
    const at::Tensor& c, const std::optional<at::Tensor>& bias, std::optional<double> cell_clip) {
  ctxkern::check_lstm_cell_bwd_args(dh, dc_new, input_gates, hidden_gates, c, bias, cell_clip, at::kCUDA);
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t B = c.size(0), H = c.size(1);
  at::Tensor dgates = at::empty({B, 4 * H}, c.options());
  at::Tensor dc = at::empty({B, H}, c.options());
  if (B == 0 || H == 0) {
    // A sum over no rows: dbias is zeros, not uninitialised memory.
    return {dgates, dc, bias ? at::zeros({4 * H}, c.options()) : at::empty({0}, c.options())};
  }
  at::Tensor dbias = bias ? at::empty({4 * H}, c.options()) : at::empty({0}, c.options());
  std::optional<at::Tensor> workspace;
  if (bias) workspace = at::empty({ctxkern::cuda::lstm_cell_bwd_workspace_rows(B), 4 * H}, c.options().dtype(at::kFloat));
  check_cuda(ctxkern::cuda::lstm_cell_bwd_launch(
                 storage_dtype(c), dh.data_ptr(), row_stride(dh), dc_new.data_ptr(), row_stride(dc_new),
                 input_gates.data_ptr(), row_stride(input_gates), hidden_gates.data_ptr(), row_stride(hidden_gates),
                 c.data_ptr(), row_stride(c), data_or_null(bias), dgates.data_ptr(), dc.data_ptr(),
                 bias ? dbias.data_ptr() : nullptr, bias ? workspace->data_ptr<float>() : nullptr, B, H,
                 ctxkern::clip_bound(cell_clip), c10::cuda::getCurrentCUDAStream()),
             "lstm_cell_bwd kernel launch");
  return {dgates, dc, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CUDA, m) {
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_cuda));
  m.impl("layer_norm_bwd", TORCH_FN(layer_norm_bwd_cuda));
  m.impl("lstm_cell_fwd", TORCH_FN(lstm_cell_fwd_cuda));
  m.impl("lstm_cell_bwd", TORCH_FN(lstm_cell_bwd_cuda));
}
