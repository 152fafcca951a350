"""ops.attention and ops.attention_varlen on every backend against the float64 reference."""
import json
import subprocess
import sys

import pytest
import torch

import ctxkern
from helpers import BACKEND_DEVICES, KERNEL_DEVICES, assert_close_for_dtype, assert_fp32_close, require_backend
from ctxkern import ops
from ctxkern.ops.attention import CUDA_HEAD_DIMS
from ctxkern.reference import attention_ref, attention_varlen_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# name -> (B, Sq, Sk, causal, padded). Sizes are odd so that every kernel's last block is partial; the
# Triton interpreter's blocks are 16 wide, so these span several blocks there too.
VARIANTS = {
    "dense": (2, 37, 37, False, False),
    "padded": (3, 29, 29, False, True),
    "causal-sq<sk": (2, 19, 45, True, False),
    "causal-sq>sk": (2, 45, 19, True, False),        # the first 26 rows see no key: zeros, no gradient
    "padded-causal": (3, 33, 33, True, True),
    "cross-padded": (2, 7, 40, False, True),
}
HEADS = 3


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def padding_mask(b, sk, g):
    """Random padding with the shapes real batches have: a full row, an all-padding row, a right-padded row,
    and holes in the middle (which a kernel that only trims trailing padding would get wrong)."""
    mask = torch.rand(b, sk, generator=g) > 0.35
    mask[0] = True
    if b > 1:
        mask[1] = False
    if b > 2:
        mask[2, sk // 2:] = False
    return mask


def make_inputs(variant, dtype, device, d=64, seed=0, heads=HEADS):
    b, sq, sk, causal, padded = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, heads, d, generator=g).to(device=device, dtype=dtype) for s in (sq, sk, sk))
    mask = padding_mask(b, sk, g).to(device) if padded else None
    return q, k, v, mask, causal


def f64(t):
    return t.detach().double().requires_grad_()


def reference_and_torch(q, k, v, mask, causal, dout=None):
    """(float64 reference, PyTorch's own computation in the storage dtype), and their gradients under dout."""
    qd, kd, vd = f64(q), f64(k), f64(v)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qd, kd, vd, mask, causal)
    low = attention_ref(ql, kl, vl, mask, causal, compute_dtype=q.dtype)
    if dout is None:
        return ref, low
    return (torch.autograd.grad(ref, (qd, kd, vd), dout.double()),
            torch.autograd.grad(low, (ql, kl, vl), dout))


def assert_matches(out, ref, theirs, backend, device):
    assert_close_for_dtype(out, ref, theirs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_float64_reference(backend, device, dtype, variant):
    require_backend(backend)
    q, k, v, mask, causal = make_inputs(variant, dtype, device)
    out = ops.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    ref, theirs = reference_and_torch(q, k, v, mask, causal)
    assert_matches(out, ref, theirs, backend, device)
    if variant == "causal-sq>sk":
        assert (out[:, :26] == 0).all(), "rows that see no key must be zeros"
    if variant == "padded":
        assert (out[1] == 0).all(), "a batch row with no real key must give zeros"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_float64_reference(backend, device, dtype, variant):
    require_backend(backend)
    q, k, v, mask, causal = (t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                             for t in make_inputs(variant, dtype, device, seed=1))
    out = ops.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads, torch_grads = reference_and_torch(q, k, v, mask, causal, dout)
    for got, ref, theirs in zip(grads, ref_grads, torch_grads, strict=True):
        assert got.dtype == dtype
        assert_matches(got, ref, theirs, backend, device)
    if variant == "causal-sq>sk":
        assert (grads[0][:, :26] == 0).all(), "rows that see no key must get no gradient"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("d", (24, 32, 64, 80, 96, 100, 128))
def test_head_dims(backend, device, d):
    require_backend(backend)
    q, k, v, mask, causal = make_inputs("padded-causal", torch.float32, device, d=d, seed=d)
    if backend == "cuda" and d not in CUDA_HEAD_DIMS:
        with pytest.raises(ValueError, match="head dim"):
            ops.attention(q, k, v, backend=backend)
        return
    for t in (q, k, v):
        t.requires_grad_()
    out = ops.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = f64(q), f64(k), f64(v)
    ref = attention_ref(qd, kd, vd, mask, causal)
    assert_fp32_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout.double()), strict=True):
        assert_fp32_close(got, want)


