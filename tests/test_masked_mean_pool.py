"""ops.masked_mean_pool[_varlen] and nn.MaskedMeanPool on every backend against the float64 reference and
against sentence-transformers' own Pooling (mean) and Normalize modules."""
import pytest
import torch
import torch.nn.functional as F

import ctxkern
from helpers import BACKEND_DEVICES, KERNEL_DEVICES, assert_close_for_dtype, assert_fp32_close, require_backend
from ctxkern import ops
from ctxkern.reference import masked_mean_pool_ref, masked_mean_pool_varlen_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd and prime widths take the kernels' scalar tails; 768 their vector paths.
WIDTHS = (1, 7, 383, 768)


def make_batch(b, s, d, dtype, device, seed=0, holes=True):
    """hidden (b, s, d) with an offset mean, and a (b, s) bool mask: random lengths, row 1 all padding, and (with
    holes) padding inside the real tokens too, as a left-padded or packed-then-masked batch has."""
    g = torch.Generator().manual_seed(seed)
    hidden = (0.5 + torch.randn(b, s, d, generator=g)).to(device=device, dtype=dtype)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    mask = torch.arange(s)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(b, s, generator=g) > 0.2
    if b > 1:
        mask[1] = False
    return hidden, mask.to(device)


def pack(hidden, mask):
    """The padding-free form of the same batch: (total, D) and int32 cu_seqlens."""
    counts = mask.sum(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = counts.cumsum(0)
    return hidden[mask], cu


def torch_low_precision(hidden, mask, normalize):
    """PyTorch's own computation in the storage dtype (the yardstick for fp16/bf16 error). The norm of the rounded
    mean is taken in fp32: in fp16, F.normalize's eps of 1e-12 rounds to 0 and an empty row gives 0 / 0 = NaN."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return F.normalize(mean.float(), dim=-1).to(hidden.dtype) if normalize else mean


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "normalize"])
def test_forward_matches_float64_reference(backend, device, dtype, d, normalize):
    require_backend(backend)
    hidden, mask = make_batch(5, 13, d, dtype, device)
    out = ops.masked_mean_pool(hidden, mask, normalize=normalize, backend=backend)
    assert out.dtype == dtype and out.shape == (5, d) and out.device == hidden.device
    ref = masked_mean_pool_ref(hidden.double(), mask, normalize)
    assert_close_for_dtype(out, ref, torch_low_precision(hidden, mask, normalize))
    assert (out[1] == 0).all(), "a row with no token must give zeros"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "normalize"])
def test_varlen_matches_reference_and_the_dense_op_on_the_same_batch(backend, device, dtype, normalize):
    require_backend(backend)
    hidden, mask = make_batch(6, 17, 383, dtype, device, seed=1)
    packed, cu = pack(hidden, mask)
    out = ops.masked_mean_pool_varlen(packed, cu, normalize=normalize, backend=backend)
    ref = masked_mean_pool_varlen_ref(packed.double(), cu, normalize)
    assert_close_for_dtype(out, ref, torch_low_precision(hidden, mask, normalize))
    dense = ops.masked_mean_pool(hidden, mask, normalize=normalize, backend=backend)
    if dtype == torch.float32:
        assert_fp32_close(out, dense.double(), rel=1e-6)
    else:  # both round the same fp32 value, up to the order of the fp32 sums: at most one step apart
        torch.testing.assert_close(out, dense, rtol=2 ** -7, atol=1e-5)
    assert_close_for_dtype(dense, masked_mean_pool_ref(hidden.double(), mask, normalize),
                           torch_low_precision(hidden, mask, normalize))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "normalize"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_gradients_match_float64_reference(backend, device, dtype, normalize, packed):
    require_backend(backend)
    hidden, mask = make_batch(5, 11, 97, dtype, device, seed=2)
    if packed:
        hidden, index = pack(hidden, mask)
        run = lambda h, **kw: ops.masked_mean_pool_varlen(h, index, **kw)  # noqa: E731
        ref_fn = lambda h: masked_mean_pool_varlen_ref(h, index, normalize)  # noqa: E731
    else:
        run = lambda h, **kw: ops.masked_mean_pool(h, mask, **kw)  # noqa: E731
        ref_fn = lambda h: masked_mean_pool_ref(h, mask, normalize)  # noqa: E731
    hidden.requires_grad_()
    dout = torch.randn(5, 97, device=device).to(dtype)
    (grad,) = torch.autograd.grad(run(hidden, normalize=normalize, backend=backend), hidden, dout)
    h64 = hidden.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(ref_fn(h64), h64, dout.double())
    # The yardstick: PyTorch's autograd of the reference in fp32, rounded to the storage dtype. (Autograd in fp16
    # itself overflows: the clamped branch's dout / 1e-12 of an all-padding row is inf there, and inf * 0 NaN.)
    hl = hidden.detach().requires_grad_()
    (theirs,) = torch.autograd.grad(ref_fn(hl.float()).to(dtype), hl, dout)
    assert grad.dtype == dtype and grad.shape == hidden.shape
    assert_close_for_dtype(grad, ref, theirs)
    if not packed:
        assert (grad[~mask] == 0).all(), "padding positions must get zero gradient"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_normalize_backward_on_the_clamped_branch(backend, device):
    """A mean whose norm is below 1e-12 takes max(||x||, 1e-12)'s constant branch: autograd of the reference
    gives dout / 1e-12 there, not the projection of the normal branch."""
    require_backend(backend)
    hidden = torch.full((2, 3, 8), 1e-14, device=device)
    hidden[0] = torch.randn(3, 8)
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    hidden.requires_grad_()
    dout = torch.randn(2, 8, device=device)
    out = ops.masked_mean_pool(hidden, mask, normalize=True, backend=backend)
    (grad,) = torch.autograd.grad(out, hidden, dout)
    h64 = hidden.detach().double().requires_grad_()
    ref = masked_mean_pool_ref(h64, mask, True)
    (ref_grad,) = torch.autograd.grad(ref, h64, dout.double())
    assert_fp32_close(out, ref)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[1].double(), (dout[1].double() / 1e-12 / 3).expand(3, 8), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mask_dtypes_mean_the_same(backend, device):
    """bool, integer (any value >= 0) and float (0 and 1) masks: nonzero is a token. (A float mask with other
    values is refused: tests/test_checks.py.)"""
    require_backend(backend)
    hidden, mask = make_batch(4, 9, 33, torch.float32, device, seed=3)
    want = ops.masked_mean_pool(hidden, mask, backend=backend)
    for m in (mask.long(), 3 * mask.to(torch.int8), mask.float(), mask.half(), mask.t().contiguous().t()):
        torch.testing.assert_close(ops.masked_mean_pool(hidden, m, backend=backend), want, rtol=0, atol=0)
    assert_fp32_close(want, masked_mean_pool_ref(hidden.double(), mask))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_strided_views(backend, device):
    require_backend(backend)
    d = 383
    _, mask = make_batch(4, 10, d, torch.float32, device, seed=4)
    wide = torch.randn(4, 10, d + 9, device=device)[..., 5:5 + d]      # rows of a wider tensor
    seq_major = torch.randn(10, 4, d, device=device).transpose(0, 1)   # (B, S, D) from a (S, B, D) tensor
    col_major = torch.randn(d, 4, 10, device=device).permute(1, 2, 0)  # last dim not contiguous: copied
    for hidden in (wide, seq_major, col_major):
        for normalize in (False, True):
            out = ops.masked_mean_pool(hidden, mask, normalize=normalize, backend=backend)
            assert_fp32_close(out, masked_mean_pool_ref(hidden.double(), mask, normalize))
    packed = torch.randn(d, 30, device=device).t()                       # (30, D) with a column stride of 30
    cu = torch.tensor([0, 4, 4, 30], device=device)                      # int64 accepted
    assert_fp32_close(ops.masked_mean_pool_varlen(packed, cu, backend=backend),
                      masked_mean_pool_varlen_ref(packed.double(), cu))
    assert_fp32_close(ops.masked_mean_pool_varlen(wide[0], torch.tensor([0, 3, 10], dtype=torch.int32,
                                                                         device=device), backend=backend),
                      masked_mean_pool_varlen_ref(wide[0].double(), torch.tensor([0, 3, 10])))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(0, 7, 16), (3, 0, 16), (3, 7, 0)], ids=str)
def test_empty_inputs(backend, device, shape):
    require_backend(backend)
    hidden = torch.randn(shape, device=device, requires_grad=True)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    out = ops.masked_mean_pool(hidden, mask, normalize=True, backend=backend)
    assert out.shape == (shape[0], shape[2]) and not out.isnan().any() and (out == 0).all()
    out.sum().backward()
    assert hidden.grad.shape == shape
    packed = torch.randn(0, 16, device=device)
    out = ops.masked_mean_pool_varlen(packed, torch.zeros(3, dtype=torch.int32, device=device), backend=backend)
    assert out.shape == (2, 16) and (out == 0).all()
    assert ops.masked_mean_pool_varlen(packed, torch.zeros(1, dtype=torch.int32, device=device),
                                       backend=backend).shape == (0, 16)


def test_cpu_kernel_at_the_benchmark_shape():
    """(64, 256, 384), random lengths: the full-row split (B = 64) and the column-chunked one (B = 1) forward; the
    backward's dhidden is 24 MiB, past the size at which it is written with non-temporal stores."""
    require_backend("cpu")
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(64, 256, 384, generator=g)
    lengths = torch.randint(77, 257, (64,), generator=g)
    mask = torch.arange(256)[None, :] < lengths[:, None]
    for b in (64, 1):
        for normalize in (False, True):
            out = ops.masked_mean_pool(hidden[:b], mask[:b], normalize=normalize, backend="cpu")
            assert_fp32_close(out, masked_mean_pool_ref(hidden[:b].double(), mask[:b], normalize))
    leaf = hidden.requires_grad_()
    dout = torch.randn(64, 384, generator=g)
    (grad,) = torch.autograd.grad(ops.masked_mean_pool(leaf, mask, normalize=True, backend="cpu"), leaf, dout)
    h64 = hidden.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(masked_mean_pool_ref(h64, mask, True), h64, dout.double())
    assert_fp32_close(grad, ref)


# ----------------------------------------------------------------------------- sentence-transformers parity

def _sentence_transformers_modules(d):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    return Pooling(d, pooling_mode="mean"), Normalize()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "normalize"])
def test_matches_sentence_transformers_pooling_and_normalize(backend, device, normalize):
    require_backend(backend)
    pooling, normalizer = _sentence_transformers_modules(384)
    hidden, mask = make_batch(7, 19, 384, torch.float32, device, seed=6, holes=False)
    attention_mask = mask.long()                       # what a Hugging Face tokenizer returns
    hidden.requires_grad_()
    features = pooling({"token_embeddings": hidden, "attention_mask": attention_mask})
    if normalize:
        features = normalizer(features)
    theirs = features["sentence_embedding"]
    ours = ctxkern.nn.MaskedMeanPool(normalize, backend=backend)(hidden, attention_mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    dout = torch.randn_like(ours)
    (our_grad,) = torch.autograd.grad(ours, hidden, dout)
    (their_grad,) = torch.autograd.grad(theirs, hidden, dout)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-6)
    # The packed form of the same batch gives the same embeddings.
    packed, cu = pack(hidden.detach(), mask)
    torch.testing.assert_close(ops.masked_mean_pool_varlen(packed, cu, normalize=normalize, backend=backend),
                               theirs.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- operators and compile


def _operators(backend):
    ns = torch.ops.ctxkern
    if backend == "triton":
        return (ns.masked_mean_pool_fwd_triton, ns.masked_mean_pool_bwd_triton, ns.masked_mean_pool_varlen_fwd_triton,
                ns.masked_mean_pool_varlen_bwd_triton)
    return ns.masked_mean_pool_fwd, ns.masked_mean_pool_bwd, ns.masked_mean_pool_varlen_fwd, ns.masked_mean_pool_varlen_bwd


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_opcheck(backend, device):
    require_backend(backend)
    fwd, bwd, vfwd, vbwd = _operators(backend)
    hidden, mask = make_batch(4, 6, 37, torch.float32, device, seed=7)
    packed, cu = pack(hidden, mask)
    hidden.requires_grad_()
    packed.requires_grad_()
    for normalize in (False, True):
        torch.library.opcheck(fwd, (hidden, mask, normalize))
        torch.library.opcheck(vfwd, (packed, cu, normalize))
    _out, mean = fwd(hidden, mask, True)
    dout = torch.randn(4, 37, device=device)
    torch.library.opcheck(bwd, (dout, mask, mean.detach()))
    torch.library.opcheck(bwd, (dout, mask, None))
    torch.library.opcheck(vbwd, (dout, cu, mean.detach(), packed.shape[0]))
    torch.library.opcheck(vbwd, (dout, cu, None, packed.shape[0]))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend)
    torch._dynamo.reset()
    hidden, mask = make_batch(4, 9, 48, torch.float32, device, seed=8)
    packed, cu = pack(hidden, mask)
    hidden.requires_grad_()
    packed.requires_grad_()

    @torch.compile(fullgraph=True)
    def embed(hidden, mask, packed, cu):
        return (ops.masked_mean_pool(hidden * 2, mask.long(), normalize=True, backend=backend),
                ops.masked_mean_pool_varlen(packed * 2, cu, backend=backend))

    dense, varlen = embed(hidden, mask, packed, cu)
    grads = torch.autograd.grad(dense.square().sum() + varlen.square().sum(), (hidden, packed))
    h64, p64 = hidden.detach().double().requires_grad_(), packed.detach().double().requires_grad_()
    ref_dense = masked_mean_pool_ref(h64 * 2, mask, True)
    ref_varlen = masked_mean_pool_varlen_ref(p64 * 2, cu)
    ref_grads = torch.autograd.grad(ref_dense.square().sum() + ref_varlen.square().sum(), (h64, p64))
    assert_fp32_close(dense, ref_dense)
    assert_fp32_close(varlen, ref_varlen)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_fp32_close(got, want, rel=2e-5)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("hidden,mask,match", [
    (torch.randn(4, 8), torch.ones(4, 8), "hidden must be 3-D"),
    (torch.randn(2, 4, 8), torch.ones(2, 5), r"mask must have shape \(B, S\)"),
    (torch.randn(2, 4, 8), torch.ones(4, 2), r"mask must have shape \(B, S\)"),
    (torch.randn(2, 4, 8).long(), torch.ones(2, 4), "hidden must be one of"),
    (torch.randn(2, 4, 8), torch.ones(2, 4, device="meta"), "mask must be on hidden's device"),
    (torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.complex64), "mask must be bool, integer or float"),
])
def test_bad_dense_input_names_the_argument(hidden, mask, match):
    with pytest.raises(ValueError, match=match):
        ops.masked_mean_pool(hidden, mask)


