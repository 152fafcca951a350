// Torch-free launchers for the LayerNorm CUDA kernels (csrc/cuda/layer_norm.cu); csrc/cuda/bindings.cpp
// checks the tensors and calls these. Shapes: M rows of N columns; a row stride is in elements.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace ctxkern {
namespace cuda {

// y = (s - mean) * rstd * weight + bias with s = x + residual (s = x when residual is nullptr), per row; s
// is also written to sum_out unless it is nullptr (prenorm).
// Requires 1 <= N <= INT32_MAX and row strides >= 0 (rows may repeat or overlap: x, residual and dy are only
// read). M == 0 launches nothing.
cudaError_t layer_norm_fwd_launch(DType dtype,
                                  const void* x,         // (M, N), row stride x_stride
                                  int64_t x_stride,
                                  const void* residual,  // (M, N), row stride residual_stride, or nullptr
                                  int64_t residual_stride,
                                  const void* weight,    // (N,), or nullptr for 1
                                  const void* bias,      // (N,), or nullptr for 0
                                  void* y,               // (M, N) contiguous
                                  void* sum_out,         // (M, N) contiguous, or nullptr
                                  float* mean,           // (M,)
                                  float* rstd,           // (M,) 1 / sqrt(biased var + eps)
                                  int64_t M, int64_t N, float eps, cudaStream_t stream);

// Rows of fp32 workspace the backward may use: allocate (2, layer_norm_bwd_workspace_blocks(...), N)
// floats and pass the count back as workspace_blocks. sm_count: the device's multiprocessor count.
int64_t layer_norm_bwd_workspace_blocks(int64_t M, int64_t N, int sm_count);

// dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)) with xhat = (s - mean) * rstd, s recomputed
// from x and residual; dweight = sum over rows of dy * xhat, dbias = sum over rows of dy, reduced through
// per-block fp32 partials in workspace. Requirements as for the forward; M == 0 launches nothing, so the caller
// fills dweight and dbias (a sum over no rows) itself.
cudaError_t layer_norm_bwd_launch(DType dtype,
                                  const void* dy,        // (M, N), row stride dy_stride
                                  int64_t dy_stride,
                                  const void* x,         // (M, N), row stride x_stride
                                  int64_t x_stride,
                                  const void* residual,  // (M, N), row stride residual_stride, or nullptr
                                  int64_t residual_stride,
                                  const void* weight,    // (N,), or nullptr for 1
                                  const float* mean,     // (M,) from the forward
                                  const float* rstd,     // (M,) from the forward
                                  void* dx,              // (M, N) contiguous
                                  void* dweight,         // (N,), or nullptr when not wanted
                                  void* dbias,           // (N,), or nullptr when not wanted
                                  float* workspace,      // (2, workspace_blocks, N); may be nullptr when
                                  int64_t workspace_blocks,  // dweight and dbias both are
                                  int64_t M, int64_t N, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace ctxkern