def _pack(t, lengths):
    """(B, S, H, D) padded on the right -> (sum(lengths), H, D) packed."""
    return torch.cat([t[i, :n] for i, n in enumerate(lengths)])


def _cu(lengths, device):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_varlen_equals_padded_result_per_sequence(backend, device, causal):
    """Packed sequences give each sequence what the padded batch with a key padding mask gives its real rows
    (self-attention: equal query and key lengths, so causal alignment agrees too), on the same backend."""
    require_backend(backend)
    lengths = [37, 1, 0, 20, 16]
    b, s, d = len(lengths), max(lengths), 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, s, HEADS, d, generator=g).to(device) for _ in range(3))
    mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    padded = ops.attention(q, k, v, key_padding_mask=mask.to(device), causal=causal, backend=backend)

    qp, kp, vp = (_pack(t, lengths).requires_grad_() for t in (q, k, v))
    cu = _cu(lengths, device)
    out = ops.attention_varlen(qp, kp, vp, cu, cu, s, s, causal=causal, backend=backend)
    assert out.shape == qp.shape
    assert_fp32_close(out, _pack(padded, lengths).double())
    qd, kd, vd = f64(qp), f64(kp), f64(vp)
    ref = attention_varlen_ref(qd, kd, vd, cu, cu, causal)
    assert_fp32_close(out, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qp, kp, vp), dout)
    for got, want in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout.double()), strict=True):
        assert_fp32_close(got, want)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_varlen_cross_attention_lengths(backend, device, dtype):
    """Different query and key lengths per sequence (causal alignment bottom-right per sequence, so some
    sequences have rows that see no key), in every dtype, forward and backward."""
    require_backend(backend)
    lengths_q, lengths_k = [5, 30, 17, 2], [21, 9, 17, 0]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lengths_q), HEADS, 32, generator=g).to(device=device, dtype=dtype).requires_grad_()
    k, v = (torch.randn(sum(lengths_k), HEADS, 32, generator=g).to(device=device, dtype=dtype).requires_grad_()
            for _ in range(2))
    cu_q, cu_k = _cu(lengths_q, device), _cu(lengths_k, device)
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, 30, 21, causal=True, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = f64(q), f64(k), f64(v)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    ref = attention_varlen_ref(qd, kd, vd, cu_q, cu_k, True)
    low = attention_varlen_ref(ql, kl, vl, cu_q, cu_k, True, compute_dtype=dtype)
    assert_matches(out, ref, low, backend, device)
    for got, want, theirs in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout.double()),
                                 torch.autograd.grad(low, (ql, kl, vl), dout), strict=True):
        assert_matches(got, want, theirs, backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_strided_views_of_a_fused_qkv_projection(backend, device):
    """q, k, v as unbound views of one projection (B, S, 3, H, D): no copy, strides of 3 * H * D rows;
    gradients flow back into the projection. Also a q whose last dim is not contiguous (the op copies it)."""
    require_backend(backend)
    b, s, h, d = 2, 23, HEADS, 32
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, s, 48, generator=g).to(device)
    w = (0.2 * torch.randn(48, 3 * h * d, generator=g)).to(device).requires_grad_()
    mask = padding_mask(b, s, g).to(device)

    def block(x, w, fn):
        q, k, v = (x @ w).view(b, s, 3, h, d).unbind(2)  # each (B, S, H, D) with row stride 3 * H * D
        return fn(q, k, v)

    out = block(x, w, lambda q, k, v: ops.attention(q, k, v, key_padding_mask=mask, backend=backend))
    (dw,) = torch.autograd.grad(out.square().sum(), (w,))
    wd = f64(w)
    ref = block(x.double(), wd, lambda q, k, v: attention_ref(q, k, v, mask))
    (rdw,) = torch.autograd.grad(ref.square().sum(), (wd,))
    assert_fp32_close(out, ref)
    assert_fp32_close(dw, rdw)

    qt = torch.randn(b, h, d, s, generator=g).to(device).permute(0, 3, 1, 2)  # (B, S, H, D), last-dim stride S
    k = torch.randn(b, s, h, d, generator=g).to(device)
    assert_fp32_close(ops.attention(qt, k, k, causal=True, backend=backend),
                      attention_ref(qt.double(), k.double(), k.double(), causal=True))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_scale_and_integer_mask(backend, device):
    require_backend(backend)
    q, k, v, mask, _causal = make_inputs("cross-padded", torch.float32, device)
    out = ops.attention(q, k, v, key_padding_mask=mask.to(torch.int64) * 3, scale=0.3, backend=backend)
    assert_fp32_close(out, attention_ref(q.double(), k.double(), v.double(), mask, scale=0.3))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("b,sq,sk", [(0, 5, 5), (2, 0, 5), (2, 5, 0)], ids=str)
