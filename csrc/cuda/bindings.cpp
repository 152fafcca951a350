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

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../attention_checks.h"
#include "../checks.h"
#include "../layer_norm_checks.h"
#include "../lstm_cell_checks.h"
#include "../lstm_layer_loop.h"
#include "../masked_mean_pool_checks.h"
#include "attention.h"
#include "layer_norm.h"
#include "lstm_cell.h"
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool prenorm) {
  ctxkern::check_layer_norm_fwd_args(x, residual, weight, bias, at::kCUDA, prenorm);
  ctxkern::check_layer_norm_eps(eps);
  check_columns(x);
  const DType dtype = storage_dtype(x);
  const int64_t x_stride = row_stride(x);
  const int64_t residual_stride = residual.has_value() ? row_stride(*residual) : 0;

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor sum = prenorm ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd, sum};

  check_cuda(ctxkern::cuda::layer_norm_fwd_launch(dtype, x.data_ptr(), x_stride, data_or_null(residual),
                                                  residual_stride, data_or_null(weight), data_or_null(bias),
                                                  y.data_ptr(), prenorm ? sum.data_ptr() : nullptr,
                                                  mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
                                                  static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
             "layer_norm_fwd kernel launch");
  return {y, mean, rstd, sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& residual,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias,
                                                                   const std::optional<at::Tensor>& dsum) {
  ctxkern::check_layer_norm_bwd_args(dy, x, residual, weight, mean, rstd, dsum, at::kCUDA);
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
  // The prenorm sum's gradient reaches x and residual as is. Added here, as one more pass over dx: it is not
  // fused into the backward kernels yet (the CPU and Triton kernels fuse it).
  if (dsum) dx.add_(*dsum);
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

// ---------------------------------------------------------------------------------------------------------
// attention (dense: q (B, Sq, H, D), k / v (B, Sk, H, D); varlen: q (total_q, H, D), k / v (total_k, H, D))

using ctxkern::cuda::RowStats;
using ctxkern::cuda::TokenTensor;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// What the CUDA kernels add to the shared checks (csrc/checks.h): a head dim they are instantiated for, and
// sizes that fit their 32-bit counters.
void check_attention_cuda_limits(const at::Tensor& q, const at::Tensor& k) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}}) {
    for (int64_t d = 0; d + 1 < t.dim(); ++d) {
      TORCH_CHECK(t.size(d) <= kInt32Max, name, " is too large for the CUDA attention kernels: ", t.sizes());
    }
  }
  TORCH_CHECK(ctxkern::cuda::attention_supports_head_dim(q.size(-1)), "head dim D = ", q.size(-1),
              " is not supported by the CUDA attention kernels (supported: 32, 64, 80, 96, 128)");
}

