// Host-side dispatch shared by the attention launchers: storage dtype and head dim onto template kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention.h"
#include "common.cuh"

namespace ctxkern {
namespace cuda {
namespace attn {

constexpr int64_t kMaxGridX = 0x7fffffff;

template <typename T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

// Calls f(TypeTag<T>{}, IntConst<D>{}) for the storage type and one of the supported head dims.
template <typename F>
cudaError_t dispatch(DType dtype, int head_dim, F&& f) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    switch (head_dim) {
      case 32:
        return f(tag, IntConst<32>{});
      case 64:
        return f(tag, IntConst<64>{});
      case 80:
        return f(tag, IntConst<80>{});
      case 96:
        return f(tag, IntConst<96>{});
      case 128:
        return f(tag, IntConst<128>{});
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace attn
}  // namespace cuda
}  // namespace ctxkern
