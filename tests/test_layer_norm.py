"""ops.layer_norm and nn.LayerNorm on every backend against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import ctxkern
from helpers import (BACKEND_DEVICES, KERNEL_DEVICES, assert_close_for_dtype, assert_fp32_close, max_err,
                     require_backend)
from ctxkern import ops
from ctxkern.reference import layer_norm_ref

# Odd and prime widths take the kernels' scalar paths; 768, 1024 and 2048 their 16-byte vector paths.
SIZES = (1, 7, 383, 768, 769, 1023, 1024, 2048, 4097)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Which optional inputs a call passes: (residual, weight, bias).
VARIANTS = {"affine": (False, True, True), "residual": (True, True, True), "bare": (False, False, False),
            "residual-weight-only": (True, True, False)}


def make_inputs(m, n, dtype, device, variant, seed=0):
    has_r, has_w, has_b = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    # An offset mean exercises the two-pass variance (a one-pass E[x^2] - E[x]^2 would lose digits here).
    x = rand(m, n, shift=3.0)
    return (x, rand(m, n) if has_r else None, rand(n, scale=0.5, shift=1.0) if has_w else None,
            rand(n, scale=0.5) if has_b else None)


def f64(t):
    return None if t is None else t.double()


def torch_low_precision(x, r, w, b, eps=1e-5):
    """PyTorch's own computation in the storage dtype (the yardstick for fp16/bf16 error)."""
    return F.layer_norm(x if r is None else x + r, (x.shape[-1],), w, b, eps)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_float64_reference(backend, device, dtype, n, variant):
    require_backend(backend)
    x, r, w, b = make_inputs(13, n, dtype, device, variant)
    y = ops.layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    ref = layer_norm_ref(f64(x), f64(w), f64(b), 1e-5, f64(r))
    assert_close_for_dtype(y, ref, torch_low_precision(x, r, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", (1, 7, 769, 4097))
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_float64_reference(backend, device, dtype, n, variant):
    require_backend(backend)
    inputs = [t if t is None else t.requires_grad_() for t in make_inputs(11, n, dtype, device, variant)]
    x, r, w, b = inputs
    dy = torch.randn(11, n, dtype=dtype, device=device)
    y = ops.layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(y, present, dy)

    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    xd, rd, wd, bd = ref_inputs
    ref_grads = torch.autograd.grad(layer_norm_ref(xd, wd, bd, 1e-5, rd), [t for t in ref_inputs if t is not None],
                                    dy.double())
    lp_inputs = [None if t is None else t.detach().requires_grad_() for t in inputs]
    xl, rl, wl, bl = lp_inputs
    torch_grads = torch.autograd.grad(torch_low_precision(xl, rl, wl, bl), [t for t in lp_inputs if t is not None], dy)
    for got, ref, theirs in zip(grads, ref_grads, torch_grads, strict=True):
        assert got.dtype == dtype
        assert_close_for_dtype(got, ref, theirs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_leading_dims_and_strided_views(backend, device):
    require_backend(backend)
    n = 383
    big = torch.randn(4, 5, n + 9, device=device)
    x = big[..., 3:3 + n]                            # rows of a wider tensor: a strided view, no copy needed
    r = torch.randn(n, 4, 5, device=device).permute(1, 2, 0)  # last dim not contiguous: the op copies it
    w, b = torch.randn(n, device=device), torch.randn(n, device=device)
    y = ops.layer_norm(x, w, b, residual=r, backend=backend)
    assert y.shape == (4, 5, n)
    assert_fp32_close(y, layer_norm_ref(x.double(), w.double(), b.double(), 1e-5, r.double()))
    xt = torch.randn(n, 6, device=device).t()       # (6, n) with stride (1, 6)
    assert_fp32_close(ops.layer_norm(xt, backend=backend), layer_norm_ref(xt.double()))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_unaligned_view_of_a_vector_width(backend, device, dtype):
    """A row start that is not 16-byte aligned must not take a vector path that assumes it is."""
    require_backend(backend)
    big = torch.randn(9, 770, device=device).to(dtype)
    x, r = big[:, 1:769], torch.randn(9, 768, device=device).to(dtype)
    ref = layer_norm_ref(x.double(), None, None, 1e-5, r.double())
    y = ops.layer_norm(x, residual=r, backend=backend)
    assert_close_for_dtype(y, ref, torch_low_precision(x, r, None, None))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("n", (8200, 16385, 20000))
def test_rows_wider_than_registers(backend, device, n):
    """Widths past the kernels' register-resident limits (the CUDA kernels switch to re-reading the row)."""
    require_backend(backend)
    x, r, w, b = (t.requires_grad_() for t in make_inputs(3, n, torch.float32, device, "residual"))
    y = ops.layer_norm(x, w, b, residual=r, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, r, w, b), dy)
    xd, rd, wd, bd = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref = layer_norm_ref(xd, wd, bd, 1e-5, rd)
    assert_fp32_close(y, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (xd, rd, wd, bd), dy.double()), strict=True):
        assert_fp32_close(got, want)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_eps_is_used(backend, device):
    require_backend(backend)
    x = 1e-2 * torch.randn(9, 64, device=device)
    for eps in (1e-12, 1e-3, 1.0):
        assert_fp32_close(ops.layer_norm(x, eps=eps, backend=backend), layer_norm_ref(x.double(), eps=eps))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)], ids=str)