// The kernels load token rows with 16-byte cp.async, so the data pointer and every stride they use must be
// multiples of 16 bytes. A view that is not (a rare odd offset or stride) is copied to a fresh contiguous
// tensor, which always is: D * element size is a multiple of 32 bytes for every supported D.
at::Tensor cp_async_ready(const at::Tensor& t) {
  const int64_t per16 = 16 / static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && step_stride(t, d) % per16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Dense (B, S, H, D) operand, or varlen (total, H, D) with batch stride 0. t must outlive the launch.
TokenTensor token_tensor(const at::Tensor& t) {
  if (t.dim() == 4) return {t.data_ptr(), step_stride(t, 0), step_stride(t, 1), step_stride(t, 2)};
  return {t.data_ptr(), 0, step_stride(t, 0), step_stride(t, 1)};
}

// Dense lse / delta (B, H, Sq), or varlen (H, total_q) with batch stride 0; contiguous.
RowStats row_stats(const at::Tensor& t) {
  if (t.dim() == 3) return {t.data_ptr<float>(), t.size(1) * t.size(2), t.size(2)};
  return {t.data_ptr<float>(), 0, t.size(1)};
}

ctxkern::cuda::AttentionProblem attention_problem(const at::Tensor& q, int64_t batch, int64_t max_seqlen_q,
                                                  int64_t max_seqlen_k, bool causal, double scale) {
  ctxkern::cuda::AttentionProblem p{};
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(q.size(-2));
  p.head_dim = static_cast<int>(q.size(-1));
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  return p;
}

// Dense padding mask: (B, Sk) bool, contiguous, on q's device. Sets the problem's mask and the (B,) int32
// workspace the launchers fill with each row's last real key + 1; returns that workspace (keep it alive).
std::optional<at::Tensor> attach_key_padding_mask(ctxkern::cuda::AttentionProblem& p,
                                                  const std::optional<at::Tensor>& mask, const at::Tensor& q,
                                                  int64_t B) {
  if (!mask.has_value()) return std::nullopt;
  at::Tensor extent = at::empty({B}, q.options().dtype(at::kInt));
  p.key_padding_mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  p.key_extent = extent.data_ptr<int>();
  return extent;
}

// cu_seqlens_q / cu_seqlens_k: contiguous int32 (B + 1,) on q's device (their values are the caller's to
// validate); sets the problem's pointers.
void attach_cu_seqlens(ctxkern::cuda::AttentionProblem& p, const at::Tensor& cu_q, const at::Tensor& cu_k,
                       const at::Tensor& q) {
  p.cu_seqlens_q = cu_q.data_ptr<int>();
  p.cu_seqlens_k = cu_k.data_ptr<int>();
}

void check_max_seqlen(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= kInt32Max, name, " must be in [0, 2^31), got ", value);
}

// Launches the forward of a complete problem: q, k, v checked, out and lse allocated.
void run_attention_fwd(const ctxkern::cuda::AttentionProblem& p, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor q_in = cp_async_ready(q);
  const at::Tensor k_in = cp_async_ready(k);
  const at::Tensor v_in = cp_async_ready(v);
  check_cuda(ctxkern::cuda::attention_fwd_launch(storage_dtype(q), p, token_tensor(q_in), token_tensor(k_in),
                                                 token_tensor(v_in), token_tensor(out), row_stats(lse),
                                                 c10::cuda::getCurrentCUDAStream()),
             "attention_fwd kernel launch");
}

// Gradients of a complete problem with at least one (query, key) pair: dout, q, k, v, out, lse checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_attention_bwd(const ctxkern::cuda::AttentionProblem& p,
                                                                 const at::Tensor& dout, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const at::Tensor q_in = cp_async_ready(q);
  const at::Tensor k_in = cp_async_ready(k);
  const at::Tensor v_in = cp_async_ready(v);
  const at::Tensor dout_in = cp_async_ready(dout);  // out is only read element by element: any strides
  at::Tensor delta = at::empty_like(lse);  // rowsum(dout * out), laid out like lse
  check_cuda(ctxkern::cuda::attention_bwd_launch(
                 storage_dtype(q), p, token_tensor(q_in), token_tensor(k_in), token_tensor(v_in),
                 token_tensor(out), token_tensor(dout_in), row_stats(lse), row_stats(delta), token_tensor(dq),
                 token_tensor(dk), token_tensor(dv), c10::cuda::getCurrentCUDAStream()),
             "attention_bwd kernel launch");
  return {dq, dk, dv};
}

