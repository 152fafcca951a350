// Argument checks of the attention operators, shared by the CPU and CUDA glue. ctxkern/ops/attention.py
// validates first; these guard direct calls of torch.ops.ctxkern.attention_* so that bad input raises.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <utility>

#include "checks.h"
namespace ctxkern {

// q, k, v of one attention call: same dtype and device, float storage, contiguous last dim, `rank` dims with
// the head count and head dim last (dense: (B, S, H, D); varlen: (total, H, D)), D >= 1.
inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank,
                                at::DeviceType device) {
  TORCH_CHECK(q.device().type() == device, "q must be a ", device, " tensor, got ", q.device());
  check_float_storage(q, "q");
  const char* layout = rank == 4 ? "(B, S, H, D)" : "(total, H, D)";
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == rank, name, " must be ", rank, "-D ", layout, ", got ", t->dim(), "-D");
    if (t != &q) check_like(*t, q, name);
    TORCH_CHECK(t->size(rank - 1) <= 1 || t->stride(rank - 1) == 1, name, " must have a contiguous last dim");
  }
  TORCH_CHECK(q.size(rank - 1) >= 1, "q must have a head dim of at least 1");
  TORCH_CHECK(k.size(rank - 2) == q.size(rank - 2) && k.size(rank - 1) == q.size(rank - 1), "k must have q's ",
              "head count and head dim (", q.size(rank - 2), ", ", q.size(rank - 1), "), got ", k.sizes());
  if (rank == 4) TORCH_CHECK(k.size(0) == q.size(0), "k must have q's batch size ", q.size(0), ", got ", k.size(0));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
}

// A tensor shaped like `like` (dout like q, out like q) with a contiguous last dim.
inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_like(t, like, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a contiguous last dim");
}

inline void check_lse(const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef shape) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "lse must be on q's device ", q.device(), ", got ", lse.device());
  TORCH_CHECK(lse.sizes() == shape && lse.is_contiguous(), "lse must be a contiguous ", shape, " tensor, got ",
              lse.sizes());
}

inline void check_attention_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& key_padding_mask, double scale,
                                     at::DeviceType device) {
  check_attention_qkv(q, k, v, 4, device);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  if (!key_padding_mask) return;
  const at::Tensor& m = *key_padding_mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), "key_padding_mask must be on q's device ", q.device(), ", got ", m.device());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == k.size(0) && m.size(1) == k.size(1) && m.is_contiguous(),
              "key_padding_mask must be a contiguous (", k.size(0), ", ", k.size(1), ") tensor, got ", m.sizes());
}

inline void check_attention_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& key_padding_mask, double scale,
                                     at::DeviceType device) {
  check_attention_fwd_args(q, k, v, key_padding_mask, scale, device);
  check_same_shape(dout, q, "dout");
  check_same_shape(out, q, "out");
  check_lse(lse, q, {q.size(0), q.size(2), q.size(1)});
}

// cu_seqlens_q / cu_seqlens_k: int32 (B+1,) contiguous, of one length. Their values are the caller's to
// validate (reading them would cost a CUDA backend a device sync).
inline void check_attention_varlen_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                        at::DeviceType device) {
  check_attention_qkv(q, k, v, 3, device);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  for (const auto& [t, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"}, std::pair{&cu_seqlens_k, "cu_seqlens_k"}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t->device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) >= 1 && t->is_contiguous(), name,
                " must be a contiguous (B + 1,) tensor, got ", t->sizes());
  }
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), "cu_seqlens_k must have cu_seqlens_q's length ",
              cu_seqlens_q.size(0), ", got ", cu_seqlens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
}

inline void check_attention_varlen_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                            int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                            at::DeviceType device) {
  check_attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, device);
  check_same_shape(dout, q, "dout");
  check_same_shape(out, q, "out");
  check_lse(lse, q, {q.size(1), q.size(0)});
}

}  // namespace ctxkern
