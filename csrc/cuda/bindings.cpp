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
#include "../masked_mean_pool_checks.h"
#include "layer_norm.h"
#include "masked_mean_pool.h"

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
// masked_mean_pool

// Stride of dim `dim` of a hidden operand; a size-1 dim gets 0, since it is never stepped over and torch leaves
// its stride arbitrary (which would otherwise fail the launcher's alignment test for no reason).
int64_t step_stride(const at::Tensor& t, int64_t dim) { return t.size(dim) <= 1 ? 0 : t.stride(dim); }

const uint8_t* mask_bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

void check_pool_columns(int64_t D) {
  TORCH_CHECK(D <= std::numeric_limits<int32_t>::max(), "hidden has too many columns for the CUDA kernels: D = ", D);
}

// Both layouts: mask (dense) or cu_seqlens (packed) says where each of the B sequences lives.
std::tuple<at::Tensor, at::Tensor> pool_fwd_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& cu_seqlens, int64_t B, int64_t S,
                                                 bool normalize) {
  const int64_t D = hidden.size(-1);
  check_pool_columns(D);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty({B, D}, hidden.options());
  at::Tensor mean = at::empty({B, normalize ? D : 0}, hidden.options().dtype(at::kFloat));
  if (B == 0 || D == 0) return {out, mean};
  const int64_t tokens_per_sequence = mask ? S : (hidden.size(0) + B - 1) / B;
  const int64_t splits = ctxkern::cuda::masked_mean_pool_fwd_splits(B, tokens_per_sequence, D, sm_count_of(hidden));
  at::Tensor workspace = at::empty({splits, B, D}, hidden.options().dtype(at::kFloat));
  const bool packed = cu_seqlens.has_value();
  check_cuda(ctxkern::cuda::masked_mean_pool_fwd_launch(
                 storage_dtype(hidden), hidden.data_ptr(), packed ? 0 : step_stride(hidden, 0),
                 step_stride(hidden, packed ? 0 : 1), packed ? nullptr : mask_bytes(*mask),
                 packed ? cu_seqlens->data_ptr<int32_t>() : nullptr, workspace.data_ptr<float>(), splits,
                 out.data_ptr(), normalize ? mean.data_ptr<float>() : nullptr, B, S, D, normalize,
                 c10::cuda::getCurrentCUDAStream()),
             "masked_mean_pool_fwd kernel launch");
  return {out, mean};
}

at::Tensor pool_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& mean,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                         int64_t tokens, at::IntArrayRef dhidden_shape) {
  const int64_t B = dout.size(0), D = dout.size(1);
  check_pool_columns(D);
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dhidden = at::empty(dhidden_shape, dout.options());
  if (tokens == 0 || D == 0) return dhidden;
  at::Tensor g = at::empty({B, D}, dout.options());
  check_cuda(ctxkern::cuda::masked_mean_pool_bwd_launch(
                 storage_dtype(dout), dout.data_ptr(), mean ? mean->data_ptr<float>() : nullptr,
                 mask ? mask_bytes(*mask) : nullptr, cu_seqlens ? cu_seqlens->data_ptr<int32_t>() : nullptr,
                 g.data_ptr(), dhidden.data_ptr(), tokens, B, mask ? mask->size(1) : 0, D, sm_count_of(dout),
                 c10::cuda::getCurrentCUDAStream()),
             "masked_mean_pool_bwd kernel launch");
  return dhidden;
}

std::tuple<at::Tensor, at::Tensor> masked_mean_pool_fwd_cuda(const at::Tensor& hidden, const at::Tensor& mask,
                                                             bool normalize) {
  ctxkern::check_pool_hidden(hidden, 3, at::kCUDA);
  ctxkern::check_pool_mask(mask, hidden.size(0), hidden);
  TORCH_CHECK(mask.size(1) == hidden.size(1), "mask must have shape (", hidden.size(0), ", ", hidden.size(1),
              "), got ", mask.sizes());
  return pool_fwd_cuda(hidden, mask, std::nullopt, hidden.size(0), hidden.size(1), normalize);
}

at::Tensor masked_mean_pool_bwd_cuda(const at::Tensor& dout, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& mean) {
  ctxkern::check_pool_bwd_args(dout, mean, at::kCUDA);
  ctxkern::check_pool_mask(mask, dout.size(0), dout);
  const int64_t B = dout.size(0), S = mask.size(1);
  return pool_bwd_cuda(dout, mean, mask, std::nullopt, B * S, {B, S, dout.size(1)});
}

// cu_seqlens' values are not checked here: that would cost a device sync per call. The public op
// (ctxkern/ops/masked_mean_pool.py) checks them once; a direct caller must pass valid ones.
std::tuple<at::Tensor, at::Tensor> masked_mean_pool_varlen_fwd_cuda(const at::Tensor& hidden,
                                                                    const at::Tensor& cu_seqlens, bool normalize) {
  ctxkern::check_pool_hidden(hidden, 2, at::kCUDA);
  ctxkern::check_pool_cu_seqlens(cu_seqlens, hidden);
  return pool_fwd_cuda(hidden, std::nullopt, cu_seqlens, cu_seqlens.size(0) - 1, 0, normalize);
}

at::Tensor masked_mean_pool_varlen_bwd_cuda(const at::Tensor& dout, const at::Tensor& cu_seqlens,
                                            const std::optional<at::Tensor>& mean, int64_t total) {
  ctxkern::check_pool_bwd_args(dout, mean, at::kCUDA);
  ctxkern::check_pool_cu_seqlens(cu_seqlens, dout);
  TORCH_CHECK(cu_seqlens.size(0) == dout.size(0) + 1, "cu_seqlens must have B + 1 = ", dout.size(0) + 1,
              " entries, got ", cu_seqlens.size(0));
  TORCH_CHECK(total >= 0, "total must be >= 0, got ", total);
  return pool_bwd_cuda(dout, mean, std::nullopt, cu_seqlens, total, {total, dout.size(1)});
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CUDA, m) {
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_cuda));
  m.impl("layer_norm_bwd", TORCH_FN(layer_norm_bwd_cuda));
  m.impl("masked_mean_pool_fwd", TORCH_FN(masked_mean_pool_fwd_cuda));
  m.impl("masked_mean_pool_bwd", TORCH_FN(masked_mean_pool_bwd_cuda));
  m.impl("masked_mean_pool_varlen_fwd", TORCH_FN(masked_mean_pool_varlen_fwd_cuda));
  m.impl("masked_mean_pool_varlen_bwd", TORCH_FN(masked_mean_pool_varlen_bwd_cuda));
}
