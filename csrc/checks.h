// Argument checks shared by the CPU and CUDA glue. The Python layer (ctxkern/ops/) validates first with
// friendlier messages; these guard direct calls of torch.ops.ctxkern.* so that bad input raises, never crashes.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

// fp32 / fp16 / bf16: the storage dtypes every ctxkern kernel supports.
#define CTXKERN_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace ctxkern {

inline void check_float_storage(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
}

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
                                      const std::optional<at::Tensor>& bias, at::DeviceType device) {
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
                                      const at::Tensor& rstd, at::DeviceType device) {
  check_layer_norm_fwd_args(x, residual, weight, std::nullopt, device);
  check_rows(dy, x, "dy");
  check_stats(mean, x, "mean");
  check_stats(rstd, x, "rstd");
}

}  // namespace ctxkern
