// Argument checks of the masked_mean_pool operators, shared by the CPU and CUDA glue. The Python layer
// (ctxkern/ops/masked_mean_pool.py) validates first, with friendlier messages and the mask converted to bool;
// these guard direct calls of torch.ops.ctxkern.masked_mean_pool_* so that bad input raises, never crashes.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace ctxkern {

// hidden: (B, S, D) dense or (total, D) packed, float storage, contiguous last dim.
inline void check_pool_hidden(const at::Tensor& hidden, int64_t dims, at::DeviceType device) {
  TORCH_CHECK(hidden.device().type() == device, "hidden must be a ", device, " tensor, got ", hidden.device());
  check_float_storage(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == dims, "hidden must be ", dims, "-D, got ", hidden.dim(), "-D");
  TORCH_CHECK(hidden.size(-1) <= 1 || hidden.stride(-1) == 1, "hidden must have a contiguous last dim");
}

// mask: (B, S) bool, contiguous, on `like`'s device.
inline void check_pool_mask(const at::Tensor& mask, int64_t B, const at::Tensor& like) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == like.device(), "mask must be on ", like.device(), ", got ", mask.device());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B, "mask must be (", B, ", S), got ", mask.sizes());
  TORCH_CHECK(mask.is_contiguous(), "mask must be contiguous");
}

// cu_seqlens: (B + 1,) int32, contiguous, on `like`'s device. Its values are checked where they are read.
inline void check_pool_cu_seqlens(const at::Tensor& cu_seqlens, const at::Tensor& like) {
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.device() == like.device(), "cu_seqlens must be on ", like.device(), ", got ",
              cu_seqlens.device());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.is_contiguous(),
              "cu_seqlens must be a contiguous (B + 1,) tensor, got ", cu_seqlens.sizes());
}

// dout: (B, D) contiguous; mean: the forward's (B, D) fp32 mean, or None.
inline void check_pool_bwd_args(const at::Tensor& dout, const std::optional<at::Tensor>& mean,
                                at::DeviceType device) {
  TORCH_CHECK(dout.device().type() == device, "dout must be a ", device, " tensor, got ", dout.device());
  check_float_storage(dout, "dout");
  TORCH_CHECK(dout.dim() == 2 && dout.is_contiguous(), "dout must be a contiguous (B, D) tensor, got ",
              dout.sizes());
  if (!mean) return;
  TORCH_CHECK(mean->scalar_type() == at::kFloat, "mean must be float32, got ", mean->scalar_type());
  TORCH_CHECK(mean->device() == dout.device(), "mean must be on ", dout.device(), ", got ", mean->device());
  TORCH_CHECK(mean->sizes() == dout.sizes() && mean->is_contiguous(), "mean must be a contiguous ", dout.sizes(),
              " tensor, got ", mean->sizes());
}

}  // namespace ctxkern
