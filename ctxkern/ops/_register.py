"""Fake kernels and autograd for an op's operator pairs, one call per op (and per layout), and the callable
each public op runs its kernel through.

Every op has a forward and a backward operator per backend: the custom_ops around kernels/<op>.py
(ctxkern::<op>_fwd_triton / <op>_bwd_triton) always, and the C++ operators (ctxkern::<op>_fwd / <op>_bwd, cpu
and cuda, dispatched by device; schemas in csrc/ops.cpp) when the extension is built. All get the same fake
kernels and autograd.

Calling an operator through the dispatcher costs more than some kernels at small shapes, most of it in the
Python autograd kernel that torch.library.register_autograd installs (it runs even when nothing needs a
gradient). So in eager mode a C++ operator's kernel is called directly, below autograd, and when a gradient is
needed through a torch.autograd.Function built from the same setup_context and backward; the operator itself
serves torch.compile, torch dispatch modes (FakeTensorMode, ...), functorch transforms, torch.jit.trace and the
profiler, which need it.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ctxkern import _dispatch

_BELOW_AUTOGRAD = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                   "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}


class Kernel:
    """A backend's forward operator as the public op calls it: kernel(*operator_args) -> the operator's outputs."""

    def __init__(self, fwd: torch._ops.OpOverloadPacket, direct: Optional[Callable] = None,
                 with_grad: Optional[Callable] = None) -> None:
        self.op = fwd  # the registered operator (fake, autograd): what tracing and transforms see
        self._direct = direct
        self._with_grad = with_grad

    def __call__(self, *args):
        # What sees ops at the dispatcher (compile, dispatch modes, functorch, torch.jit.trace, the profiler's
        # op records) gets the operator; plain eager calls skip the dispatcher.
        if (self._direct is None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state()
                or torch._C._autograd._profiler_enabled()):
            return self.op(*args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self._with_grad(*args)
        return self._direct(*args)


def _eager_function(name: str, direct: Callable, setup_context: Callable, backward: Callable, bwd_op,
                    bwd_direct: Callable) -> Callable:
    """The operator's registered autograd as a plain autograd.Function around the direct kernel call; returns
    its apply. The Function has the classic forward(ctx, ...) form, which calls setup_context itself: defining
    setup_context instead makes every Function.apply bind the arguments with inspect.signature (~10 us). And
    apply is _FunctionBase's own, without Function.apply's functorch handling: Kernel sends functorch
    transforms to the registered operator."""

    def forward(ctx, *args):
        output = direct(*args)
        setup_context(ctx, args, output)
        return output

    def function_backward(ctx, *grads):
        # A first-order backward runs with grad mode off and needs no graph of its own: the kernel directly.
        return backward(bwd_op if torch.is_grad_enabled() else bwd_direct, ctx, *grads)

    cls = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                  "backward": staticmethod(function_backward)})
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)


def _register_pair(fwd_name: str, bwd_name: str, fwd_fake: Callable, bwd_fake: Callable, setup_context: Callable,
                   backward: Callable, device_keys: tuple[str, ...] = ()) -> dict[str, Kernel]:
    """Registers the fakes of both operators and the backward one as the forward one's autograd;
    -> {backend: Kernel} for each of device_keys (the C++ backends) or for "triton"."""
    namespace, fwd_short = fwd_name.split("::")
    _ns, bwd_short = bwd_name.split("::")
    fwd_op = getattr(getattr(torch.ops, namespace), fwd_short)
    bwd_op = getattr(getattr(torch.ops, namespace), bwd_short)
    torch.library.register_fake(fwd_name, fwd_fake)
    torch.library.register_fake(bwd_name, bwd_fake)
    torch.library.register_autograd(fwd_name, functools.partial(backward, bwd_op), setup_context=setup_context)
    if not device_keys:
        return {"triton": Kernel(fwd_op)}
    kernels = {}
    for backend in device_keys:
        direct = functools.partial(fwd_op.default.redispatch, _BELOW_AUTOGRAD[backend])
        bwd_direct = functools.partial(bwd_op.default.redispatch, _BELOW_AUTOGRAD[backend])
        with_grad = _eager_function(f"{fwd_short}_{backend}_eager", direct, setup_context, backward, bwd_op,
                                    bwd_direct)
        kernels[backend] = Kernel(fwd_op, direct, with_grad)
    return kernels


def register_op(triton: tuple[str, str], compiled: tuple[str, str], fwd_fake: Callable, bwd_fake: Callable,
                setup_context: Callable, backward: Callable) -> dict[str, Kernel]:
    """Registers the fake kernels and autograd of an op's operators: triton = (forward, backward) names of the
    Triton custom_ops, compiled = those of the C++ operators (registered only when the extension is built).
    backward(bwd_op, ctx, *grads) gets the backend's backward operator first. -> {backend: Kernel}."""
    kernels = _register_pair(*triton, fwd_fake, bwd_fake, setup_context, backward)
    if _dispatch.HAS_EXTENSION:
        kernels.update(_register_pair(*compiled, fwd_fake, bwd_fake, setup_context, backward,
                                      device_keys=("cpu", "cuda")))
    return kernels