// Gradients of a problem without a single (query, key) pair.
std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_attention_grads(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v) {
  return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options())};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                                      double scale) {
  ctxkern::check_attention_fwd_args(q, k, v, key_padding_mask, scale, at::kCUDA);
  check_attention_cuda_limits(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Sk = k.size(1);
  auto p = attention_problem(q, B, Sq, Sk, causal, scale);
  const auto extent = attach_key_padding_mask(p, key_padding_mask, q, B);
  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Sk == 0) {  // no query sees a key
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  run_attention_fwd(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  ctxkern::check_attention_bwd_args(dout, q, k, v, out, lse, key_padding_mask, scale, at::kCUDA);
  check_attention_cuda_limits(q, k);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), Sk = k.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = attention_problem(q, B, Sq, Sk, causal, scale);
  const auto extent = attach_key_padding_mask(p, key_padding_mask, q, B);
  if (B == 0 || H == 0 || Sq == 0 || Sk == 0) return zero_attention_grads(q, k, v);
  return run_attention_bwd(p, dout, q, k, v, out, lse);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, bool causal, double scale) {
  ctxkern::check_attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                       at::kCUDA);
  check_attention_cuda_limits(q, k);
  check_max_seqlen(max_seqlen_q, "max_seqlen_q");
  check_max_seqlen(max_seqlen_k, "max_seqlen_k");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t total_q = q.size(0), H = q.size(1), D = q.size(2), total_k = k.size(0);
  auto p = attention_problem(q, cu_seqlens_q.size(0) - 1, max_seqlen_q,
                             max_seqlen_k, causal, scale);
  attach_cu_seqlens(p, cu_seqlens_q, cu_seqlens_k, q);
  at::Tensor out = at::empty({total_q, H, D}, q.options());
  at::Tensor lse = at::empty({H, total_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (p.batch == 0 || max_seqlen_q == 0 || total_k == 0 || max_seqlen_k == 0) {
    // No key anywhere (or, with valid cu_seqlens, no query either): every row is empty.
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  run_attention_fwd(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale) {
  ctxkern::check_attention_varlen_bwd_args(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, scale, at::kCUDA);
  check_attention_cuda_limits(q, k);
  check_max_seqlen(max_seqlen_q, "max_seqlen_q");
  check_max_seqlen(max_seqlen_k, "max_seqlen_k");
  const int64_t total_q = q.size(0), H = q.size(1), total_k = k.size(0);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = attention_problem(q, cu_seqlens_q.size(0) - 1, max_seqlen_q,
                             max_seqlen_k, causal, scale);
  attach_cu_seqlens(p, cu_seqlens_q, cu_seqlens_k, q);
  if (p.batch == 0 || H == 0 || total_q == 0 || total_k == 0 || max_seqlen_q == 0 || max_seqlen_k == 0) {
    return zero_attention_grads(q, k, v);
  }
  return run_attention_bwd(p, dout, q, k, v, out, lse);
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
                 c.data_ptr(), row_stride(c), data_or_null(bias), dgates.data_ptr(), dc.data_ptr(), nullptr,
                 bias ? dbias.data_ptr() : nullptr, bias ? workspace->data_ptr<float>() : nullptr, B, H,
                 ctxkern::clip_bound(cell_clip), c10::cuda::getCurrentCUDAStream()),
             "lstm_cell_bwd kernel launch");
  return {dgates, dc, dbias};
}

// ---------------------------------------------------------------------------------------------------------
// lstm_layer: the time loop is csrc/lstm_layer_loop.h's (its products are ATen calls, cuBLAS here); this is
// its cell policy, the lstm_cell kernels run on one step's pre-activation rows (no hidden_gates, no bias:
// the bias is already in the gates), the state updated in place.

struct CudaCell {
  using Product = ctxkern::AtenProduct;  // cuBLAS through ATen: nothing to prepare

  static void forward(const at::Tensor& gates, const at::Tensor& hidden_gates, const at::Tensor& bias,
                      const at::Tensor& c, const at::Tensor& h, double clip) {
    const int64_t n = c.size(0), H = c.size(1);
    const bool hg = hidden_gates.defined();
    check_cuda(ctxkern::cuda::lstm_cell_fwd_launch(
                   storage_dtype(c), gates.data_ptr(), row_stride(gates), hg ? hidden_gates.data_ptr() : nullptr,
                   hg ? row_stride(hidden_gates) : 0, c.data_ptr(), row_stride(c),
                   bias.defined() ? bias.data_ptr() : nullptr, h.data_ptr(), c.data_ptr(), n, H,
                   static_cast<float>(clip), c10::cuda::getCurrentCUDAStream()),
               "lstm_layer cell forward kernel launch");
  }

  static void backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& dh, const at::Tensor& dc,
                       const at::Tensor& dgates, const at::Tensor& h, double clip) {
    const int64_t n = dc.size(0), H = dc.size(1);
    check_cuda(ctxkern::cuda::lstm_cell_bwd_launch(
                   storage_dtype(dc), dh.data_ptr(), row_stride(dh), dc.data_ptr(), row_stride(dc), gates.data_ptr(),
                   row_stride(gates), nullptr, 0, c_prev.data_ptr(), row_stride(c_prev), nullptr, dgates.data_ptr(),
                   dc.data_ptr(), h.defined() ? h.data_ptr() : nullptr, nullptr, nullptr, n, H,
                   static_cast<float>(clip), c10::cuda::getCurrentCUDAStream()),
               "lstm_layer cell backward kernel launch");
  }
};

// The CUDA kernels store fp32, fp16 and bf16 only; the loop's own checks accept float64 for the CPU's cell.
void check_lstm_layer_cuda_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, name,
              " must be float32, float16 or bfloat16 on CUDA (float64 runs on the CPU), got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& gates_in, at::IntArrayRef batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& bias,
    std::optional<double> cell_clip, std::optional<double> proj_clip, bool reverse) {
  check_lstm_layer_cuda_dtype(gates_in, "gates_in");
  const c10::cuda::CUDAGuard guard(gates_in.device());
  ctxkern::LstmLayerForward r = ctxkern::lstm_layer_forward<CudaCell>(
      gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse, /*train=*/false, at::kCUDA);
  return {r.out, r.h_n, r.c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_fwd_train_cuda(const at::Tensor& gates_in, at::IntArrayRef batch_sizes, const at::Tensor& h0,
                          const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                          const std::optional<at::Tensor>& bias, std::optional<double> cell_clip,
                          std::optional<double> proj_clip, bool reverse) {
  check_lstm_layer_cuda_dtype(gates_in, "gates_in");
  const c10::cuda::CUDAGuard guard(gates_in.device());
  ctxkern::LstmLayerForward r = ctxkern::lstm_layer_forward<CudaCell>(
      gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse, /*train=*/true, at::kCUDA);
  return {r.out, r.h_n, r.c_n, r.gates, r.c_prev, r.h_prev, r.proj_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& gates,
    const at::Tensor& c_prev, const at::Tensor& h_prev, const at::Tensor& proj_raw, at::IntArrayRef batch_sizes,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, bool has_bias, std::optional<double> cell_clip,
    std::optional<double> proj_clip, bool reverse) {
  check_lstm_layer_cuda_dtype(gates, "gates");
  const c10::cuda::CUDAGuard guard(gates.device());
  return ctxkern::lstm_layer_backward<CudaCell>(dout, dh_n, dc_n, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh,
                                                w_hr, has_bias, cell_clip, proj_clip, reverse, at::kCUDA);
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CUDA, m) {
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_cuda));
  m.impl("layer_norm_bwd", TORCH_FN(layer_norm_bwd_cuda));
  m.impl("masked_mean_pool_fwd", TORCH_FN(masked_mean_pool_fwd_cuda));
  m.impl("masked_mean_pool_bwd", TORCH_FN(masked_mean_pool_bwd_cuda));
  m.impl("masked_mean_pool_varlen_fwd", TORCH_FN(masked_mean_pool_varlen_fwd_cuda));
  m.impl("masked_mean_pool_varlen_bwd", TORCH_FN(masked_mean_pool_varlen_bwd_cuda));
  m.impl("attention_fwd", TORCH_FN(attention_fwd_cuda));
  m.impl("attention_bwd", TORCH_FN(attention_bwd_cuda));
  m.impl("attention_varlen_fwd", TORCH_FN(attention_varlen_fwd_cuda));
  m.impl("attention_varlen_bwd", TORCH_FN(attention_varlen_bwd_cuda));
  m.impl("lstm_cell_fwd", TORCH_FN(lstm_cell_fwd_cuda));
  m.impl("lstm_cell_bwd", TORCH_FN(lstm_cell_bwd_cuda));
  m.impl("lstm_layer_fwd", TORCH_FN(lstm_layer_fwd_cuda));
  m.impl("lstm_layer_fwd_train", TORCH_FN(lstm_layer_fwd_train_cuda));
  m.impl("lstm_layer_bwd", TORCH_FN(lstm_layer_bwd_cuda));
}
