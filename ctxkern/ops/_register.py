"""Fake kernels and autograd for an op's operator pairs, one call per op (and per layout).

Every op has a forward and a backward operator per backend: ctxkern::<op>_fwd_triton / <op>_bwd_triton (the
custom_ops around kernels/<op>.py) always, and ctxkern::<op>_fwd / <op>_bwd (cpu and cuda, dispatched by
device; schemas in csrc/ops.cpp) when the extension is built. All get the same fake kernels and autograd.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ctxkern import _dispatch


def register_op(op: str, fwd_fake: Callable, bwd_fake: Callable, setup_context: Callable,
                backward: Callable) -> dict:
    """Registers fake kernels for both operators of every backend, and the backward operator as the forward
    one's autograd; backward(bwd_op, ctx, *grads) gets the backend's backward operator first.
    -> {backend: forward operator}."""

    def register_pair(fwd_name: str, bwd_name: str):
        bwd_op = getattr(torch.ops.ctxkern, bwd_name)
        torch.library.register_fake(f"ctxkern::{fwd_name}", fwd_fake)
        torch.library.register_fake(f"ctxkern::{bwd_name}", bwd_fake)
        torch.library.register_autograd(f"ctxkern::{fwd_name}", functools.partial(backward, bwd_op),
                                        setup_context=setup_context)
        return getattr(torch.ops.ctxkern, fwd_name)

    fwd = {"triton": register_pair(f"{op}_fwd_triton", f"{op}_bwd_triton")}
    if _dispatch.HAS_EXTENSION:
        fwd["cpu"] = fwd["cuda"] = register_pair(f"{op}_fwd", f"{op}_bwd")
    return fwd
