// Torch-free launchers for the LSTM-cell CUDA kernels (csrc/cuda/lstm_cell.cu); csrc/cuda/bindings.cpp checks
// the tensors and calls these. Shapes: B rows, H cell units per row, gates (B, 4H) in torch's order i, f, g, o;
// a row stride is in elements, and every operand's last dim is contiguous.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace ctxkern {
namespace cuda {

// h = sigmoid(o) * tanh(c_new), c_new = clamp(sigmoid(f) * c + sigmoid(i) * tanh(g), -clip, clip) with
// gates = input_gates + hidden_gates + bias. clip = +inf for no clamp. B == 0 or H == 0 launches nothing.
// hidden_gates and bias may be null (no term: the layer operators pass pre-activations as input_gates), and
// c_new may be c itself (updated in place).
cudaError_t lstm_cell_fwd_launch(DType dtype,
                                 const void* input_gates,   // (B, 4H), row stride ig_stride
                                 int64_t ig_stride,
                                 const void* hidden_gates,  // (B, 4H), row stride hg_stride, or nullptr for 0
                                 int64_t hg_stride,
                                 const void* c,             // (B, H), row stride c_stride
                                 int64_t c_stride,
                                 const void* bias,          // (4H,), or nullptr for 0
                                 void* h,                   // (B, H) contiguous
                                 void* c_new,               // (B, H) contiguous, or c itself
                                 int64_t B, int64_t H, float clip, cudaStream_t stream);

// Rows of the fp32 dbias workspace the backward needs: allocate (lstm_cell_bwd_workspace_rows(B), 4H) floats.
int64_t lstm_cell_bwd_workspace_rows(int64_t B);

// Gradients of the forward: dgates (of input_gates and of hidden_gates alike), dc, and dbias = the sum of
// dgates over the rows, through per-row-chunk fp32 partials in workspace reduced in a fixed order.
// The activations are recomputed from the forward's inputs. B == 0 or H == 0 launches nothing, so the
// caller fills dbias (a sum over no rows) itself. hidden_gates and bias may be null as in the forward, dc may
// be dc_new itself (in place), and h, when not null, gets the forward's h again (recomputed in the same pass).
cudaError_t lstm_cell_bwd_launch(DType dtype,
                                 const void* dh,            // (B, H), row stride dh_stride
                                 int64_t dh_stride,
                                 const void* dc_new,        // (B, H), row stride dc_new_stride
                                 int64_t dc_new_stride,
                                 const void* input_gates,   // (B, 4H), row stride ig_stride
                                 int64_t ig_stride,
                                 const void* hidden_gates,  // (B, 4H), row stride hg_stride, or nullptr
                                 int64_t hg_stride,
                                 const void* c,             // (B, H), row stride c_stride
                                 int64_t c_stride,
                                 const void* bias,          // (4H,), or nullptr
                                 void* dgates,              // (B, 4H) contiguous
                                 void* dc,                  // (B, H) contiguous, or dc_new itself
                                 void* h,                   // (B, H) contiguous, or nullptr
                                 void* dbias,               // (4H,), or nullptr when bias is
                                 float* workspace,          // (lstm_cell_bwd_workspace_rows(B), 4H), or nullptr
                                 int64_t B, int64_t H, float clip, cudaStream_t stream);

}  // namespace cuda
}  // namespace ctxkern
