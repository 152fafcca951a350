// LSTM cell (torch's gate order i, f, g, o), forward and backward operators on the CPU; the kernels and their
// design are in lstm_cell_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "../lstm_cell_checks.h"
#include "lstm_cell_kernels.h"

namespace ctxkern {
namespace {

std::tuple<at::Tensor, at::Tensor> lstm_cell_fwd_cpu(const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                                                     const at::Tensor& c, const std::optional<at::Tensor>& bias,
                                                     std::optional<double> cell_clip) {
  check_lstm_cell_fwd_args(input_gates, hidden_gates, c, bias, cell_clip, at::kCPU);
  const int64_t B = c.size(0), H = c.size(1);
  at::Tensor h = at::empty({B, H}, c.options());
  at::Tensor c_new = at::empty({B, H}, c.options());
  if (B == 0 || H == 0) return {h, c_new};
  CTXKERN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "lstm_cell_fwd_cpu", [&] {
    forward(cell_args<scalar_t>(input_gates, hidden_gates, c, bias, cell_clip), B, h.data_ptr<scalar_t>(),
            c_new.data_ptr<scalar_t>());
  });
  return {h, c_new};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cpu(
    const at::Tensor& dh, const at::Tensor& dc_new, const at::Tensor& input_gates, const at::Tensor& hidden_gates,
    const at::Tensor& c, const std::optional<at::Tensor>& bias, std::optional<double> cell_clip) {
  check_lstm_cell_bwd_args(dh, dc_new, input_gates, hidden_gates, c, bias, cell_clip, at::kCPU);
  const int64_t B = c.size(0), H = c.size(1);
  at::Tensor dgates = at::empty({B, 4 * H}, c.options());
  at::Tensor dc = at::empty({B, H}, c.options());
  // A sum over no rows is zeros, so an empty batch still gets a defined dbias.
  at::Tensor dbias = bias ? at::zeros({4 * H}, c.options()) : at::empty({0}, c.options());
  if (B == 0 || H == 0) return {dgates, dc, dbias};
  CTXKERN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "lstm_cell_bwd_cpu", [&] {
    backward(cell_args<scalar_t>(input_gates, hidden_gates, c, bias, cell_clip), B, dh.const_data_ptr<scalar_t>(),
             dh.stride(0), dc_new.const_data_ptr<scalar_t>(), dc_new.stride(0), dgates.data_ptr<scalar_t>(),
             dc.data_ptr<scalar_t>(), bias ? dbias.data_ptr<scalar_t>() : nullptr);
  });
  return {dgates, dc, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cpu);
}

}  // namespace ctxkern
