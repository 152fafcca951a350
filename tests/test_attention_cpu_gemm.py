"""The CPU attention's two tile products (CTXKERN_CPU_ATTENTION_GEMM=microkernel|blas) against the float64
reference, at sizes where the microkernel's register blocks (6 rows x 4 or 2 vectors) and its vectors end in a
partial block: rows, keys and head dims that are not multiples of them, one query, several key chunks."""
import pytest
import torch

from helpers import assert_close_for_dtype, assert_fp32_close, require_backend
from ctxkern import ops
from ctxkern.reference import attention_ref

GEMMS = ("microkernel", "blas")
# (B, Sq, Sk, H, D, causal, padded): m, n and k of every product take odd values; 200 keys span two key chunks
# of 128 and 70 queries two query blocks of 64.
SHAPES = {
    "one-query": (2, 1, 1, 2, 64, False, False),
    "one-query-many-keys": (1, 1, 37, 2, 80, False, True),
    "odd-d": (2, 13, 7, 2, 23, False, False),
    "d1": (1, 5, 9, 1, 1, False, False),
    "d80-two-chunks": (1, 70, 200, 2, 80, False, True),
    "d128-causal": (2, 33, 45, 2, 128, True, False),
    "d32-padded-causal": (3, 71, 71, 2, 32, True, True),
}


@pytest.fixture(params=GEMMS)
def gemm(request, monkeypatch):
    require_backend("cpu")
    monkeypatch.setenv("CTXKERN_CPU_ATTENTION_GEMM", request.param)
    return request.param


def inputs(shape, dtype, seed=0):
    b, sq, sk, h, d, causal, padded = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(dtype) for s in (sq, sk, sk))
    mask = None
    if padded:
        mask = torch.rand(b, sk, generator=g) > 0.3
        mask[:, 0] = True
    return q, k, v, mask, causal


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_float64(gemm, shape):
    q, k, v, mask, causal = inputs(shape, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, key_padding_mask=mask, causal=causal, backend="cpu")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = attention_ref(*ref_leaves, mask, causal)
    assert_fp32_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, dout.double()), strict=True):
        assert_fp32_close(got, want)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
def test_low_precision_matches_float64(gemm, dtype):
    q, k, v, mask, causal = inputs("d80-two-chunks", dtype)
    out = ops.attention(q, k, v, key_padding_mask=mask, causal=causal, backend="cpu")
    ref = attention_ref(q.double(), k.double(), v.double(), mask, causal)
    assert_close_for_dtype(out, ref, attention_ref(q, k, v, mask, causal, compute_dtype=dtype))


def test_runs_are_bitwise_equal(gemm):
    q, k, v, mask, causal = inputs("d32-padded-causal", torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    dout = torch.randn(q.shape)
    runs = []
    for _ in range(2):
        out = ops.attention(*leaves, key_padding_mask=mask, causal=causal, backend="cpu")
        runs.append((out, *torch.autograd.grad(out, leaves, dout)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bad_gemm_choice_names_the_variable(monkeypatch):
    require_backend("cpu")
    monkeypatch.setenv("CTXKERN_CPU_ATTENTION_GEMM", "cublas")
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="CTXKERN_CPU_ATTENTION_GEMM"):
        ops.attention(q, q, q, backend="cpu")
