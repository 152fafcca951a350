"""ops.lstm_cell on every backend against the float64 reference: values, gradients, clipping, operators."""
import pytest
import torch

import ctxkern
from helpers import BACKEND_DEVICES, assert_close_for_dtype, assert_fp32_close, require_backend
from ctxkern import ops
from ctxkern.reference import lstm_cell_ref

# Odd and prime widths take the kernels' scalar paths, 384 their vector ones, 1031 both (vectors, then a tail).
HIDDEN = (1, 7, 384, 1031)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_ID = lambda d: str(d).removeprefix("torch.")  # noqa: E731


def make_inputs(b, h, dtype, device, with_bias=True, scale=1.0, seed=0):
    """(input_gates, hidden_gates, c, bias) with pre-activations of a few units, where every branch matters."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    return rand(b, 4 * h), rand(b, 4 * h), rand(b, h), rand(4 * h) if with_bias else None


def f64(t):
    return None if t is None else t.detach().double()


def torch_low_precision(ig, hg, c, bias, cell_clip=None):
    """PyTorch's own eager composition in the storage dtype (the yardstick for fp16/bf16 error)."""
    gates = ig + hg + (bias if bias is not None else 0)
    i, f, g, o = gates.chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if cell_clip is not None:
        c_new = c_new.clamp(-cell_clip, cell_clip)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("cell_clip", [None, 0.7])
def test_forward_matches_float64_reference(backend, device, dtype, h, cell_clip):
    require_backend(backend)
    ig, hg, c, bias = make_inputs(5, h, dtype, device, scale=2.0)
    out_h, out_c = ops.lstm_cell(ig, hg, c, bias, cell_clip=cell_clip, backend=backend)
    ref_h, ref_c = lstm_cell_ref(f64(ig), f64(hg), f64(c), f64(bias), cell_clip)
    theirs = torch_low_precision(ig, hg, c, bias, cell_clip)
    for got, ref, their in zip((out_h, out_c), (ref_h, ref_c), theirs, strict=True):
        assert got.dtype == dtype and got.device == c.device
        assert_close_for_dtype(got, ref, their)
    if cell_clip is not None:
        # The bound as the storage dtype rounds it (0.7 in fp16 is 0.7002).
        assert out_c.abs().max().item() <= torch.tensor(cell_clip, dtype=dtype).item()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID)