@pytest.mark.parametrize("hidden,cu,match", [
    (torch.randn(2, 4, 8), torch.tensor([0, 8]), "hidden must be 2-D"),
    (torch.randn(6, 8), torch.tensor([0.0, 6.0]), "cu_seqlens must be int32 or int64"),
    (torch.randn(6, 8), torch.tensor([[0, 6]]), "cu_seqlens must be 1-D"),
    (torch.randn(6, 8), torch.tensor([1, 6]), "cu_seqlens must start at 0"),
    (torch.randn(6, 8), torch.tensor([0, 4, 3, 6]), "cu_seqlens must be non-decreasing"),
    (torch.randn(6, 8), torch.tensor([0, 2, 5]), "cu_seqlens must end at hidden's length 6"),
    (torch.randn(6, 8), torch.tensor([0, 2, 7], dtype=torch.int32), "cu_seqlens must end at hidden's length 6"),
])
def test_bad_varlen_input_names_the_argument(hidden, cu, match):
    with pytest.raises(ValueError, match=match):
        ops.masked_mean_pool_varlen(hidden, cu)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.masked_mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3), backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        ctxkern.nn.MaskedMeanPool(backend="gpu")


def test_compiled_operators_reject_bad_input_without_crashing():
    require_backend("cpu")
    ns = torch.ops.ctxkern
    hidden, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        ns.masked_mean_pool_fwd(hidden, mask.long(), False)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ns.masked_mean_pool_fwd(hidden, torch.ones(2, 5, dtype=torch.bool), False)
    with pytest.raises(RuntimeError, match="hidden must be 3-D"):
        ns.masked_mean_pool_fwd(hidden[0], mask, False)
    with pytest.raises(RuntimeError, match="hidden must have a contiguous last dim"):
        ns.masked_mean_pool_fwd(hidden.transpose(1, 2), torch.ones(2, 8, dtype=torch.bool), False)
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32"):
        ns.masked_mean_pool_varlen_fwd(hidden[0], torch.tensor([0, 4]), False)
    for cu, match in (([1, 4], "start at 0"), ([0, 3, 2, 4], "non-decreasing"), ([0, 5], "end at hidden's length")):
        with pytest.raises(RuntimeError, match=match):
            ns.masked_mean_pool_varlen_fwd(hidden[0], torch.tensor(cu, dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="mean must be"):
        ns.masked_mean_pool_bwd(torch.randn(2, 8), mask, torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="cu_seqlens must have B"):
        ns.masked_mean_pool_varlen_bwd(torch.randn(2, 8), torch.tensor([0, 4], dtype=torch.int32), None, 4)


def test_nn_module_repr_and_default():
    pool = ctxkern.nn.MaskedMeanPool()
    assert not pool.normalize and "normalize=False" in repr(pool)
    hidden, mask = make_batch(3, 5, 16, torch.float32, "cpu", seed=9)
    assert_fp32_close(pool(hidden, mask), masked_mean_pool_ref(hidden.double(), mask))