def test_empty_input_gives_empty_output(backend, device, b, sq, sk):
    require_backend(backend)
    q = torch.randn(b, sq, 2, 32, device=device, requires_grad=True)
    k, v = (torch.randn(b, sk, 2, 32, device=device, requires_grad=True) for _ in range(2))
    out = ops.attention(q, k, v, key_padding_mask=torch.ones(b, sk, dtype=torch.bool, device=device),
                        backend=backend)
    assert out.shape == q.shape and (out == 0).all()  # no key at all: zeros
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------- operators and compile


def _operators(backend):
    if backend == "triton":
        c = torch.ops.ctxkern
        return (c.attention_fwd_triton, c.attention_bwd_triton, c.attention_varlen_fwd_triton,
                c.attention_varlen_bwd_triton)
    c = torch.ops.ctxkern
    return c.attention_fwd, c.attention_bwd, c.attention_varlen_fwd, c.attention_varlen_bwd


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_opcheck(backend, device):
    require_backend(backend)
    fwd, bwd, vfwd, vbwd = _operators(backend)
    # One head and few rows: opcheck runs each operator many times, and the interpreter is slow.
    q, k, v, mask, _causal = make_inputs("padded", torch.float32, device, d=32, heads=1)
    q, k, v = (t[:, :20].requires_grad_() for t in (q, k, v))
    mask = mask[:, :20].contiguous()
    for args in ((q, k, v, mask, False, 0.2), (q, k, v, None, True, 0.2)):
        torch.library.opcheck(fwd, args)
        out, lse = fwd(*args)
        torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                                    lse.detach(), *args[3:]))
    lengths = [7, 0, 13]
    cu = _cu(lengths, device)
    qp, kp, vp = (_pack(t, lengths).detach().requires_grad_() for t in (q, k, v))
    vargs = (qp, kp, vp, cu, cu, 13, 13, True, 0.2)
    torch.library.opcheck(vfwd, vargs)
    out, lse = vfwd(*vargs)
    torch.library.opcheck(vbwd, (torch.randn_like(out), qp.detach(), kp.detach(), vp.detach(), out.detach(),
                                 lse.detach(), *vargs[3:]))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend)
    torch._dynamo.reset()
    q, k, v, mask, _causal = make_inputs("padded", torch.float32, device, d=32, heads=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lengths = [29, 3, 11]
    cu = _cu(lengths, device)

    @torch.compile(fullgraph=True)
    def block(q, k, v):
        dense = ops.attention(q * 2, k, v, key_padding_mask=mask, causal=True, backend=backend)
        packed = ops.attention_varlen(_pack(q, lengths), _pack(k, lengths), _pack(v, lengths), cu, cu, 29, 29,
                                      backend=backend)
        return dense.relu(), packed.relu()

    def eager_ref(q, k, v):
        qp, kp, vp = (_pack(t, lengths) for t in (q, k, v))
        return (attention_ref(q * 2, k, v, mask, causal=True).relu(),
                attention_varlen_ref(qp, kp, vp, cu, cu).relu())

    outs = block(q, k, v)
    loss = sum(o.square().sum() for o in outs)
    grads = torch.autograd.grad(loss, (q, k, v))
    qd, kd, vd = f64(q), f64(k), f64(v)
    refs = eager_ref(qd, kd, vd)
    ref_grads = torch.autograd.grad(sum(r.square().sum() for r in refs), (qd, kd, vd))
    for got, want in zip((*outs, *grads), (*refs, *ref_grads), strict=True):
        assert_fp32_close(got, want, rel=2e-5)


_PEAK_RSS_SCRIPT = """
import json, resource, sys, torch
from ctxkern import ops
s, h, d = int(sys.argv[1]), 2, 64
q, k, v = (torch.randn(1, s, h, d) for _ in range(3))
ops.attention(q[:, :256], k[:, :256], v[:, :256], backend="cpu")  # warm the allocator and thread pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = ops.attention(q, k, v, key_padding_mask=torch.rand(1, s) > 0.1, causal=False, backend="cpu")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_bytes": (after - before) * 1024, "finite": bool(out.isfinite().all())}))
"""


@pytest.mark.slow
def test_cpu_long_sequence_memory_is_linear():
    """S = 8192 on the cpu backend: peak memory grows by far less than one head's S x S fp32 score matrix
    (256 MiB), i.e. the kernel never materializes the scores (ru_maxrss is in KiB on Linux). The torch
    backend fails this: at S = 4096 its peak grows by 465 MiB."""
    require_backend("cpu")
    s = 8192
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(s)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finite"]
    scores_bytes = s * s * 4
    assert result["growth_bytes"] < scores_bytes / 8, \
        f"peak RSS grew by {result['growth_bytes'] / 2**20:.0f} MiB; one S x S score matrix is {scores_bytes / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- bad input

def _qkv(b=2, s=8, h=2, d=16, dtype=torch.float32):
    return tuple(torch.randn(b, s, h, d, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[0], k, v), r"q must be 4-D"),
    (lambda q, k, v: (q, k[0], v), r"k must be 4-D"),
    (lambda q, k, v: (q, k, v[..., :8]), r"v must have k's shape"),
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), r"k must have q's head count"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), r"k and v must have q's head dim"),
    (lambda q, k, v: (q, k.double(), v), r"k must have q's dtype"),
    (lambda q, k, v: (q, k, v.half()), r"v must have q's dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), r"q must be one of"),
    (lambda q, k, v: (q, k[:1], v[:1]), r"k must have q's batch size"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_qkv_names_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.attention(*change(*_qkv()))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(8, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(2, 8, device="meta")), ValueError, r"key_padding_mask must be on q's device"),
    (dict(dropout_p=0.1), ValueError, r"dropout_p must be 0.0"),
    (dict(scale=float("nan")), ValueError, r"scale must be finite"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(backend="fast"), ValueError, r"backend must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.attention(*_qkv(), **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_unsupported_head_dim_names_it(backend):
    require_backend(backend)
    with pytest.raises(ValueError, match=r"head dim must be between 1 and 128"):
        ops.attention(*_qkv(d=160), backend=backend)


def test_unsupported_head_dim_on_cuda_names_it():
    if ctxkern.backends()["cuda"] != "available":
        pytest.skip("needs the cuda backend")
    q, k, v = (t.cuda() for t in _qkv(d=48))
    with pytest.raises(ValueError, match=r"head dim must be one of"):
        ops.attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("cu_q,cu_k,max_q,match", [
    ([0, 5, 12], [0, 6, 6, 12], 7, r"cu_seqlens_k must have cu_seqlens_q's length"),
    ([1, 5, 12], [0, 5, 12], 7, r"cu_seqlens_q must start at 0"),
    ([0, 8, 5, 12], [0, 4, 4, 12], 7, r"cu_seqlens_q must be non-decreasing"),
    ([0, 5, 11], [0, 5, 12], 7, r"cu_seqlens_q must end at q's length 12, got 11"),
    ([0, 5, 12], [0, 6, 13], 7, r"cu_seqlens_k must end at k's length 12, got 13"),
    ([0, 5, 12], [0, 5, 12], 6, r"max_seqlen_q = 6 is smaller than a sequence of 7 in cu_seqlens_q"),
    ([[0, 5, 12]], [0, 5, 12], 7, r"cu_seqlens_q must be 1-D"),
])
def test_bad_cu_seqlens_names_the_argument(cu_q, cu_k, max_q, match):
    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        ops.attention_varlen(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                             max_q, 7)


def test_bad_varlen_arguments_name_the_argument():
    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be int32"):
        ops.attention_varlen(q, k, v, cu.float(), cu, 7, 7)
    with pytest.raises(ValueError, match=r"max_seqlen_k must be a non-negative int"):
        ops.attention_varlen(q, k, v, cu, cu, 7, -1)
    with pytest.raises(ValueError, match=r"q must be 3-D"):
        ops.attention_varlen(q[None], k, v, cu, cu, 7, 7)
    with pytest.raises(ValueError, match=r"dropout_p must be 0.0"):
        ops.attention_varlen(q, k, v, cu, cu, 7, 7, dropout_p=0.5)