def test_empty_input_gives_empty_output(backend, device, shape):
    require_backend(backend)
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(shape[-1], device=device, requires_grad=True)
    y = ops.layer_norm(x, w, residual=torch.randn(shape, device=device), backend=backend)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape and w.grad.shape == (shape[-1],)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_many_rows_and_wide_rows(backend, device):
    """More rows than any grid/thread split, and a row wider than one warp's or program's first choice."""
    require_backend(backend)
    m = 4099 if backend != "triton" or device == "cuda" else 67  # the interpreter is slow
    for n in (64, 8192):
        x = torch.randn(m if n == 64 else 5, n, device=device, requires_grad=True)
        w = torch.randn(n, device=device, requires_grad=True)
        y = ops.layer_norm(x, w, backend=backend)
        dy = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = layer_norm_ref(xd, wd)
        rdx, rdw = torch.autograd.grad(ref, (xd, wd), dy.double())
        assert_fp32_close(y, ref)
        assert_fp32_close(dx, rdx)
        assert_fp32_close(dw, rdw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cpu_outputs_past_the_cache_size(dtype):
    """Outputs of 8 MiB and more take the CPU kernel's streaming-store path; it must write every element."""
    require_backend("cpu")
    m, n = 5501, 768
    x, r, w, b = (t.requires_grad_() for t in make_inputs(m, n, dtype, "cpu", "residual"))
    y = ops.layer_norm(x, w, b, residual=r, backend="cpu")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    xd, rd, wd, bd = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref = layer_norm_ref(xd, wd, bd, 1e-5, rd)
    ref_grads = torch.autograd.grad(ref, (xd, wd, bd), dy.double())
    xl, rl, wl, bl = (t.detach().requires_grad_() for t in (x, r, w, b))
    theirs = torch_low_precision(xl, rl, wl, bl)
    assert_close_for_dtype(y, ref, theirs)
    for got, want, their in zip(grads, ref_grads, torch.autograd.grad(theirs, (xl, wl, bl), dy), strict=True):
        assert_close_for_dtype(got, want, their)


# ----------------------------------------------------------------------------- operators and compile


def _op_pairs(backend):
    if backend == "triton":
        return torch.ops.ctxkern.layer_norm_fwd_triton, torch.ops.ctxkern.layer_norm_bwd_triton
    return torch.ops.ctxkern.layer_norm_fwd, torch.ops.ctxkern.layer_norm_bwd  # cpu and cuda: one operator


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_opcheck(backend, device):
    require_backend(backend)
    fwd, bwd = _op_pairs(backend)
    x, r, w, b = (t.requires_grad_() for t in make_inputs(5, 37, torch.float32, device, "residual"))
    torch.library.opcheck(fwd, (x, r, w, b, 1e-5))
    torch.library.opcheck(fwd, (x, None, None, None, 1e-5))
    torch.library.opcheck(fwd, (x, r, w, b, 1e-5, True))
    y, mean, rstd, _ = fwd(x, r, w, b, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(bwd, (dy, x.detach(), r.detach(), w.detach(), mean.detach(), rstd.detach(), True))
    torch.library.opcheck(bwd, (dy, x.detach(), None, None, mean.detach(), rstd.detach(), False))
    torch.library.opcheck(bwd, (dy, x.detach(), r.detach(), w.detach(), mean.detach(), rstd.detach(), True,
                                torch.randn_like(y)))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend)
    torch._dynamo.reset()
    x, r, w, b = (t.requires_grad_() for t in make_inputs(6, 96, torch.float32, device, "residual"))

    @torch.compile(fullgraph=True)
    def block(x, r, w, b):
        return ops.layer_norm(x * 2, w, b, residual=r, backend=backend).relu()

    y = block(x, r, w, b)
    grads = torch.autograd.grad(y.square().sum(), (x, r, w, b))
    xd, rd, wd, bd = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref = layer_norm_ref(xd * 2, wd, bd, 1e-5, rd).relu()
    ref_grads = torch.autograd.grad(ref.square().sum(), (xd, rd, wd, bd))
    assert_fp32_close(y, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_fp32_close(got, want, rel=2e-5)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.randn(5)), "weight must have shape"),
    (dict(bias=torch.randn(8, dtype=torch.float64)), "bias must have x's dtype"),
    (dict(weight=torch.randn(8, device="meta")), "weight must be on x's device"),
    (dict(residual=torch.randn(4, 9)), "residual must have shape"),
    (dict(residual=torch.randn(4, 8).half()), "residual must have x's dtype"),
    (dict(eps=-1.0), "eps must be finite and >= 0"),
    (dict(eps=float("nan")), "eps must be finite and >= 0"),
    (dict(backend="fast"), "backend must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.layer_norm(torch.randn(4, 8), **kwargs)


def test_bad_x():
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        ops.layer_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="x must be one of"):
        ops.layer_norm(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.layer_norm([1.0, 2.0])


def test_unavailable_backend_says_why():
    if ctxkern.backends()["cuda"] == "available":
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' unavailable: "):
        ops.layer_norm(torch.randn(4, 8), backend="cuda")


def test_compiled_operator_rejects_bad_input_without_crashing():
    require_backend("cpu")
    fwd, bwd = torch.ops.ctxkern.layer_norm_fwd, torch.ops.ctxkern.layer_norm_bwd
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        fwd(x, None, torch.randn(5), None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        fwd(torch.randn(2, 4, 8), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        fwd(x.double(), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        fwd(x, torch.randn(3, 8), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must have a contiguous last dim"):
        fwd(torch.randn(8, 4).t(), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean must be"):
        bwd(x, x, None, None, torch.zeros(3), torch.zeros(4), False)


# ----------------------------------------------------------------------------- nn.LayerNorm

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape,kwargs", [
    ((768,), {}), ((4, 6), {}), ((33,), dict(elementwise_affine=False)), ((33,), dict(bias=False)),
    ((17,), dict(eps=1e-3)),
], ids=str)
def test_nn_layer_norm_is_a_drop_in(backend, device, shape, kwargs):
    require_backend(backend)
    theirs = torch.nn.LayerNorm(shape, device=device, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = ctxkern.nn.LayerNorm(shape, device=device, backend=backend, **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, *shape, device=device, requires_grad=True)
    y = ours(x)
    assert_fp32_close(y, theirs.double()(x.double()))
    dy = torch.randn_like(y)
    ours_grads = torch.autograd.grad(y, (x, *ours.parameters()), dy)
    theirs_grads = torch.autograd.grad(theirs.float()(x), (x, *theirs.parameters()), dy)
    for got, want in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_nn_layer_norm_residual_and_bad_shape():
    ln = ctxkern.nn.LayerNorm(16)
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    assert_fp32_close(ln(x, r), layer_norm_ref(x.double(), ln.weight.double(), ln.bias.double(), 1e-5, r.double()))
    with pytest.raises(ValueError, match="normalized_shape"):
        ln(torch.randn(2, 15))
    with pytest.raises(ValueError, match="backend must be one of"):
        ctxkern.nn.LayerNorm(16, backend="gpu")


# ----------------------------------------------------------------------------- huge, tiny and non-finite rows


def assert_fp32_relative(out, ref, rel=1e-5):
    """assert_fp32_close for values of any magnitude: the error relative to the reference's own scale (a
    gradient of a row of 1e30 is about 1e-30, which an absolute floor of 1e-5 would pass whatever it holds)."""
    scale = ref.abs().max().item()
    err = max_err(out, ref)
    assert scale > 0 and err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


# (row scale, eps). Huge: (s - mean)^2 passes fp32's 3.4e38 from |s - mean| ~ 1.8e19, so the plain sum of
# squares is inf and rstd 0 (the old kernels returned the bias: finite, off by up to 5). Tiny, with eps = 0 so
# that the variance is not swamped by eps: squares below 1.2e-38 are subnormal (|s - mean| < 1e-19) and lose
# digits, down to 0 (rstd = inf). 1e-40 is a row of subnormal inputs.
EXTREME_ROWS = [(1e19, 1e-5), (1e25, 1e-5), (1e30, 1e-5), (1e-20, 0.0), (1e-25, 0.0), (1e-40, 0.0)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("scale,eps", EXTREME_ROWS)
@pytest.mark.parametrize("n", (768, 769))
@pytest.mark.parametrize("variant", ("affine", "residual"))
def test_rows_of_extreme_magnitude_match_float64(backend, device, scale, eps, n, variant):
    """The kernels (and the torch backend's reference) rescale a row whose fp32 moments overflow or underflow,
    so they give the float64 result (finite, within the fp32 bound) where the plain fp32 computation gives
    finite garbage, inf or NaN."""
    require_backend(backend)
    x, r, w, b = make_inputs(5, n, torch.float32, device, variant)
    # Row 2 keeps its ordinary magnitude: rescaling is per row.
    x = torch.cat((x[:2] * scale, x[2:3], x[3:] * scale))
    r = None if r is None else torch.cat((r[:2] * scale, r[2:3], r[3:] * scale))
    y = ops.layer_norm(x, w, b, eps, residual=r, backend=backend)
    assert_fp32_close(y, layer_norm_ref(f64(x), f64(w), f64(b), eps, f64(r)))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("scale", (1e19, 1e30))
def test_gradients_of_huge_rows_match_float64(backend, device, scale):
    """The backward uses the forward's saved mean and rstd: those of a rescaled row must be the row's own."""
    require_backend(backend)
    x, r, w, b = (t.requires_grad_() for t in make_inputs(5, 769, torch.float32, device, "residual"))
    with torch.no_grad():
        x *= scale
        r *= scale
    y = ops.layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, r, w, b), dy)
    xd, rd, wd, bd = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref_grads = torch.autograd.grad(layer_norm_ref(xd, wd, bd, 1e-5, rd), (xd, rd, wd, bd), dy.double())
    for got, want in zip(grads, ref_grads, strict=True):
        assert_fp32_relative(got, want)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", ("inf", "-inf", "nan", "inf,-inf"))
@pytest.mark.parametrize("variant", ("affine", "residual"))
def test_non_finite_row_gives_nan_like_torch(backend, device, bad, variant):
    """A row holding inf or NaN is NaN throughout, as in torch.nn.functional.layer_norm; the other rows are
    untouched. (The old kernels did this too; it guards the rescaling path, which a row with inf takes.)"""
    require_backend(backend)
    x, r, w, b = make_inputs(4, 769, torch.float32, device, variant)
    for col, v in zip((5, 700), bad.split(",")):
        x[1, col] = float(v)
    y = ops.layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
    theirs = F.layer_norm(x if r is None else x + r, (769,), w, b, 1e-5)
    assert torch.isnan(theirs[1]).all()
    assert torch.isnan(y[1]).all()
    keep = [0, 2, 3]
    assert_fp32_close(y[keep], layer_norm_ref(f64(x[keep]), f64(w), f64(b), 1e-5, None if r is None else f64(r[keep])))


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_long_rows_are_as_accurate_as_torch(backend, device):
    """At N = 100000 (Triton: its maximum, 65536) the statistics are as accurate as torch's own fp32 LayerNorm.

    y's error is that of its statistics, which grows with N for a sum taken lane by lane along the row (the
    old CPU kernel: 3125 additions per lane, 2.2x to 3.5x torch's error), plus that of its own rounding, the
    same at any N and +-1 ulp from one formula to another. So the statistics are compared: y recomputed in
    float64 from the saved mean and rstd, against the same from torch.native_layer_norm's. Both are at about
    one ulp of the mean and rstd, hence 1.5x (blocked pairwise sums measure 0.9x to 1.3x over six seeds)."""
    require_backend(backend)
    from ctxkern.kernels.layer_norm import MAX_N

    n = min(100000, MAX_N) if backend == "triton" else 100000
    fwd = torch.ops.ctxkern.layer_norm_fwd_triton if backend == "triton" else torch.ops.ctxkern.layer_norm_fwd
    x, _, w, b = make_inputs(16, n, torch.float32, device, "affine", seed=0)
    xd, wd, bd = f64(x), f64(w), f64(b)
    ref = layer_norm_ref(xd, wd, bd, 1e-5)

    def stats_err(mean, rstd):
        return max_err(((xd - f64(mean).view(-1, 1)) * f64(rstd).view(-1, 1)) * wd + bd, ref)

    y, mean, rstd, _ = fwd(x, None, w, b, 1e-5)
    assert_fp32_close(y, ref)
    _, torch_mean, torch_rstd = torch.native_layer_norm(x, (n,), w, b, 1e-5)
    err, torch_err = stats_err(mean, rstd), stats_err(torch_mean, torch_rstd)
    assert err <= 1.5 * torch_err, f"statistics' error {err:.3g} > 1.5 * torch's {torch_err:.3g}"


# ----------------------------------------------------------------------------- prenorm: (y, x + residual)

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", (1, 7, 769, 4097))
def test_prenorm_returns_the_sum_and_the_norm_of_it(backend, device, dtype, n):
    require_backend(backend)
    x, r, w, b = make_inputs(13, n, dtype, device, "residual")
    y, total = ops.layer_norm(x, w, b, 1e-5, residual=r, prenorm=True, backend=backend)
    assert y.dtype == total.dtype == dtype and y.shape == total.shape == x.shape
    # The sum is taken in fp32 and rounded once to x's dtype, as torch's x + r does.
    assert torch.equal(total, x + r)
    assert_close_for_dtype(y, layer_norm_ref(f64(x), f64(w), f64(b), 1e-5, f64(r)), torch_low_precision(x, r, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", (1, 769))
@pytest.mark.parametrize("used", ("both", "norm", "sum"))
def test_prenorm_gradients_match_float64_reference(backend, device, dtype, n, used):
    """The sum's gradient reaches x and residual unchanged, on top of the norm's: a pre-LN block uses both."""
    require_backend(backend)
    inputs = [t.requires_grad_() for t in make_inputs(11, n, dtype, device, "residual")]
    x, r, w, b = inputs
    dy, ds = torch.randn(11, n, dtype=dtype, device=device), torch.randn(11, n, dtype=dtype, device=device)

    def loss_terms(y, total):
        return {"both": [(y, dy), (total, ds)], "norm": [(y, dy)], "sum": [(total, ds)]}[used]

    terms = loss_terms(*ops.layer_norm(x, w, b, 1e-5, residual=r, prenorm=True, backend=backend))
    grads = torch.autograd.grad([o for o, _ in terms], inputs, [g for _, g in terms], allow_unused=True)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    xd, rd, wd, bd = ref_inputs
    ref_terms = loss_terms(layer_norm_ref(xd, wd, bd, 1e-5, rd), xd + rd)
    ref_grads = torch.autograd.grad([o for o, _ in ref_terms], ref_inputs, [g.double() for _, g in ref_terms],
                                    allow_unused=True)
    lp_inputs = [t.detach().requires_grad_() for t in inputs]
    xl, rl, wl, bl = lp_inputs
    lp_terms = loss_terms(torch_low_precision(xl, rl, wl, bl), xl + rl)
    torch_grads = torch.autograd.grad([o for o, _ in lp_terms], lp_inputs, [g for _, g in lp_terms],
                                      allow_unused=True)
    for got, ref, theirs in zip(grads, ref_grads, torch_grads, strict=True):
        if ref is None:  # the sum alone does not reach weight and bias
            assert got is None or not got.any()
            continue
        assert got.dtype == dtype
        assert_close_for_dtype(got, ref, theirs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_prenorm_leading_dims_and_strided_views(backend, device):
    require_backend(backend)
    base = torch.randn(3, 5, 2 * 48, device=device)
    x, r = base[..., ::2], torch.randn(5, 3, 48, device=device).transpose(0, 1)  # neither is contiguous
    w, b = torch.randn(48, device=device), torch.randn(48, device=device)
    y, total = ops.layer_norm(x, w, b, residual=r, prenorm=True, backend=backend)
    assert torch.equal(total, x + r)
    assert_fp32_close(y, layer_norm_ref(f64(x), f64(w), f64(b), 1e-5, f64(r)))


def test_prenorm_needs_a_residual():
    with pytest.raises(ValueError, match="prenorm=True needs a residual"):
        ops.layer_norm(torch.randn(4, 8), prenorm=True)
    with pytest.raises(ValueError, match="prenorm=True needs a residual"):
        ctxkern.nn.LayerNorm((2, 4))(torch.randn(3, 2, 4), prenorm=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_prenorm_under_torch_compile_fullgraph(backend, device):
    require_backend(backend)
    torch._dynamo.reset()
    x, r, w, b = (t.requires_grad_() for t in make_inputs(6, 96, torch.float32, device, "residual"))

    @torch.compile(fullgraph=True)
    def block(x, r, w, b):
        y, stream = ops.layer_norm(x, w, b, residual=r, prenorm=True, backend=backend)
        return y.relu() + stream

    out = block(x, r, w, b)
    grads = torch.autograd.grad(out.square().sum(), (x, r, w, b))
    xd, rd, wd, bd = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref = layer_norm_ref(xd, wd, bd, 1e-5, rd).relu() + (xd + rd)
    ref_grads = torch.autograd.grad(ref.square().sum(), (xd, rd, wd, bd))
    assert_fp32_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_fp32_close(got, want, rel=2e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", ((48,), (4, 12)))
def test_nn_layer_norm_prenorm_is_torch_on_the_sum(backend, device, shape):
    require_backend(backend)
    ours = ctxkern.nn.LayerNorm(shape, backend=backend).to(device)
    theirs = torch.nn.LayerNorm(shape).to(device)
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.normal_()
        theirs.load_state_dict(ours.state_dict())
    x, r = torch.randn(5, 3, *shape, device=device), torch.randn(5, 3, *shape, device=device)
    y, total = ours(x, r, prenorm=True)
    assert torch.equal(total, x + r)
    assert_fp32_close(y, theirs(x + r).double(), rel=1e-5)


# ----------------------------------------------------------------------------- the C++ eager entry

def test_eager_entry_serves_the_plain_case_and_declines_the_rest():
    """csrc/eager/layer_norm.cpp: outputs for a plain call, None (ops.layer_norm's Python path) for anything it
    must not serve, so that the Python path's checks and special modes stay in force."""
    require_backend("cpu")
    entry = ctxkern._dispatch._C.layer_norm_eager
    x, r, w, b = make_inputs(6, 40, torch.float32, "cpu", "residual")
    assert_fp32_close(entry(x, w, b, None, 1e-5, False, 1), layer_norm_ref(f64(x), f64(w), f64(b)))
    y, total = entry(x, w, b, r, 1e-5, True, 1)
    assert torch.equal(total, x + r)

    class Sub(torch.Tensor):
        pass

    declined = [
        (x.double(), w.double(), b.double(), None, 1e-5, False, 1),   # float64: the reference
        (x.as_subclass(Sub), w, b, None, 1e-5, False, 1),           # a tensor subclass
        (x, w[:-1], b, None, 1e-5, False, 1),                       # a bad shape: the Python path's message
        (x, w, b, None, -1.0, False, 1),                            # a bad eps
        (x, w, b, None, 1e-5, True, 1),                             # prenorm without a residual
        (x, w, b, None, "1e-5", False, 1),                          # not a number
        (x, w, b, None, 1e-5, False, 2),                            # a CPU tensor when only CUDA is served
        (x.to("meta"), w.to("meta"), b.to("meta"), None, 1e-5, False, 1),
        (x[:0], w, b, None, 1e-5, False, 1),                        # empty: the Python path
        ("x", w, b, None, 1e-5, False, 1),
    ]
    for args in declined:
        assert entry(*args) is None, args
