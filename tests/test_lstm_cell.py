"""ops.lstm_cell on every backend against the float64 reference: values, gradients, clipping, operators; and
ctxkern.nn.LSTM against torch.nn.LSTM with the same weights (computed in float64), its clipping against
AllenNLP's equations written out as a plain float64 loop (allennlp_lstm.py)."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import ctxkern
from allennlp_lstm import allennlp_reference
from helpers import BACKEND_DEVICES, KERNEL_DEVICES, assert_close_for_dtype, assert_fp32_close, require_backend
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
def test_activations_over_the_whole_float_range(backend, device):
    """sigmoid and tanh as the cell computes them, read off c_new = sigmoid(i) * tanh(g) with the other factor
    saturated to exactly 1: within 2e-7 of float64 over [-100, 100] (PyTorch's own float32 is within 9e-8; the
    CPU kernels' inlined exp gives 1.1e-7), the infinities saturated exactly and NaN passed on."""
    require_backend(backend)
    x = torch.cat([torch.linspace(-100, 100, 20_001), torch.linspace(-3, 3, 10_001),
                   torch.tensor([float("inf"), -float("inf"), float("nan")])])
    n = x.numel()
    one = torch.full((n,), 40.0)  # sigmoid(40) and tanh(40) round to 1 in float32

    def c_new(i, g):
        ig = torch.stack([i, torch.zeros(n), g, torch.zeros(n)]).reshape(1, -1).to(device)
        return ops.lstm_cell(ig, torch.zeros_like(ig), torch.zeros(1, n, device=device), backend=backend)[1][0].cpu()

    for got, want in ((c_new(x, one), torch.sigmoid(x.double())), (c_new(one, x), torch.tanh(x.double()))):
        finite = x.isfinite()
        assert (got[finite].double() - want[finite]).abs().max().item() <= 2e-7
        assert got[-3:-1].tolist() == want[-3:-1].tolist()  # +-inf: exactly 1 and 0 (sigmoid), 1 and -1 (tanh)
        assert got[-1].isnan()


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


# ----------------------------------------------------------------------------- nn.LSTM

INPUT, LAYER_HIDDEN, PROJ, STEPS, BATCH = 5, 7, 3, 6, 4
LENGTHS = [5, 2, 6, 1]  # unequal and unsorted: packing sorts them, and h_n must come back in this order


def make_pair(backend="auto", **kwargs):
    """(ours, torch's in float64) with the same random weights, loaded through torch's state_dict."""
    theirs = torch.nn.LSTM(INPUT, LAYER_HIDDEN, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-0.6, 0.6)
    ours = ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs.double()


def grads_of(outputs, wrt, seed=1):
    """Gradients of a random linear function of every output (so output, h_n and c_n all carry one)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, wrt)


def assert_all_close(got, want):
    for a, b in zip(got, want, strict=True):
        assert_fp32_close(a, b)


CONFIGS = [dict(num_layers=layers, bidirectional=bi, proj_size=proj, batch_first=bf)
           for layers, bi, proj, bf in itertools.product((1, 2), (False, True), (0, PROJ), (False, True))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_padded_matches_torch_lstm(config):
    ours, theirs = make_pair(**config)
    shape = (BATCH, STEPS, INPUT) if config["batch_first"] else (STEPS, BATCH, INPUT)
    x = torch.randn(shape, requires_grad=True)
    out, (h_n, c_n) = ours(x)
    xd = x.detach().double().requires_grad_()
    ref_out, (ref_h, ref_c) = theirs(xd)
    assert out.shape == ref_out.shape and h_n.shape == ref_h.shape and c_n.shape == ref_c.shape
    assert_all_close((out, h_n, c_n), (ref_out, ref_h, ref_c))
    assert_all_close(grads_of((out, h_n, c_n), (x, *ours.parameters())),
                     grads_of((ref_out, ref_h, ref_c), (xd, *theirs.parameters())))


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c["batch_first"]],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "batch_first"))
def test_packed_unequal_lengths_match_torch_lstm(config):
    ours, theirs = make_pair(**config)
    x = torch.randn(STEPS, BATCH, INPUT, requires_grad=True)
    layers = config["num_layers"] * (2 if config["bidirectional"] else 1)
    h0 = torch.randn(layers, BATCH, config["proj_size"] or LAYER_HIDDEN, requires_grad=True)
    c0 = torch.randn(layers, BATCH, LAYER_HIDDEN, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    out, (h_n, c_n) = ours(packed, (h0, c0))
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)

    xd, h0d, c0d = (t.detach().double().requires_grad_() for t in (x, h0, c0))
    ref_out, (ref_h, ref_c) = theirs(pack_padded_sequence(xd, torch.tensor(LENGTHS), enforce_sorted=False),
                                     (h0d, c0d))
    padded, lengths = pad_packed_sequence(out)
    ref_padded, _ = pad_packed_sequence(ref_out)
    assert lengths.tolist() == LENGTHS
    assert_all_close((padded, h_n, c_n), (ref_padded, ref_h, ref_c))
    assert_all_close(grads_of((out.data, h_n, c_n), (x, h0, c0, *ours.parameters())),
                     grads_of((ref_out.data, ref_h, ref_c), (xd, h0d, c0d, *theirs.parameters())))


@pytest.mark.parametrize("config", [c for c in CONFIGS if c["num_layers"] == 2 and not c["batch_first"]],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k in ("bidirectional", "proj_size")))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_grad_time_loop_in_cpp_matches_torch_lstm(config, packed):
    """Without autograd the CPU backend runs each layer's time loop in the operator lstm_layer_fwd."""
    require_backend("cpu")
    ours, theirs = make_pair(backend="cpu", **config)
    x = torch.randn(STEPS, BATCH, INPUT)
    layers = config["num_layers"] * (2 if config["bidirectional"] else 1)
    h0, c0 = torch.randn(layers, BATCH, config["proj_size"] or LAYER_HIDDEN), torch.randn(layers, BATCH, LAYER_HIDDEN)
    lengths = torch.tensor(LENGTHS)
    pack = (lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)) if packed else (lambda t: t)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out, (h_n, c_n) = ours(pack(x), (h0, c0))
    assert sum(e.name == "ctxkern::lstm_layer_fwd" for e in prof.events()) == layers
    ref_out, (ref_h, ref_c) = theirs(pack(x.double()), (h0.double(), c0.double()))
    if packed:
        out, ref_out = pad_packed_sequence(out)[0], pad_packed_sequence(ref_out)[0]
    assert_all_close((out, h_n, c_n), (ref_out, ref_h, ref_c))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_backends_match_torch_lstm(backend):
    require_backend(backend)
    ours, theirs = make_pair(backend=backend, num_layers=2, bidirectional=True, proj_size=PROJ)
    x = torch.randn(4, 3, INPUT, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([4, 1, 3]), enforce_sorted=False)
    out, (h_n, c_n) = ours(packed)
    xd = x.detach().double().requires_grad_()
    ref_out, (ref_h, ref_c) = theirs(pack_padded_sequence(xd, torch.tensor([4, 1, 3]), enforce_sorted=False))
    assert_all_close((out.data, h_n, c_n), (ref_out.data, ref_h, ref_c))
    assert_all_close(grads_of((out.data, h_n, c_n), (x, *ours.parameters())),
                     grads_of((ref_out.data, ref_h, ref_c), (xd, *theirs.parameters())))


