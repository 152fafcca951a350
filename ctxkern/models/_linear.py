"""The models' linear layers: torch.nn.Linear, plus an activation, with fp32 CPU inference on oneDNN.

torch runs an fp32 matrix product on the CPU through MKL's sgemm, which on AMD CPUs takes a generic code path:
on this project's 2-core AMD EPYC it reaches about 190 GFLOP/s at BERT's shapes, where oneDNN's matmul (which
torch already uses for bf16) reaches about 450 GFLOP/s, at the same fp32 accuracy. oneDNN's matmul is reached
through `torch.ops.mkldnn._linear_pointwise`, the operator torch.compile's CPU backend emits for linear layers;
it also fuses the activation into the product. It has no autograd formula, so it serves only where no gradient
is needed; elsewhere, and on torch builds without it, the layer is F.linear followed by the activation.

oneDNN builds (and caches) a primitive per input shape, and each one holds memory: 1000 encode calls on varied
sentences, hence varied packed token counts, grew the process by ~380 MB, where fixed shapes stay flat. So the
rows the product sees are padded up to one of a bounded set of counts (row_bucket): at most 16 per doubling,
at most 6.25% more rows from 256 rows on (below that the product is bound by reading the weights, so the
few extra rows cost next to nothing).

The weight is handed to oneDNN already reordered into its blocked layout (Linear.packed_weight, cached per
layer: a second copy of the weights in memory), which saved 3-5% of encode's CPU time here, the reorder
oneDNN otherwise does on every call.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor



QUICK_GELU_ALPHA = 1.702


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's QuickGELU, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


# activation name (Hugging Face's hidden_act) -> (eager function, oneDNN post-op, oneDNN algorithm).
# QuickGELU has no oneDNN post-op of its own (torch passes swish no alpha), but
# z * sigmoid(a z) = swish(a z) / a, and a z is the product with a-scaled parameters: see Linear.
ACTIVATIONS: dict[Optional[str], tuple[Callable[[Tensor], Tensor], str, str]] = {
    None: (lambda x: x, "none", ""),
    "gelu": (F.gelu, "gelu", "none"),
    "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    "gelu_pytorch_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    "relu": (F.relu, "relu", ""),
    "silu": (F.silu, "swish", ""),
    "swish": (F.silu, "swish", ""),
    "quick_gelu": (quick_gelu, "swish", ""),
}


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_LINEAR = _onednn_linear_available()

# The row count oneDNN's weight layout is chosen for (any count runs on it): a typical packed batch.
PACKED_ROWS_HINT = 1024
# Row counts below this are rounded up to a multiple of 8; above, to a multiple of 1/16 of their power of two.
_FINE_BUCKETS_BELOW = 256


def row_bucket(rows: int) -> int:
    """The smallest bucketed row count >= rows: 8 * k below 256, then 16 buckets per doubling."""
    step = 8 if rows < _FINE_BUCKETS_BELOW else 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same parameters and state_dict) followed by `activation`, one of ACTIVATIONS."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 activation: Optional[str] = None, device=None, dtype=None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(str, ACTIVATIONS))}, got {activation!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        eager, post_op, algorithm = ACTIVATIONS[self.activation]
        if not self.onednn_serves(x):
            return eager(F.linear(x, self.weight, self.bias))
        if self.activation != "quick_gelu":
            return self.onednn(x, self.packed_weight(), self.bias, post_op, algorithm)
        out = self.onednn(x, *self.scaled_parameters(QUICK_GELU_ALPHA, QUICK_GELU_ALPHA), "swish")
        return out.div_(QUICK_GELU_ALPHA)                                      # swish(a z) / a, in place

    @staticmethod
    def onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor], post_op: str = "none",
               algorithm: str = "") -> Tensor:
        """post_op(x weight^T + bias) by oneDNN, on row_bucket rows (for callers where onednn_serves(x))."""
        rows = x.reshape(-1, x.shape[-1])                                    # (M, in)
        m = rows.shape[0]
        # A caller that pads its rows itself (Bert's packed path: once per forward) saves this copy.
        padded = rows if row_bucket(m) == m else F.pad(rows, (0, 0, 0, row_bucket(m) - m))  # (bucket, in)
        out = torch.ops.mkldnn._linear_pointwise(padded, weight, bias, post_op, [], algorithm)
        return out[:m].view(*x.shape[:-1], out.shape[-1])

    def scaled_parameters(self, weight_scale: float, bias_scale: float) -> tuple[Tensor, Optional[Tensor]]:
        """(weight_scale W, bias_scale b), cached until a parameter changes (the key holds their storage and
        version counters) or other scales are asked for. QuickGELU uses them: swish(x (a W)^T + a b) / a is
        QuickGELU(x W^T + b), and a following layer can take the division into its own weight."""
        params = [p for p in (self.weight, self.bias) if p is not None]
        key = (weight_scale, bias_scale, *((p.data_ptr(), p._version, p.dtype) for p in params))
        cached = self.__dict__.get("_scaled_for_onednn")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                bias = None if self.bias is None else bias_scale * self.bias
                cached = (key, weight_scale * self.weight, bias)
            self.__dict__["_scaled_for_onednn"] = cached
        return cached[1], cached[2]

    def packed_weight(self) -> Tensor:
        """The weight reordered once into oneDNN's blocked layout (an opaque mkldnn tensor), cached until the
        weight changes (same key as scaled_parameters): oneDNN otherwise reorders the plain weight on every
        call. What torch.compile's CPU backend does with frozen weights (mkldnn._reorder_linear_weight)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.shape)
        cached = self.__dict__.get("_packed_for_onednn")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKED_ROWS_HINT))
            self.__dict__["_packed_for_onednn"] = cached
        return cached[1]

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda() ... give new parameters: the packed copy of the old weight is dropped now,
        # not held until the next oneDNN call.
        self.__dict__.pop("_packed_for_onednn", None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        # The packed weight is an opaque oneDNN tensor, which pickle, deepcopy and torch.save cannot copy; a copy
        # packs its own on first use.
        state = dict(super().__getstate__())
        state.pop("_packed_for_onednn", None)
        return state

    def onednn_serves(self, x: Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (ONEDNN_LINEAR and not needs_grad and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.dim() >= 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
