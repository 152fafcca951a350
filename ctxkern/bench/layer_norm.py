"""LayerNorm benchmark cases: forward, forward with residual, prenorm (the norm and the sum, as a pre-LN block
needs them), backward, at BERT-base and large widths."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ctxkern import ops
from ctxkern.bench.case import Candidate, Case, backward_only
from ctxkern.bench.peers import compiled, ctxkern_backends, liger_layer_norm
from ctxkern.reference import layer_norm_ref


# (64, 384): a tiny shape where per-call overhead is all there is (the 0.142 ms against torch's 0.016);
# forward only. (256, 768): the overhead targets, forward, with residual and backward.
TINY = (64, 384)


def _shapes(device: str, quick: bool) -> list[tuple[tuple[int, int], torch.dtype]]:
    if quick:
        return [(TINY, torch.float32), ((256, 768), torch.float32)]
    if device == "cuda":
        return [((16384, 768), torch.bfloat16), ((16384, 1024), torch.float32), ((16384, 768), torch.float16),
                ((16384, 4096), torch.bfloat16)]
    return [(TINY, torch.float32), ((256, 768), torch.float32), ((8192, 768), torch.float32),
            ((8192, 768), torch.bfloat16)]


def _forward_case(x, w, b, r, with_compile: bool) -> Case:
    (m, n), dtype = x.shape, x.dtype
    eager = (lambda: F.layer_norm(x + r, (n,), w, b)) if r is not None else (lambda: F.layer_norm(x, (n,), w, b))
    case = Case(
        op="layer_norm_fwd" + ("_residual" if r is not None else ""), shape=f"{m}x{n}", dtype=dtype,
        bytes_moved=x.element_size() * (m * n * (3 if r is not None else 2) + 2 * n), flops=None,
        reference=lambda: (layer_norm_ref(x.double(), w.double(), b.double(), 1e-5,
                                          None if r is None else r.double()),),
        candidates=[Candidate("torch eager", eager, baseline=True)],
    )
    if with_compile:
        fn = compiled(lambda x, w, b, r: F.layer_norm(x if r is None else x + r, (n,), w, b))
        case.candidates.append(Candidate("torch.compile", lambda: fn(x, w, b, r), baseline=True))
    liger = liger_layer_norm(x, w, b, r)
    if liger is not None:
        case.candidates.append(Candidate("liger", liger, baseline=True))
    for name in ctxkern_backends(x.device.type):
        case.candidates.append(Candidate(f"ctxkern.{name}",
                                         lambda name=name: ops.layer_norm(x, w, b, residual=r, backend=name),
                                         baseline=False))
    return case


def _prenorm_case(x, w, b, r, with_compile: bool) -> Case:
    """(LayerNorm(x + r), x + r): what torch users write is the sum, then F.layer_norm of it."""
    (m, n), dtype = x.shape, x.dtype

    def unfused(x, w, b, r):
        total = x + r
        return F.layer_norm(total, (n,), w, b), total

    case = Case(
        op="layer_norm_prenorm", shape=f"{m}x{n}", dtype=dtype,
        bytes_moved=x.element_size() * (4 * m * n + 2 * n), flops=None,
        reference=lambda: (layer_norm_ref(x.double(), w.double(), b.double(), 1e-5, r.double()),
                           x.double() + r.double()),
        candidates=[Candidate("torch eager", lambda: unfused(x, w, b, r), baseline=True)],
    )
    if with_compile:
        fn = compiled(unfused)
        case.candidates.append(Candidate("torch.compile", lambda: fn(x, w, b, r), baseline=True))
    for name in ctxkern_backends(x.device.type):
        case.candidates.append(Candidate(
            f"ctxkern.{name}", lambda name=name: ops.layer_norm(x, w, b, residual=r, prenorm=True, backend=name),
            baseline=False))
    return case


def _backward_case(x, w, b, with_compile: bool) -> Case:
    (m, n), dtype = x.shape, x.dtype
    dy = torch.randn_like(x)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]

    def grads_of(forward):
        return backward_only(forward, leaves, dy)

    def reference():
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        return torch.autograd.grad(layer_norm_ref(xd, wd, bd), (xd, wd, bd), dy.double())

    case = Case(op="layer_norm_bwd", shape=f"{m}x{n}", dtype=dtype,
                bytes_moved=x.element_size() * (3 * m * n + 3 * n), flops=None, reference=reference,
                candidates=[Candidate("torch eager", grads_of(lambda x, w, b: F.layer_norm(x, (n,), w, b)), True)])
    if with_compile:
        fn = compiled(lambda x, w, b: F.layer_norm(x, (n,), w, b))
        case.candidates.append(Candidate("torch.compile", grads_of(fn), baseline=True))
    for name in ctxkern_backends(x.device.type):
        case.candidates.append(Candidate(
            f"ctxkern.{name}", grads_of(lambda x, w, b, name=name: ops.layer_norm(x, w, b, backend=name)), False))
    return case


def cases(device: str, quick: bool, with_compile: bool) -> list[Case]:
    out = []
    for (m, n), dtype in _shapes(device, quick):
        x = torch.randn(m, n, device=device, dtype=dtype)
        r = torch.randn_like(x)
        w = 1 + 0.1 * torch.randn(n, device=device, dtype=dtype)
        b = 0.1 * torch.randn(n, device=device, dtype=dtype)
        out.append(_forward_case(x, w, b, None, with_compile))
        if (m, n) != TINY:
            out += [_forward_case(x, w, b, r, with_compile), _prenorm_case(x, w, b, r, with_compile),
                    _backward_case(x, w, b, with_compile)]
    return out
