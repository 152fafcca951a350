"""The models' linear layers: torch.nn.Linear, plus an activation, with fp32 CPU inference on oneDNN.

torch runs an fp32 matrix product on the CPU through MKL's sgemm, which on AMD CPUs takes a generic code path:
on this project's 2-core AMD EPYC it reaches about 190 GFLOP/s at BERT's shapes, where oneDNN's matmul (which
torch already uses for bf16) reaches about 450 GFLOP/s, at the same fp32 accuracy. oneDNN's matmul is reached
through `torch.ops.mkldnn._linear_pointwise`, the operator torch.compile's CPU backend emits for linear layers;
it also fuses the activation into the product. It has no autograd formula, so it serves only where no gradient
is needed; elsewhere, and on torch builds without it, the layer is F.linear followed by the activation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# activation name (Hugging Face's hidden_act) -> (eager function, oneDNN post-op, oneDNN algorithm)
ACTIVATIONS: dict[Optional[str], tuple[Callable[[Tensor], Tensor], str, str]] = {
    None: (lambda x: x, "none", ""),
    "gelu": (F.gelu, "gelu", "none"),
    "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    "gelu_pytorch_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    "relu": (F.relu, "relu", ""),
    "silu": (F.silu, "swish", ""),
    "swish": (F.silu, "swish", ""),
}


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_LINEAR = _onednn_linear_available()


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
        if self._onednn_serves(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, post_op, [], algorithm)
        return eager(F.linear(x, self.weight, self.bias))

    def _onednn_serves(self, x: Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (ONEDNN_LINEAR and not needs_grad and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.dim() >= 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
