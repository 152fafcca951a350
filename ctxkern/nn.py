"""Drop-in modules: same constructors, parameters and state_dict as their torch.nn counterparts."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ctxkern import _dispatch
from ctxkern import ops
from ctxkern.ops import _autograd_modes, lstm_cell
from ctxkern.reference import layer_norm_ref

__all__ = ["LayerNorm", "LSTM", "MaskedMeanPool"]

_REDUCED = (torch.float16, torch.bfloat16)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on ctxkern's fused kernel; forward also takes an optional residual to add first.

    Subclasses torch.nn.LayerNorm, so construction, parameters, state_dict and isinstance checks are torch's.
    Runs every dtype combination torch.nn.LayerNorm runs, with its output dtype: input and parameters of
    one dtype (float32, float16, bfloat16 on the kernels, float64 on the reference), and float32 parameters
    with a float16 or bfloat16 input (mixed precision: computed in float32 and returned in the input's dtype,
    through the reference, since the kernels take parameters in the input's dtype and rounding the
    parameters to it would not give torch's result).
    backend (keyword-only): which ctxkern backend serves it ("auto" by default).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = _dispatch.check_choice(backend)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *, prenorm: bool = False):
        """LayerNorm(input + residual); prenorm=True (needs residual) returns (y, input + residual), the residual
        stream of a pre-LN block, from one fused pass (ops.layer_norm's prenorm)."""
        k = len(self.normalized_shape)
        if (k == 1 and isinstance(input, Tensor) and input.dim() and input.shape[-1] == self.normalized_shape[0]
                and (self.weight is None or self.weight.dtype == input.dtype)):
            # One normalized dim in the input's dtype, the common case: ops.layer_norm's checks cover the rest,
            # and no reshape (a view node per parameter in the autograd graph) is needed. Mixed precision goes on.
            return ops.layer_norm(input, self.weight, self.bias, self.eps, residual=residual, prenorm=prenorm,
                                  backend=self.backend)
        if tuple(input.shape[-k:]) != tuple(self.normalized_shape):
            raise ValueError(f"input's trailing dims must be normalized_shape {tuple(self.normalized_shape)}, "
                             f"got input of shape {tuple(input.shape)}")
        if residual is not None and residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        if prenorm and residual is None:
            raise ValueError("prenorm=True needs a residual: it returns (y, input + residual)")
        n = math.prod(self.normalized_shape)
        # Normalizing over k trailing dims is normalizing over one flattened dim of their product.
        flat = input.reshape(*input.shape[:input.dim() - k], n)
        weight = None if self.weight is None else self.weight.reshape(n)
        bias = None if self.bias is None else self.bias.reshape(n)
        residual = None if residual is None else residual.reshape(flat.shape)
        if self._mixed_precision(input, weight, bias):
            if residual is not None and residual.dtype != input.dtype:
                raise ValueError(f"residual must have input's dtype {input.dtype}, got {residual.dtype}")
            _dispatch.resolve(self.backend, input.device)  # a backend that cannot run still says so
            y = layer_norm_ref(flat, weight, bias, self.eps, residual)
            total = flat + residual if prenorm else None
        else:
            out = ops.layer_norm(flat, weight, bias, self.eps, residual=residual, prenorm=prenorm, backend=self.backend)
            y, total = out if prenorm else (out, None)
        return (y.view(input.shape), total.view(input.shape)) if prenorm else y.view(input.shape)

    @staticmethod
    def _mixed_precision(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
        """float32 parameters with a float16 / bfloat16 input, which torch.nn.LayerNorm accepts on a CPU."""
        params = [p for p in (weight, bias) if p is not None]
        if not isinstance(input, Tensor) or all(p.dtype == input.dtype for p in params):
            return False
        return input.dtype in _REDUCED and all(p.dtype == torch.float32 for p in params)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class MaskedMeanPool(torch.nn.Module):
    """Sentence embedding from token states: the mean over the real tokens, optionally L2-normalized.

    forward(hidden (B, S, D), mask (B, S) bool / integer / float, nonzero = token) -> (B, D), as
    sentence-transformers' Pooling (mean mode), followed by its Normalize when normalize=True.
    backend (keyword-only): which ctxkern backend serves it ("auto" by default).
    """

    def __init__(self, normalize: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        self.normalize = bool(normalize)
        self.backend = _dispatch.check_choice(backend)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return ops.masked_mean_pool(hidden, mask, normalize=self.normalize, backend=self.backend)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- LSTM
# ctxkern.nn.LSTM: torch.nn.LSTM on the fused LSTM cell, plus AllenNLP's cell and projection clipping.
#
# Per layer and direction, the input projection of every time step is one matrix product up front; each step
# is then one matrix product for the recurrent input, the fused cell (ops.lstm_cell) and, with proj_size, the
# projection. Padded tensors and PackedSequence run the same loop over a packed layout: time-major rows where
# step t holds the batch_sizes[t] sequences still running, a prefix of the batch because a PackedSequence is
# sorted by decreasing length. So the reverse direction, walking t from the end, picks up each sequence at its
# own last token (its rows keep h0/c0 until then), and the forward direction leaves each sequence's state at
# its own last step, which is h_n/c_n.
# Where the layer operators have a kernel (cpu; cuda once registered), the time loop runs inside them (the same
# steps in C++, csrc/lstm_layer_loop.h, into preallocated buffers): torch.ops.ctxkern.lstm_layer_fwd when nothing
# needs a gradient, and lstm_layer_fwd_train + lstm_layer_bwd (the whole backward through time) through one
# autograd.Function per layer and direction otherwise. The input projection stays a torch.mm outside, so autograd
# gives dx and dW_ih. Elsewhere (triton, forward-mode AD, torch.func, double backward) autograd flows through a
# Python loop over ops.lstm_cell.

def _check_clip(value: Optional[float], name: str) -> Optional[float]:
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0 or None, got {value!r}")
    # 0 means "no clip", as AllenNLP's `if self.memory_cell_clip_value:` reads it (ELMo's options use 0 so).
    return None if value is None or value == 0 else float(value)


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM (same constructor, parameters, initialization, state_dict and outputs) on ctxkern's cell.

    Keyword-only extras: cell_clip clamps the memory cell to +-cell_clip before its tanh, proj_clip clamps the
    projected output (it needs proj_size > 0), as AllenNLP's LSTM with projection; a clip of 0 or None means no
    clip, as in AllenNLP. reverse=True (with bidirectional=False) runs the one direction backwards: in a
    PackedSequence each sequence from its own last token to its first, as ELMo's backward stack and AllenNLP's
    LstmCellWithProjection(go_forward=False) do (a padded tensor: over all its T steps, as torch.nn.LSTM's reverse
    direction); its parameters keep the names without "_reverse".
    backend picks the cell's ctxkern backend. forward(input, hx=None) -> (output, (h_n, c_n)) takes a padded
    tensor or a PackedSequence.
    Input and parameters share a dtype, as torch.nn.LSTM requires: float32, float16, bfloat16 (the kernels) or
    float64 (the cell's reference).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, cell_clip: Optional[float] = None, proj_clip: Optional[float] = None,
                 reverse: bool = False, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                         device=device, dtype=dtype)
        self.cell_clip = _check_clip(cell_clip, "cell_clip")
        self.proj_clip = _check_clip(proj_clip, "proj_clip")
        if self.proj_clip is not None and proj_size == 0:
            raise ValueError("proj_clip clamps the projected output, so it needs proj_size > 0")
        if reverse and bidirectional:
            raise ValueError("reverse=True runs a single direction backwards, so it needs bidirectional=False")
        self.reverse = bool(reverse)
        self.backend = _dispatch.check_choice(backend)

    def extra_repr(self) -> str:
        extra = [f"{name}={getattr(self, name)}" for name in ("cell_clip", "proj_clip")
                 if getattr(self, name) is not None] + (["reverse=True"] if self.reverse else [])
        return ", ".join([super().extra_repr(), *extra, f"backend={self.backend!r}"])

    # ----------------------------------------------------------------------------------------- checks

    def _check_input(self, data: Tensor, name: str = "input") -> None:
        if data.shape[-1] != self.input_size:
            raise ValueError(f"{name} must have input_size = {self.input_size} features in its last dim, "
                             f"got shape {tuple(data.shape)}")
        weight = self.weight_ih_l0
        if data.dtype != weight.dtype or data.device != weight.device:
            raise ValueError(f"{name} must have the parameters' dtype {weight.dtype} and device {weight.device}, "
                             f"got {data.dtype} on {data.device}")

    def _initial_state(self, hx, batch: int, like: Tensor, unbatched: bool) -> tuple[Tensor, Tensor]:
        """(h0, c0) as (num_layers * num_directions, batch, P or H), zeros when hx is None."""
        ndir = 2 if self.bidirectional else 1
        out_size = self.proj_size or self.hidden_size
        shapes = {"h0": (self.num_layers * ndir, batch, out_size), "c0": (self.num_layers * ndir, batch,
                                                                           self.hidden_size)}
        if hx is None:
            return tuple(like.new_zeros(shape) for shape in shapes.values())
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"hx must be a tuple (h0, c0), got {type(hx).__name__}")
        state = []
        for (name, shape), t in zip(shapes.items(), hx):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            expected = (shape[0], shape[2]) if unbatched else shape
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
            if t.dtype != like.dtype or t.device != like.device:
                raise ValueError(f"{name} must have input's dtype {like.dtype} and device {like.device}, "
                                 f"got {t.dtype} on {t.device}")
            state.append(t.unsqueeze(1) if unbatched else t)
        return state[0], state[1]

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            self._check_input(data, "input.data")
            batch_sizes = batch_sizes_t.tolist()
            batch = batch_sizes[0] if batch_sizes else 0
        else:
            layouts = ("a 3-D (T, B, input_size) tensor ((B, T, input_size) with batch_first), a 2-D unbatched "
                       "(T, input_size) one, or a PackedSequence")
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be {layouts}; got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"input must be {layouts}; got shape {tuple(input.shape)}")
            self._check_input(input)
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            steps, batch = x.shape[0], x.shape[1]
            data = x.reshape(steps * batch, self.input_size)  # (T * B, I), time-major like packed data
            batch_sizes = [batch] * steps
            sorted_indices = unsorted_indices = None

        h0, c0 = self._initial_state(hx, batch, data, unbatched)
        if sorted_indices is not None:
            # The caller's state is in the caller's batch order; the packed rows are sorted by length.
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        out, h_n, c_n = self._run(data, batch_sizes, h0, c0)

        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        if packed:
            return PackedSequence(out, batch_sizes_t, sorted_indices, unsorted_indices), (h_n, c_n)
        out = out.view(len(batch_sizes), batch, out.shape[-1])  # (T, B, D * P)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)

    def _run(self, data: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor):
        """All layers over packed rows data (N, I) -> (output (N, D * P), h_n, c_n)."""
        ndir = 2 if self.bidirectional else 1
        offsets = [0]
        for n in batch_sizes:
            offsets.append(offsets[-1] + n)
        h_n, c_n = [], []
        layer_input = data
        for layer in range(self.num_layers):
            outs = []
            for direction in range(ndir):
                k = layer * ndir + direction
                out, h, c = self._run_direction(layer_input, batch_sizes, offsets, h0[k], c0[k], layer, direction)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if ndir == 1 else torch.cat(outs, dim=1)  # (N, D * P)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    def _layer_path(self, *tensors: Optional[Tensor]) -> Optional[str]:
        """How a layer's time loop runs: "infer" (the operator lstm_layer_fwd, nothing needs a gradient),
        "train" (lstm_layer_fwd_train and lstm_layer_bwd through _LayerFunction) or None (the Python step loop
        over ops.lstm_cell: the triton and torch backends, a device without the operators, forward-mode AD and
        torch.func transforms). On a CPU a Python step costs as much as a small step's arithmetic."""
        x = tensors[0]
        name = _dispatch.resolve(self.backend, x.device)
        if not _layer_ops_available(name) or (x.dtype == torch.float64 and name != "cpu"):
            return None
        if _autograd_modes.transform_active():
            return None
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return "train" if needs_grad else "infer"

    def _run_direction(self, x: Tensor, batch_sizes: list[int], offsets: list[int], h: Tensor, c: Tensor,
                       layer: int, direction: int):
        """One layer, one direction over packed rows x (N, I_layer) -> (out (N, P), h_n (B, P), c_n (B, H))."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        backwards = direction == 1 or self.reverse
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        w_hr = getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None
        bias = getattr(self, "bias_ih" + suffix) + getattr(self, "bias_hh" + suffix) if self.bias else None

        gates_in = torch.mm(x, w_ih.t())  # (N, 4H): the input projection of every step at once
        path = self._layer_path(x, h, c, w_ih, w_hh, w_hr, bias)
        if path == "infer":
            return torch.ops.ctxkern.lstm_layer_fwd(gates_in, batch_sizes, h, c, w_hh, w_hr, bias, self.cell_clip,
                                                    self.proj_clip, backwards)
        loop = _StepLoop(batch_sizes, offsets, self.cell_clip, self.proj_clip, backwards, self.backend)
        if path == "train":
            return _LayerFunction.apply(gates_in, h, c, w_hh, w_hr, bias, loop)
        return loop(gates_in, h, c, w_hh, w_hr, bias)


@functools.cache
def _layer_ops_available(backend: str) -> bool:
    """Whether the layer operators have a kernel for the backend's device (cpu: csrc/cpu/lstm_layer.cpp)."""
    if backend not in ("cpu", "cuda") or not _dispatch.HAS_EXTENSION:
        return False
    key = "CPU" if backend == "cpu" else "CUDA"
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ctxkern::{op}", key)
               for op in ("lstm_layer_fwd", "lstm_layer_fwd_train", "lstm_layer_bwd"))


