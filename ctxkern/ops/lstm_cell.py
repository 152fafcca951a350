"""ops.lstm_cell: one fused LSTM step, torch's gate order i, f, g, o, with AllenNLP's optional cell clip.

The cpu and cuda backends are one operator, torch.ops.ctxkern.lstm_cell_fwd (schema in csrc/ops.cpp),
dispatched by device; the triton backend is a custom_op around kernels/lstm_cell.py's launchers (custom_op,
not triton_op, for the reason given in ctxkern/ops/layer_norm.py). Both get the same fake kernels and autograd.
The forward saves nothing of its own: the backward recomputes the activations from input_gates, hidden_gates,
bias and c (which autograd keeps anyway), so a training step writes no (B, 4H) activation tensor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch
from ctxkern.ops import _autograd_modes
from ctxkern.ops._checks import check_float_dtype, check_like, check_shape, check_tensor, last_dim_contiguous
from ctxkern.ops._register import register_op
from ctxkern.reference import lstm_cell_ref


def _fwd_fake(input_gates: Tensor, hidden_gates: Tensor, c: Tensor, bias: Optional[Tensor],
              cell_clip: Optional[float]) -> tuple[Tensor, Tensor]:
    return c.new_empty(c.shape), c.new_empty(c.shape)


def _bwd_fake(dh: Tensor, dc_new: Tensor, input_gates: Tensor, hidden_gates: Tensor, c: Tensor,
              bias: Optional[Tensor], cell_clip: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    dbias = c.new_empty((input_gates.shape[1] if bias is not None else 0,))
    return c.new_empty(input_gates.shape), c.new_empty(c.shape), dbias


@torch.library.custom_op("ctxkern::lstm_cell_fwd_triton", mutates_args=())
def _lstm_cell_fwd_triton(input_gates: Tensor, hidden_gates: Tensor, c: Tensor, bias: Optional[Tensor],
                          cell_clip: Optional[float]) -> tuple[Tensor, Tensor]:
    from ctxkern.kernels.lstm_cell import lstm_cell_fwd_triton

    return lstm_cell_fwd_triton(input_gates, hidden_gates, c, bias, cell_clip)


@torch.library.custom_op("ctxkern::lstm_cell_bwd_triton", mutates_args=())
def _lstm_cell_bwd_triton(dh: Tensor, dc_new: Tensor, input_gates: Tensor, hidden_gates: Tensor, c: Tensor,
                          bias: Optional[Tensor], cell_clip: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    from ctxkern.kernels.lstm_cell import lstm_cell_bwd_triton

    return lstm_cell_bwd_triton(dh, dc_new, input_gates, hidden_gates, c, bias, cell_clip)


def _setup_context(ctx, inputs, output):
    input_gates, hidden_gates, c, bias, cell_clip = inputs
    ctx.save_for_backward(input_gates, hidden_gates, c, bias)
    ctx.cell_clip = cell_clip


def _backward(bwd_op, ctx, dh, dc_new):
    input_gates, hidden_gates, c, bias = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the backward kernel is not differentiable, the reference's backward is.
        return _autograd_modes.reference_vjp(lstm_cell_ref, (input_gates, hidden_gates, c, bias, ctx.cell_clip),
                                             (dh, dc_new))
    # An output that took no part in the loss may come back as None.
    dh = torch.zeros_like(c) if dh is None else dh
    dc_new = torch.zeros_like(c) if dc_new is None else dc_new
    dgates, dc, dbias = bwd_op(last_dim_contiguous(dh), last_dim_contiguous(dc_new), input_gates, hidden_gates, c,
                               bias, ctx.cell_clip)
    # The gates are input_gates + hidden_gates + bias: both gate inputs get the same gradient.
    return dgates, dgates, dc, dbias if bias is not None else None, None


# backend -> forward operator
_FWD = register_op(("ctxkern::lstm_cell_fwd_triton", "ctxkern::lstm_cell_bwd_triton"),
                   ("ctxkern::lstm_cell_fwd", "ctxkern::lstm_cell_bwd"),
                   _fwd_fake, _bwd_fake, _setup_context, _backward)
if _dispatch.HAS_EXTENSION:
    @torch.library.register_fake("ctxkern::lstm_layer_fwd")
    def _lstm_layer_fwd_fake(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse):
        return gates_in.new_empty((gates_in.shape[0], h0.shape[1])), h0.new_empty(h0.shape), c0.new_empty(c0.shape)

    @torch.library.register_fake("ctxkern::lstm_layer_fwd_train")
    def _lstm_layer_fwd_train_fake(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse):
        rows, p = gates_in.shape[0], h0.shape[1]
        out, h_n, c_n = _lstm_layer_fwd_fake(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip,
                                             reverse)
        # gates (N, 4H), c_prev (N, H), h_prev (N, P), proj_raw (N or 0, P)
        return (out, h_n, c_n, gates_in.new_empty(gates_in.shape), c0.new_empty((rows, c0.shape[1])),
                h0.new_empty((rows, p)), h0.new_empty((rows if proj_clip is not None else 0, p)))

    @torch.library.register_fake("ctxkern::lstm_layer_bwd")
    def _lstm_layer_bwd_fake(dout, dh_n, dc_n, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh, w_hr, has_bias,
                             cell_clip, proj_clip, reverse):
        width = gates.shape[1]
        return (gates.new_empty(gates.shape), dh_n.new_empty(dh_n.shape), dc_n.new_empty(dc_n.shape),
                w_hh.new_empty(w_hh.shape), w_hh.new_empty(w_hr.shape if w_hr is not None else (0,)),
                gates.new_empty((width if has_bias else 0,)))


def _check(input_gates, hidden_gates, c, bias, cell_clip) -> None:
    check_tensor(input_gates, "input_gates")
    check_float_dtype(input_gates, "input_gates", _autograd_modes.ACCEPTED_DTYPES)
    if input_gates.dim() != 2:
        raise ValueError(f"input_gates must be 2-D (B, 4H), got shape {tuple(input_gates.shape)}")
    batch, width = input_gates.shape
    if width % 4 != 0:
        raise ValueError(f"input_gates' width must be divisible by 4 (gates i, f, g, o), got {width}")
    check_like(hidden_gates, input_gates, "hidden_gates", "input_gates")
    check_shape(hidden_gates, (batch, width), "hidden_gates")
    check_like(c, input_gates, "c", "input_gates")
    check_shape(c, (batch, width // 4), "c")
    if bias is not None:
        check_like(bias, input_gates, "bias", "input_gates")
        check_shape(bias, (width,), "bias")
    if cell_clip is not None and not (isinstance(cell_clip, (int, float)) and cell_clip >= 0):
        raise ValueError(f"cell_clip must be a number >= 0 or None, got {cell_clip!r}")


def lstm_cell(input_gates: Tensor, hidden_gates: Tensor, c: Tensor, bias: Optional[Tensor] = None, *,
              cell_clip: Optional[float] = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One LSTM step -> (h, c_new), each (B, H).

    input_gates, hidden_gates: (B, 4H), x W_ih^T and h W_hh^T; c: (B, H); bias: (4H,) = b_ih + b_hh or None.
    Gate order i, f, g, o: c_new = sigmoid(f) * c + sigmoid(i) * tanh(g), clamped to +-cell_clip when given,
    then h = sigmoid(o) * tanh(c_new). float32, float16, bfloat16 (the kernels) or float64 (the reference, on
    every backend). Differentiable in every tensor argument, in every autograd mode: double backward,
    forward-mode AD and torch.func transforms run the reference (ctxkern/ops/_autograd_modes.py).
    backend: "auto", "torch", "cpu", "cuda" or "triton".
    """
    _check(input_gates, hidden_gates, c, bias, cell_clip)
    name = _dispatch.resolve(backend, input_gates.device)
    clip = None if cell_clip is None or math.isinf(cell_clip) else float(cell_clip)
    if name == "torch" or c.numel() == 0 or _autograd_modes.reference_needed(c.dtype):
        return lstm_cell_ref(input_gates, hidden_gates, c, bias, clip)
    return _FWD[name](last_dim_contiguous(input_gates), last_dim_contiguous(hidden_gates), last_dim_contiguous(c),
                      None if bias is None else bias.contiguous(), clip)