def test_drop_in_construction_and_state_dict():
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(INPUT, LAYER_HIDDEN, num_layers=2, bias=False, bidirectional=True, proj_size=PROJ)
    torch.manual_seed(3)
    ours = ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, num_layers=2, bias=False, bidirectional=True, proj_size=PROJ)
    assert isinstance(ours, torch.nn.LSTM)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "weight_hr_l1_reverse" in ours.state_dict()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), f"{name} is initialized differently"
    x = torch.randn(STEPS, BATCH, INPUT)
    out, (h_n, c_n) = ours(x)
    ref_out, (ref_h, ref_c) = theirs.double()(x.double())
    assert_all_close((out, h_n, c_n), (ref_out, ref_h, ref_c))


def test_unbatched_input_and_empty_batch():
    ours, theirs = make_pair(num_layers=2, bidirectional=True)
    x = torch.randn(STEPS, INPUT)
    out, (h_n, c_n) = ours(x)
    ref_out, (ref_h, ref_c) = theirs(x.double())
    assert out.shape == (STEPS, 2 * LAYER_HIDDEN) and h_n.shape == (4, LAYER_HIDDEN)
    assert_all_close((out, h_n, c_n), (ref_out, ref_h, ref_c))
    out, (h_n, _) = ours(torch.randn(STEPS, 0, INPUT))
    assert out.shape == (STEPS, 0, 2 * LAYER_HIDDEN) and h_n.shape == (4, 0, LAYER_HIDDEN)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    ours = ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, num_layers=2, dropout=1.0)
    top = ctxkern.nn.LSTM(LAYER_HIDDEN, LAYER_HIDDEN)  # the second layer alone, fed what dropout 1.0 leaves: zeros
    top.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ours.state_dict().items() if "_l1" in k})
    x = torch.randn(STEPS, BATCH, INPUT)
    out_train, _ = ours.train()(x)
    assert_fp32_close(out_train, top(torch.zeros(STEPS, BATCH, LAYER_HIDDEN))[0].double())
    out_eval, _ = ours.eval()(x)
    assert not torch.allclose(out_eval, out_train)