class _StepLoop:
    """One layer and direction as a Python loop over ops.lstm_cell, differentiable in every autograd mode:
    (gates_in (N, 4H), h0 (B, P), c0 (B, H), w_hh, w_hr, bias) -> (out (N, P), h_n, c_n). It also serves
    _LayerFunction's double backward."""

    def __init__(self, batch_sizes: list[int], offsets: list[int], cell_clip: Optional[float],
                 proj_clip: Optional[float], backwards: bool, backend: str) -> None:
        self.batch_sizes, self.offsets, self.backwards, self.backend = batch_sizes, offsets, backwards, backend
        self.cell_clip, self.proj_clip = cell_clip, proj_clip

    def __call__(self, gates_in: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                 bias: Optional[Tensor]):
        w_hh_t = w_hh.t()
        w_hr_t = None if w_hr is None else w_hr.t()
        batch_sizes, offsets = self.batch_sizes, self.offsets
        outs: list[Optional[Tensor]] = [None] * len(batch_sizes)
        steps = range(len(batch_sizes) - 1, -1, -1) if self.backwards else range(len(batch_sizes))
        for t in steps:
            n, start = batch_sizes[t], offsets[t]
            h_cell, c_new = lstm_cell(gates_in[start:start + n], torch.mm(h[:n], w_hh_t), c[:n], bias,
                                      cell_clip=self.cell_clip, backend=self.backend)
            h_new = h_cell if w_hr_t is None else torch.mm(h_cell, w_hr_t)
            if self.proj_clip is not None:
                h_new = h_new.clamp(-self.proj_clip, self.proj_clip)
            outs[t] = h_new
            if n < h.shape[0]:
                # Rows n.. are sequences that have ended (forward) or not yet begun (reverse): state kept.
                h, c = torch.cat((h_new, h[n:])), torch.cat((c_new, c[n:]))
            else:
                h, c = h_new, c_new
        out = torch.cat(outs) if outs else gates_in.new_empty((0, h.shape[1]))
        return out, h, c


