// Torch-free launchers for the masked mean pooling CUDA kernels (csrc/cuda/masked_mean_pool.cu);
// csrc/cuda/bindings.cpp checks the tensors and calls these. A "sequence" is either a row of a dense (B, S, D)
// hidden with a (B, S) mask (mask != nullptr) or a slice cu_seqlens[b] .. cu_seqlens[b + 1] of a packed (total, D)
// hidden (cu_seqlens != nullptr); exactly one of the two is given. Strides are in elements.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace ctxkern {
namespace cuda {

// How many blocks split each sequence's tokens in the forward (>= 1): more when B * D alone cannot fill the
// device. tokens_per_sequence: S (dense) or total / B (packed). The forward needs an fp32 workspace of
// (splits, B, D) floats.
int64_t masked_mean_pool_fwd_splits(int64_t B, int64_t tokens_per_sequence, int64_t D, int sm_count);

// out[b] = mean of sequence b's real tokens (zeros when it has none), or that mean / max(||mean||2, 1e-12) with
// normalize; mean[b] = the fp32 mean itself when mean != nullptr. Requires 1 <= D <= INT32_MAX, 1 <= splits <=
// 65535, strides >= 0, and a cu_seqlens that starts at 0 and never decreases (not checked here). B == 0 launches
// nothing.
cudaError_t masked_mean_pool_fwd_launch(DType dtype,
                                        const void* hidden,          // (B, S, D) or (total, D), last dim contiguous
                                        int64_t batch_stride,        // dense: between sequences
                                        int64_t token_stride,        // between tokens
                                        const uint8_t* mask,         // (B, S) 0/1 contiguous, or nullptr
                                        const int32_t* cu_seqlens,   // (B + 1,), or nullptr
                                        float* workspace,            // (splits, B, D)
                                        int64_t splits,
                                        void* out,                   // (B, D) contiguous
                                        float* mean,                 // (B, D) contiguous, or nullptr
                                        int64_t B, int64_t S, int64_t D, bool normalize, cudaStream_t stream);

// dhidden[token of sequence b] = g[b] at real tokens, zeros at padding, with g[b] = dL/dmean[b] / count:
// dout[b] without normalize; with it (mean != nullptr), the derivative of mean / max(n, 1e-12), n = ||mean||,
// applied to dout[b]. g (B, D) is a workspace in the storage dtype. Requires 1 <= D <= INT32_MAX and, when
// packed, cu_seqlens[B] == tokens; tokens == 0 launches nothing.
cudaError_t masked_mean_pool_bwd_launch(DType dtype,
                                        const void* dout,            // (B, D) contiguous
                                        const float* mean,           // (B, D) fp32 from the forward, or nullptr
                                        const uint8_t* mask,         // (B, S) 0/1 contiguous, or nullptr
                                        const int32_t* cu_seqlens,   // (B + 1,), or nullptr
                                        void* g,                     // (B, D) workspace
                                        void* dhidden,               // (tokens, D) contiguous
                                        int64_t tokens,              // B * S (dense) or total (packed)
                                        int64_t B, int64_t S, int64_t D, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace ctxkern