# ----------------------------------------------------------------------------- clipping (AllenNLP's equations)

@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_cell_and_projection_clipping_follow_allennlp(backend, grad):
    require_backend(backend)
    torch.manual_seed(0)
    lstm = ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ, cell_clip=0.3,
                           proj_clip=0.2, backend=backend)
    with torch.no_grad():
        for p in lstm.parameters():
            p.uniform_(-1.5, 1.5)  # large weights, so both clips are active on many units
    x = 2 * torch.randn(STEPS, BATCH, INPUT)
    with torch.set_grad_enabled(grad):
        out, (h_n, c_n) = lstm(pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False))
    padded, _ = pad_packed_sequence(out)
    ref_out, ref_h, ref_c = allennlp_reference(lstm, x, LENGTHS, 0.3, 0.2)
    assert_all_close((padded, h_n, c_n), (ref_out, ref_h, ref_c))
    assert (c_n.abs() == 0.3).any() and (padded.abs() == 0.2).any(), "the test's weights should make the clips bite"


# ----------------------------------------------------------------------------- bad input

def test_bad_input_names_the_argument():
    lstm = ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, num_layers=2, proj_size=PROJ)
    with pytest.raises(ValueError, match="input must have input_size = 5 features"):
        lstm(torch.randn(STEPS, BATCH, INPUT + 1))
    with pytest.raises(ValueError, match="input must be a 3-D"):
        lstm(torch.randn(2, STEPS, BATCH, INPUT))
    with pytest.raises(TypeError, match="input must be a 3-D .* got list"):  # non-tensors: TypeError, as in the ops
        lstm([[1.0] * INPUT])
    with pytest.raises(TypeError, match="hx must be a tuple"):
        lstm(torch.randn(STEPS, BATCH, INPUT), torch.randn(2, BATCH, PROJ))
    with pytest.raises(TypeError, match="h0 must be a torch.Tensor"):
        lstm(torch.randn(STEPS, BATCH, INPUT), ([0.0], torch.randn(2, BATCH, LAYER_HIDDEN)))
    with pytest.raises(ValueError, match="input must have the parameters' dtype"):
        lstm(torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4, 3\)"):
        lstm(torch.randn(STEPS, BATCH, INPUT), (torch.randn(2, BATCH, LAYER_HIDDEN), torch.randn(2, BATCH, LAYER_HIDDEN)))
    with pytest.raises(ValueError, match=r"c0 must have shape \(2, 4, 7\)"):
        lstm(torch.randn(STEPS, BATCH, INPUT), (torch.randn(2, BATCH, PROJ), torch.randn(1, BATCH, LAYER_HIDDEN)))
    with pytest.raises(ValueError, match="cell_clip must be"):
        ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, cell_clip=-1.0)
    with pytest.raises(ValueError, match="proj_clip must be"):
        ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, proj_size=2, proj_clip=-0.5)
    with pytest.raises(ValueError, match="proj_clip clamps the projected output"):
        ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, proj_clip=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ctxkern.nn.LSTM(INPUT, LAYER_HIDDEN, backend="gpu")


def test_time_loop_operator():
    """opcheck of lstm_layer_fwd (schema, fake kernel), and its own checks of direct calls."""
    require_backend("cpu")
    op = torch.ops.ctxkern.lstm_layer_fwd
    h, p = 6, 3
    gates_in, h0, c0 = torch.randn(7, 4 * h), torch.randn(3, p), torch.randn(3, h)
    w_hh, w_hr, bias = torch.randn(4 * h, p), torch.randn(p, h), torch.randn(4 * h)
    torch.library.opcheck(op, (gates_in, [3, 2, 2], h0, c0, w_hh, w_hr, bias, 0.5, 0.4, True))
    torch.library.opcheck(op, (gates_in[:, :4 * p], [3, 2, 2], h0, c0[:, :p], w_hh[:4 * p], None, None, None, None,
                               False))
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        op(gates_in, [2, 3, 2], h0, c0, w_hh, w_hr, bias, None, None, False)
    with pytest.raises(RuntimeError, match="batch_sizes must sum to gates_in's rows"):
        op(gates_in, [3, 2], h0, c0, w_hh, w_hr, bias, None, None, False)
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        op(gates_in, [3, 2, 2], h0, c0, w_hh.t(), w_hr, bias, None, None, False)

