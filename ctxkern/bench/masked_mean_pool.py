"""Masked mean pooling benchmark cases: forward (plain and normalized) and backward, at MiniLM (D = 384) and
BERT-base (D = 768) widths with S = 128 and 512 and a random 30-100% of real tokens per sequence.

Peers: a plain eager masked mean, sentence-transformers' Pooling module (mean mode; + Normalize) itself, the
same pooling expression under torch.compile, and a batched matmul of the mask with hidden (one read of hidden,
padding included). bytes_moved counts only what must move: the real tokens' hidden states read, the output
written (the backward: dout read, all of dhidden written, zeros at padding included).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ctxkern import ops
from ctxkern.bench.case import Candidate, Case, backward_only
from ctxkern.bench.peers import compiled, ctxkern_backends
from ctxkern.reference import masked_mean_pool_ref


def _shapes(device: str, quick: bool) -> list[tuple[tuple[int, int, int], torch.dtype]]:
    if quick:
        return [((64, 256, 384), torch.float32)]
    if device == "cuda":
        return [((256, 128, 384), torch.bfloat16), ((256, 512, 768), torch.bfloat16), ((256, 512, 768), torch.float32),
                ((8, 512, 768), torch.bfloat16)]
    return [((64, 256, 384), torch.float32), ((64, 128, 384), torch.float32), ((32, 512, 768), torch.float32),
            ((64, 256, 384), torch.bfloat16)]


def _batch(b: int, s: int, d: int, dtype: torch.dtype, device: str):
    """hidden (b, s, d) and a Hugging Face style int64 attention_mask: each sequence 30-100% real, right-padded."""
    hidden = torch.randn(b, s, d, device=device, dtype=dtype)
    lengths = torch.randint(max(1, int(0.3 * s)), s + 1, (b,), device=device)
    mask = (torch.arange(s, device=device)[None, :] < lengths[:, None]).long()
    return hidden, mask


def eager_mean(hidden, mask, normalize: bool = False):
    """The masked mean a PyTorch user writes."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return F.normalize(mean, dim=-1) if normalize else mean


def bmm_mean(hidden, mask, normalize: bool = False):
    """The masked sum as a (1, S) x (S, D) matmul per sequence."""
    m = mask.to(hidden.dtype)
    mean = torch.bmm(m.unsqueeze(1), hidden).squeeze(1) / m.sum(1, keepdim=True).clamp_min(1)
    return F.normalize(mean, dim=-1) if normalize else mean


def sentence_transformers_expression(hidden, mask, normalize: bool = False):
    """sentence-transformers' Pooling (mean mode) expression, and Normalize's F.normalize."""
    acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = ((hidden * m).sum(dim=1, dtype=acc) / torch.clamp(m.sum(dim=1, dtype=acc), min=1e-9)).to(hidden.dtype)
    return F.normalize(mean, p=2, dim=-1) if normalize else mean


def sentence_transformers_module(d: int, normalize: bool) -> Callable | None:
    """sentence-transformers' own Pooling (+ Normalize) modules as a function of (hidden, mask), if installed."""
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    except ImportError:
        return None
    pooling, normalizer = Pooling(d, pooling_mode="mean"), Normalize()

    def run(hidden, mask):
        features = pooling({"token_embeddings": hidden, "attention_mask": mask})
        return (normalizer(features) if normalize else features)["sentence_embedding"]

    return run


def _peers(d: int, normalize: bool, with_compile: bool) -> list[tuple[str, Callable]]:
    peers = [("torch eager", lambda h, m: eager_mean(h, m, normalize)),
             ("torch bmm", lambda h, m: bmm_mean(h, m, normalize))]
    module = sentence_transformers_module(d, normalize)
    if module is not None:
        peers.append(("sentence-transformers", module))
    if with_compile:
        fn = compiled(lambda h, m: sentence_transformers_expression(h, m, normalize))
        peers.append(("torch.compile (sentence-transformers expr)", fn))
    return peers


def _forward_case(hidden, mask, normalize: bool, with_compile: bool) -> Case:
    (b, s, d), dtype = hidden.shape, hidden.dtype
    real_tokens = int(mask.sum())
    case = Case(op="masked_mean_pool_fwd" + ("_normalize" if normalize else ""), shape=f"{b}x{s}x{d}", dtype=dtype,
                bytes_moved=hidden.element_size() * (real_tokens * d + b * d), flops=None,
                reference=lambda: (masked_mean_pool_ref(hidden.double(), mask, normalize),))
    for name, fn in _peers(d, normalize, with_compile):
        case.candidates.append(Candidate(name, lambda fn=fn: fn(hidden, mask), baseline=True))
    for name in ctxkern_backends(hidden.device.type):
        case.candidates.append(Candidate(
            f"ctxkern.{name}", lambda name=name: ops.masked_mean_pool(hidden, mask, normalize=normalize, backend=name),
            baseline=False))
    return case


def _backward_case(hidden, mask, with_compile: bool) -> Case:
    (b, s, d), dtype = hidden.shape, hidden.dtype
    dout = torch.randn(b, d, device=hidden.device, dtype=dtype)
    leaf = hidden.detach().requires_grad_()

    def grads_of(forward):
        return backward_only(forward, [leaf], dout, mask)

    def reference():
        h64 = hidden.detach().double().requires_grad_()
        return torch.autograd.grad(masked_mean_pool_ref(h64, mask, True), h64, dout.double())

    case = Case(op="masked_mean_pool_bwd_normalize", shape=f"{b}x{s}x{d}", dtype=dtype,
                bytes_moved=hidden.element_size() * (b * s * d + b * d), flops=None, reference=reference)
    for name, fn in _peers(d, True, with_compile):
        case.candidates.append(Candidate(name, grads_of(fn), baseline=True))
    for name in ctxkern_backends(hidden.device.type):
        case.candidates.append(Candidate(
            f"ctxkern.{name}",
            grads_of(lambda h, m, name=name: ops.masked_mean_pool(h, m, normalize=True, backend=name)), False))
    return case


def cases(device: str, quick: bool, with_compile: bool) -> list[Case]:
    out = []
    for i, ((b, s, d), dtype) in enumerate(_shapes(device, quick)):
        hidden, mask = _batch(b, s, d, dtype, device)
        out.append(_forward_case(hidden, mask, False, with_compile))
        if i == 0:  # the headline shape: also normalized, and the backward
            out.append(_forward_case(hidden, mask, True, with_compile))
            out.append(_backward_case(hidden, mask, with_compile))
    return out
