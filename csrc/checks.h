// Argument checks shared by the CPU and CUDA glue. The Python layer (ctxkern/ops/) validates first with
// friendlier messages; these guard direct calls of torch.ops.ctxkern.* so that bad input raises, never crashes.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
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

// cu_seqlens' values, for a kernel that reads them on the CPU (a malformed one must not index out of bounds):
// 0 first, non-decreasing, ending at `total` (named total_name), and, when max_name is given, no sequence longer
// than max_seqlen. Returns the longest sequence. The same wording as ctxkern/ops/_checks.py's check_offsets.
inline int64_t check_cu_seqlens_values(const at::Tensor& cu_seqlens, const char* name, int64_t total,
                                       const char* total_name, int64_t max_seqlen = 0,
                                       const char* max_name = nullptr) {
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();  // (B + 1,)
  const int64_t B = cu_seqlens.size(0) - 1;
  TORCH_CHECK(cu[0] == 0, name, " must start at 0, got ", cu[0]);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], name, " must be non-decreasing, got ", name, "[", b, "] = ", cu[b], " > ", name,
                "[", b + 1, "] = ", cu[b + 1]);
    longest = std::max<int64_t>(longest, cu[b + 1] - cu[b]);
  }
  TORCH_CHECK(cu[B] == total, name, " must end at ", total_name, " ", total, ", got ", cu[B]);
  TORCH_CHECK(max_name == nullptr || longest <= max_seqlen, max_name, " = ", max_seqlen,
              " is smaller than a sequence of ", longest, " in ", name);
  return longest;
}

}  // namespace ctxkern
