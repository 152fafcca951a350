"""What every Triton launcher shares."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def device_guard(t: Tensor):
    """Triton launches on the current CUDA device, so make it the tensor's own (a no-op for CPU tensors,
    which run under TRITON_INTERPRET)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
