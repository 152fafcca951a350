// Argument checks of the LSTM-cell operators, shared by the CPU and CUDA glue. ctxkern/ops/lstm_cell.py
// validates first; these guard direct calls of torch.ops.ctxkern.lstm_cell_* so that bad input raises.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace ctxkern {

// t is (rows, cols) like input_gates (dtype, device), with a contiguous last dim and any row stride.
inline void check_lstm_operand(const at::Tensor& t, const at::Tensor& gates, int64_t cols, const char* name) {
  TORCH_CHECK(t.scalar_type() == gates.scalar_type(), name, " must have input_gates' dtype ",
              gates.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == gates.device(), name, " must be on input_gates' device ", gates.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == gates.size(0) && t.size(1) == cols, name, " must have shape (",
              gates.size(0), ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim");
}

inline void check_lstm_cell_fwd_args(const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                                     const at::Tensor& c, const std::optional<at::Tensor>& bias,
                                     std::optional<double> cell_clip, at::DeviceType device) {
  TORCH_CHECK(input_gates.device().type() == device, "input_gates must be a ", device, " tensor, got ",
              input_gates.device());
  check_float_storage(input_gates, "input_gates");
  TORCH_CHECK(input_gates.dim() == 2, "input_gates must be 2-D (B, 4H), got ", input_gates.dim(), "-D");
  TORCH_CHECK(input_gates.size(1) % 4 == 0, "input_gates' width must be divisible by 4 (gates i, f, g, o), got ",
              input_gates.size(1));
  const int64_t H = input_gates.size(1) / 4;
  check_lstm_operand(input_gates, input_gates, 4 * H, "input_gates");
  check_lstm_operand(hidden_gates, input_gates, 4 * H, "hidden_gates");
  check_lstm_operand(c, input_gates, H, "c");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == input_gates.scalar_type() && bias->device() == input_gates.device(),
                "bias must have input_gates' dtype and device");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 4 * H && bias->is_contiguous(),
                "bias must be a contiguous (", 4 * H, ",) tensor, got ", bias->sizes());
  }
  TORCH_CHECK(!cell_clip || *cell_clip >= 0.0, "cell_clip must be >= 0 (or None), got ",
              cell_clip ? *cell_clip : 0.0);
}

inline void check_lstm_cell_bwd_args(const at::Tensor& dh, const at::Tensor& dc_new, const at::Tensor& input_gates,
                                     const at::Tensor& hidden_gates, const at::Tensor& c,
                                     const std::optional<at::Tensor>& bias, std::optional<double> cell_clip,
                                     at::DeviceType device) {
  check_lstm_cell_fwd_args(input_gates, hidden_gates, c, bias, cell_clip, device);
  check_lstm_operand(dh, input_gates, c.size(1), "dh");
  check_lstm_operand(dc_new, input_gates, c.size(1), "dc_new");
}

// The clip as the kernels take it: +inf when there is none, which makes the clamp and its mask no-ops.
inline float clip_bound(std::optional<double> cell_clip) {
  return cell_clip ? static_cast<float>(*cell_clip) : INFINITY;
}

}  // namespace ctxkern