class _LayerFunction(torch.autograd.Function):
    """One layer and direction on the compiled operators: lstm_layer_fwd_train saves each step's pre-activations
    and starting state, lstm_layer_bwd runs the whole backward through time. A backward that builds a graph
    (create_graph=True) runs the step loop's instead, through autograd, from the saved inputs."""

    @staticmethod
    def forward(ctx, gates_in, h0, c0, w_hh, w_hr, bias, loop: _StepLoop):
        out, h_n, c_n, gates, c_prev, h_prev, proj_raw = torch.ops.ctxkern.lstm_layer_fwd_train(
            gates_in, loop.batch_sizes, h0, c0, w_hh, w_hr, bias, loop.cell_clip, loop.proj_clip, loop.backwards)
        ctx.save_for_backward(gates_in, h0, c0, w_hh, w_hr, bias, gates, c_prev, h_prev, proj_raw)
        ctx.loop = loop
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        gates_in, h0, c0, w_hh, w_hr, bias, gates, c_prev, h_prev, proj_raw = ctx.saved_tensors
        loop = ctx.loop
        if torch.is_grad_enabled():
            # create_graph=True: the operator's backward is not differentiable, the step loop is.
            grads = _autograd_modes.reference_vjp(loop, (gates_in, h0, c0, w_hh, w_hr, bias), (dout, dh_n, dc_n))
            return (*grads, None)
        dgates, dh0, dc0, dw_hh, dw_hr, dbias = torch.ops.ctxkern.lstm_layer_bwd(
            dout, dh_n, dc_n, gates, c_prev, h_prev, proj_raw, loop.batch_sizes, w_hh, w_hr, bias is not None,
            loop.cell_clip, loop.proj_clip, loop.backwards)
        return dgates, dh0, dc0, dw_hh, dw_hr if w_hr is not None else None, dbias if bias is not None else None, None
