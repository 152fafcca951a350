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
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor



def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's QuickGELU, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


# activation name (Hugging Face's hidden_act) -> (eager function, oneDNN post-op, oneDNN algorithm); post-op None:
# oneDNN has no such post-op, so its product is followed by the eager function.
ACTIVATIONS: dict[Optional[str], tuple[Callable[[Tensor], Tensor], Optional[str], str]] = {
    None: (lambda x: x, "none", ""),
    "gelu": (F.gelu, "gelu", "none"),
    "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    "gelu_pytorch_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    "relu": (F.relu, "relu", ""),
    "silu": (F.silu, "swish", ""),
    "swish": (F.silu, "swish", ""),
    "quick_gelu": (quick_gelu, None, ""),
}


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_LINEAR = _onednn_linear_available()

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
        if self.onednn_serves(x):
            rows = x.reshape(-1, x.shape[-1])                                # (M, in)
            m = rows.shape[0]
            # A caller that pads its rows itself (Bert's packed path: once per forward) saves this copy.
            padded = rows if row_bucket(m) == m else F.pad(rows, (0, 0, 0, row_bucket(m) - m))  # (bucket, in)
            out = torch.ops.mkldnn._linear_pointwise(padded, self.weight, self.bias, post_op or "none", [],
                                                     algorithm)
            out = out[:m].view(*x.shape[:-1], out.shape[-1])
            return out if post_op is not None else eager(out)
        return eager(F.linear(x, self.weight, self.bias))

    def onednn_serves(self, x: Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (ONEDNN_LINEAR and not needs_grad and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.dim() >= 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
