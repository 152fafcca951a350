// Argument checks of the layer_norm operators, shared by the CPU and CUDA glue. ctxkern/ops/layer_norm.py
// validates first; these guard direct calls of torch.ops.ctxkern.layer_norm_* so that bad input raises.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>

#include "checks.h"

namespace ctxkern {

// (M, N) with a contiguous last dim and any row stride.
inline void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_like(t, x, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), name, " must have shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim");
}

inline void check_vector(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t) return;
  check_like(*t, x, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), name, " must have shape (", x.size(1), ",), got ",
              t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
}

inline void check_stats(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), name,
              " must be a contiguous (", x.size(0), ",) tensor, got ", t.sizes());
}

inline void check_layer_norm_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, at::DeviceType device,
                                      bool prenorm = false) {
  TORCH_CHECK(!prenorm || residual.has_value(), "prenorm needs a residual: it returns x + residual");
  TORCH_CHECK(x.device().type() == device, "x must be a ", device, " tensor, got ", x.device());
  check_float_storage(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (M, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) >= 1, "x must have a last dim of at least 1");
  check_rows(x, x, "x");
  if (residual) check_rows(*residual, x, "residual");
  check_vector(weight, x, "weight");
  check_vector(bias, x, "bias");
}

inline void check_layer_norm_bwd_args(const at::Tensor& dy, const at::Tensor& x,
                                      const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& rstd, const std::optional<at::Tensor>& dsum,
                                      at::DeviceType device) {
  check_layer_norm_fwd_args(x, residual, weight, std::nullopt, device);
  check_rows(dy, x, "dy");
  if (dsum) check_rows(*dsum, x, "dsum");
  check_stats(mean, x, "mean");
  check_stats(rstd, x, "rstd");
}

// eps as the kernels take it: a float, so finite in fp32 as well as >= 0.
inline void check_layer_norm_eps(double eps) {
  TORCH_CHECK(eps >= 0.0 && eps <= std::numeric_limits<float>::max(), "eps must be finite and >= 0, got ", eps);
}

}  // namespace ctxkern