@pytest.mark.parametrize("h", (7, 1031))
@pytest.mark.parametrize("cell_clip,with_bias", [(None, True), (0.7, True), (None, False)], ids=str)
def test_gradients_match_float64_reference(backend, device, dtype, h, cell_clip, with_bias):
    require_backend(backend)
    inputs = [t if t is None else t.requires_grad_()
              for t in make_inputs(9, h, dtype, device, with_bias=with_bias, scale=2.0)]
    present = [t for t in inputs if t is not None]
    dh, dc = torch.randn(9, h, device=device).to(dtype), torch.randn(9, h, device=device).to(dtype)
    out = ops.lstm_cell(*inputs, cell_clip=cell_clip, backend=backend)
    grads = torch.autograd.grad(out, present, (dh, dc))

    ref_inputs = [f64(t) if t is None else f64(t).requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(lstm_cell_ref(*ref_inputs, cell_clip), [t for t in ref_inputs if t is not None],
                                    (dh.double(), dc.double()))
    lp_inputs = [None if t is None else t.detach().requires_grad_() for t in inputs]
    theirs = torch.autograd.grad(torch_low_precision(*lp_inputs, cell_clip), [t for t in lp_inputs if t is not None],
                                 (dh, dc))
    for got, ref, their in zip(grads, ref_grads, theirs, strict=True):
        assert got.dtype == dtype
        assert_close_for_dtype(got, ref, their)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_clip_gradient_passes_at_the_bound_and_stops_past_it(backend, device):
    """torch.clamp's rule: the gradient passes where -clip <= c_raw <= clip, bounds included, and is 0 beyond.

    With sigmoid(f) = 1 (f = +40), sigmoid(i) = 0 (i = -40): c_raw = c exactly, so c decides the branch.
    """
    require_backend(backend)
    h, clip = 4, 0.5
    big = 40.0
    ig = torch.tensor([[-big] * h + [big] * h + [0.3] * h + [0.2] * h], device=device)
    hg = torch.zeros_like(ig)
    c = torch.tensor([[0.5, -0.5, 0.75, -0.25]], device=device, requires_grad=True)
    _, c_new = ops.lstm_cell(ig, hg, c, cell_clip=clip, backend=backend)
    assert c_new.tolist() == [[0.5, -0.5, 0.5, -0.25]]
    (dc,) = torch.autograd.grad(c_new.sum(), c)
    assert dc.tolist() == [[1.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_saturated_gates_and_large_cells(backend, device):
    """Pre-activations of +-60 saturate every sigmoid and tanh: no inf or NaN may leak out of the exp."""
    require_backend(backend)
    ig, hg, c, bias = make_inputs(6, 33, torch.float32, device, scale=30.0)
    c = (c * 10).requires_grad_()
    ig.requires_grad_()
    out = ops.lstm_cell(ig, hg, c, bias, backend=backend)
    ref = lstm_cell_ref(f64(ig), f64(hg), f64(c), f64(bias))
    for got, want in zip(out, ref, strict=True):
        assert_fp32_close(got, want)
    grads = torch.autograd.grad(out, (ig, c), (torch.ones_like(out[0]), torch.ones_like(out[1])))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_strided_views(backend, device):
    """Rows of wider tensors (the nn.LSTM case: a step's slice of the whole input projection) and a transposed c."""
    require_backend(backend)
    h = 40
    big = torch.randn(6, 4 * h + 8, device=device)
    ig = big[:, 3:3 + 4 * h]                              # row stride 4h + 8, misaligned start
    hg = torch.randn(6, 2, 4 * h, device=device)[:, 1]     # row stride 8h
    c = torch.randn(h, 6, device=device).t()               # last dim not contiguous: the op copies it
    bias = torch.randn(4 * h, device=device)
    ig.requires_grad_()
    out = ops.lstm_cell(ig, hg, c, bias, cell_clip=1.0, backend=backend)
    ref = lstm_cell_ref(f64(ig).requires_grad_(), f64(hg), f64(c), f64(bias), 1.0)
    for got, want in zip(out, ref, strict=True):
        assert_fp32_close(got, want)
    dh = torch.randn(6, h, device=device)
    (got,) = torch.autograd.grad(out[0], ig, dh)
    xd = f64(ig).requires_grad_()
    (want,) = torch.autograd.grad(lstm_cell_ref(xd, f64(hg), f64(c), f64(bias), 1.0)[0], xd, dh.double())
    assert_fp32_close(got, want)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("b,h", [(0, 16), (3, 0)], ids=str)
def test_empty_input_gives_empty_output(backend, device, b, h):
    require_backend(backend)
    ig, hg, c, bias = (t.requires_grad_() for t in make_inputs(b, h, torch.float32, device))
    out_h, out_c = ops.lstm_cell(ig, hg, c, bias, backend=backend)
    assert out_h.shape == out_c.shape == (b, h)
    (out_h.sum() + out_c.sum()).backward()
    assert ig.grad.shape == (b, 4 * h) and bias.grad.shape == (4 * h,) and not bias.grad.any()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_many_rows(backend, device):
    """More rows than any thread/program split, and dbias summed over all of them."""
    require_backend(backend)
    b = 1030 if backend != "triton" or device == "cuda" else 70  # the interpreter is slow
    ig, hg, c, bias = (t.requires_grad_() for t in make_inputs(b, 96, torch.float32, device))
    out = ops.lstm_cell(ig, hg, c, bias, backend=backend)
    dh, dc = torch.randn_like(out[0]), torch.randn_like(out[1])
    grads = torch.autograd.grad(out, (ig, c, bias), (dh, dc))
    refs = [f64(t).requires_grad_() for t in (ig, hg, c, bias)]
    ref_out = lstm_cell_ref(*refs)
    ref_grads = torch.autograd.grad(ref_out, (refs[0], refs[2], refs[3]), (dh.double(), dc.double()))
    for got, want in zip((*out, *grads), (*ref_out, *ref_grads), strict=True):
        assert_fp32_close(got, want)


def test_cpu_dbias_is_deterministic():
    require_backend("cpu")
    ig, hg, c, bias = (t.requires_grad_() for t in make_inputs(257, 300, torch.float32, "cpu"))
    dh = torch.randn(257, 300)
    first = torch.autograd.grad(ops.lstm_cell(ig, hg, c, bias, backend="cpu")[0], bias, dh)[0]
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            again = torch.autograd.grad(ops.lstm_cell(ig, hg, c, bias, backend="cpu")[0], bias, dh)[0]
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(first, again)


# ----------------------------------------------------------------------------- operators and compile

# The kernel backends (not the torch reference) on each device, for the operator-level tests: opcheck and
# torch.compile check each operator's fake against its kernel, on the CPU and, where there is a GPU, on CUDA.
KERNEL_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "torch"]


def _op_pairs(backend):
    if backend == "triton":
        return torch.ops.ctxkern.lstm_cell_fwd_triton, torch.ops.ctxkern.lstm_cell_bwd_triton
    return torch.ops.ctxkern.lstm_cell_fwd, torch.ops.ctxkern.lstm_cell_bwd  # cpu and cuda: one operator


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_opcheck(backend, device):
    require_backend(backend)
    fwd, bwd = _op_pairs(backend)
    ig, hg, c, bias = (t.requires_grad_() for t in make_inputs(5, 19, torch.float32, device))
    torch.library.opcheck(fwd, (ig, hg, c, bias, 0.8))
    torch.library.opcheck(fwd, (ig, hg, c, None, None))
    dh, dc = torch.randn(5, 19, device=device), torch.randn(5, 19, device=device)
    detached = [t.detach() for t in (ig, hg, c, bias)]
    torch.library.opcheck(bwd, (dh, dc, *detached, 0.8))
    torch.library.opcheck(bwd, (dh, dc, *detached[:3], None, None))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend)
    torch._dynamo.reset()
    ig, hg, c, bias = (t.requires_grad_() for t in make_inputs(6, 24, torch.float32, device))

    @torch.compile(fullgraph=True)
    def step(ig, hg, c, bias):
        h, c_new = ops.lstm_cell(ig * 2, hg, c, bias, cell_clip=0.9, backend=backend)
        return h.square().sum() + c_new.sum()

    loss = step(ig, hg, c, bias)
    grads = torch.autograd.grad(loss, (ig, hg, c, bias))
    refs = [f64(t).requires_grad_() for t in (ig, hg, c, bias)]
    h, c_new = lstm_cell_ref(refs[0] * 2, *refs[1:], 0.9)
    ref_loss = h.square().sum() + c_new.sum()
    assert_fp32_close(loss, ref_loss)
    for got, want in zip(grads, torch.autograd.grad(ref_loss, refs), strict=True):
        assert_fp32_close(got, want)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(4, 8), torch.randn(4, 12), torch.randn(4, 2)), {}, "hidden_gates must have shape"),
    ((torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 2)), {}, "input_gates' width must be divisible by 4"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3)), {}, "c must have shape"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 2)), {}, "c must have shape"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2), torch.randn(4)), {}, "bias must have shape"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2).double()), {}, "c must have input_gates's dtype"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2)), dict(cell_clip=-1.0), "cell_clip must be"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2)), dict(cell_clip=float("nan")), "cell_clip must be"),
    ((torch.randn(8), torch.randn(8), torch.randn(2)), {}, "input_gates must be 2-D"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2)), dict(backend="fast"), "backend must be one of"),
])
def test_bad_arguments_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.lstm_cell(*args, **kwargs)


def test_compiled_operator_rejects_bad_input_without_crashing():
    require_backend("cpu")
    fwd, bwd = torch.ops.ctxkern.lstm_cell_fwd, torch.ops.ctxkern.lstm_cell_bwd
    ig, c = torch.randn(4, 8), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="hidden_gates must have shape"):
        fwd(ig, torch.randn(4, 4), c, None, None)
    with pytest.raises(RuntimeError, match="width must be divisible by 4"):
        fwd(torch.randn(4, 6), torch.randn(4, 6), c, None, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous"):
        fwd(ig, ig, c, torch.randn(7), None)
    with pytest.raises(RuntimeError, match="cell_clip must be >= 0"):
        fwd(ig, ig, c, None, -0.5)
    with pytest.raises(RuntimeError, match="c must have a contiguous last dim"):
        fwd(ig, ig, torch.randn(2, 4).t(), None, None)
    with pytest.raises(RuntimeError, match="dh must have shape"):
        bwd(torch.randn(3, 2), c, ig, ig, c, None, None)
