"""What the kernels' operators cannot compute is computed by the pure-PyTorch reference, never silently wrong.

The operators have a first-order backward only (an opaque kernel): no forward-mode (jvp) formula, no
functorch (torch.func) support, no differentiable backward, and no float64 kernel. The reference
(ctxkern/reference.py) is plain PyTorch, so every autograd mode works through it. Two hooks:

- at an op's entry, `reference_needed(dtype)`: float64, or a forward-AD dual level or a torch.func transform
  (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) is active -> the op runs its reference;
- in an operator's backward, `torch.is_grad_enabled()` means create_graph=True is building a graph of the
  backward (double backward, gradient penalties, gradgradcheck, hessians): `reference_vjp` then recomputes the
  vector-Jacobian product through the reference with autograd, from the saved inputs, which keep their
  history, instead of calling the backward kernel.

Both checks read a global flag or two: about 0.3 us per call together.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

# float64 joins the kernels' dtypes at the ops' boundary; the reference serves it.
ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_functorch_stack = torch._C._functorch.peek_interpreter_stack
_FLOAT64 = torch.float64


def reference_needed(dtype: torch.dtype) -> bool:
    """Whether an op must run its reference rather than its kernel operator (about 0.3 us)."""
    return dtype is _FLOAT64 or transform_active()


def transform_active() -> bool:
    """Whether a forward-AD dual level or a torch.func transform is active, outside Dynamo's tracing."""
    # Any dual level, or any torch.func transform, even one whose inputs do not reach this op: the reference
    # is then right, only slower, where the operator would be wrong or fail. While Dynamo traces, the
    # operator stays (is_compiling is the costlier test, so it comes last).
    return ((forward_ad._current_level >= 0 or _functorch_stack() is not None)
            and not torch.compiler.is_compiling())


def reference_vjp(reference: Callable, inputs: Sequence, grads: Sequence[Optional[Tensor]]) -> tuple:
    """The gradients of reference(*inputs) under the output gradients `grads`, as a differentiable graph.

    inputs are the operator's inputs as saved for its backward (tensors keep their history); -> one gradient
    per input, None where an input is not a tensor, needs no gradient or does not reach an output.
    """
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    # An output that took no part in the loss comes back as None: it contributes nothing.
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
    result: list[Optional[Tensor]] = [None] * len(inputs)
    if not wrt or not pairs:
        return tuple(result)
    found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for i, g in zip(wrt, found):
        result[i] = g
    return tuple(result)
