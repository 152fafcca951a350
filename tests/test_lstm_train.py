"""ctxkern.nn.LSTM's training path on the compiled layer operators (lstm_layer_fwd_train + lstm_layer_bwd, the
whole backward through time in C++): gradients of every parameter, the input, h0 and c0 against torch.nn.LSTM
(float64 on the float64 operators, and float32 against a float64 torch.nn.LSTM at fp32 tolerances), the clips
against AllenNLP's equations (allennlp_lstm.py), dropout, determinism, and the operators' opcheck and errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import ctxkern
from allennlp_lstm import allennlp_reference
from helpers import assert_fp32_close, assert_low_precision_close, cuda_only, require_backend

INPUT, HIDDEN, PROJ, STEPS = 5, 7, 3, 6
LENGTHS = [5, 2, 6, 1]  # unequal and unsorted: packing sorts them, and reverse starts each at its own end
BATCH = len(LENGTHS)

CONFIGS = {
    "1layer": dict(),
    "proj": dict(proj_size=PROJ),
    "bi-2layers": dict(num_layers=2, bidirectional=True),
    "bi-2layers-proj-batch_first": dict(num_layers=2, bidirectional=True, proj_size=PROJ, batch_first=True),
    "no-bias": dict(bias=False, num_layers=2),
}


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("cpu")


def make_pair(dtype, **config):
    """(ours on the cpu backend in dtype, torch.nn.LSTM in float64) with the same random weights."""
    theirs = torch.nn.LSTM(INPUT, HIDDEN, dtype=torch.float64, **config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-0.6, 0.6)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, backend="cpu", dtype=dtype, **config)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def state_shapes(module):
    ndir = 2 if module.bidirectional else 1
    return ((module.num_layers * ndir, BATCH, module.proj_size or module.hidden_size),
            (module.num_layers * ndir, BATCH, module.hidden_size))


def loss_of(outputs, seed=1):
    """A random linear function of every output, so that out, h_n and c_n all carry a gradient."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)


def run(module, x, h0, c0, packed):
    """Outputs (out as padded, h_n, c_n) and the gradients of loss_of them w.r.t. parameters, x, h0, c0."""
    leaves = [x, h0, c0]
    if packed:
        out, (h_n, c_n) = module(pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False), (h0, c0))
        out = pad_packed_sequence(out)[0]
    else:
        out, (h_n, c_n) = module(x, (h0, c0))
    outputs = (out, h_n, c_n)
    return outputs, torch.autograd.grad(loss_of(outputs), [*module.parameters(), *leaves])


def inputs(dtype, module, packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, STEPS, INPUT) if module.batch_first and not packed else (STEPS, BATCH, INPUT)
    h_shape, c_shape = state_shapes(module)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for s in (shape, h_shape, c_shape)]


def assert_all_close(got, want):
    """float64 results (the float64 operators) to 1e-10 of torch's; float32 ones at fp32 tolerances."""
    for a, b in zip(got, want, strict=True):
        if a.dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
        else:
            assert_fp32_close(a, b)


def uses_layer_operators(module, *args) -> bool:
    with torch.profiler.profile() as prof:
        run(module, *args)
    names = {e.name for e in prof.events()}
    return {"ctxkern::lstm_layer_fwd_train", "ctxkern::lstm_layer_bwd"} <= names


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_float64_gradients_equal_torch_lstm(config, packed):
    if packed:
        config = dict(config, batch_first=False)  # pack_padded_sequence takes (T, B, I) here
    ours, theirs = make_pair(torch.float64, **config)
    x, h0, c0 = inputs(torch.float64, ours, packed)
    assert uses_layer_operators(ours, x, h0, c0, packed)
    got_out, got = run(ours, x, h0, c0, packed)
    want_out, want = run(theirs, x, h0, c0, packed)
    assert_all_close((*got_out, *got), (*want_out, *want))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", [CONFIGS["proj"], CONFIGS["bi-2layers-proj-batch_first"]], ids=["proj", "bi"])
def test_float32_gradients_match_float64_torch_lstm(config, packed):
    config = dict(config, batch_first=False)
    ours, theirs = make_pair(torch.float32, **config)
    x, h0, c0 = inputs(torch.float32, ours, packed)
    got_out, got = run(ours, x, h0, c0, packed)
    want_out, want = run(theirs, *(t.detach().double().requires_grad_() for t in (x, h0, c0)), packed)
    assert_all_close((*got_out, *got), (*want_out, *want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_gradients_stay_within_twice_torch_error(dtype):
    config = dict(num_layers=2, bidirectional=True, proj_size=PROJ)
    ours, theirs = make_pair(dtype, **config)
    x, h0, c0 = inputs(dtype, ours, packed=False)
    _, got = run(ours, x, h0, c0, False)
    _, want = run(theirs, *(t.detach().double().requires_grad_() for t in (x, h0, c0)), False)
    _, theirs_lp = run(theirs.to(dtype), x, h0, c0, False)
    for a, b, c in zip(got, want, theirs_lp, strict=True):
        assert_low_precision_close(a, b, c, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reverse_gradients_equal_torch_reverse_direction(dtype):
    """reverse=True over a PackedSequence: torch.nn.LSTM's reverse direction, each sequence from its own end."""
    theirs = torch.nn.LSTM(INPUT, HIDDEN, bidirectional=True, proj_size=PROJ, dtype=torch.float64)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, proj_size=PROJ, reverse=True, backend="cpu", dtype=dtype)
    ours.load_state_dict({k.removesuffix("_reverse"): v for k, v in theirs.state_dict().items()
                          if k.endswith("_reverse")})
    x, h0, c0 = inputs(dtype, ours, packed=True)
    got_out, got = run(ours, x, h0, c0, True)
    x64, h64, c64 = (t.detach().double().requires_grad_() for t in (x, h0, c0))
    packed = pack_padded_sequence(x64, torch.tensor(LENGTHS), enforce_sorted=False)
    out, (h_n, c_n) = theirs(packed, (torch.cat((torch.zeros_like(h64), h64)), torch.cat((torch.zeros_like(c64), c64))))
    want_out = (pad_packed_sequence(out)[0][..., PROJ:], h_n[1:], c_n[1:])
    reverse_params = [p for name, p in theirs.named_parameters() if name.endswith("_reverse")]
    want = torch.autograd.grad(loss_of(want_out), [*reverse_params, x64, h64, c64])
    assert_all_close((*got_out, *got), (*want_out, *want))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_clipped_gradients_follow_allennlp(dtype):
    """cell_clip and proj_clip (large weights, so both bite) against AllenNLP's equations, differentiated."""
    torch.manual_seed(0)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ, cell_clip=0.3,
                           proj_clip=0.2, backend="cpu", dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-1.5, 1.5)
    x, h0, c0 = inputs(dtype, ours, packed=True)
    got_out, got = run(ours, x, h0, c0, True)
    params = {k: v.detach().double().requires_grad_() for k, v in ours.state_dict().items()}
    leaves = [t.detach().double().requires_grad_() for t in (x, h0, c0)]
    want_out = allennlp_reference(ours, leaves[0], LENGTHS, 0.3, 0.2, params, leaves[1], leaves[2])
    want = torch.autograd.grad(loss_of(want_out), [*(params[n] for n, _ in ours.named_parameters()), *leaves])
    assert (got_out[2].abs() == 0.3).any() and (got_out[0].abs() == 0.2).any(), "the clips should bite"
    assert_all_close((*got_out, *got), (*want_out, *want))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_clip_gradients_pass_at_the_bound_and_stop_past_it(dtype):
    """torch.clamp's rule in both clips, on values that land exactly on a bound: saturated gates make every
    quantity exact (sigmoid(40) and tanh(40) round to 1, sigmoid(-40) * tanh(0) = 0, so c_new = c0)."""
    big = 40.0

    def one_step(cell_clip, proj_clip, c0, w_hr_diagonal):
        lstm = ctxkern.nn.LSTM(1, 4, proj_size=3, cell_clip=cell_clip, proj_clip=proj_clip, backend="cpu",
                               dtype=dtype)
        with torch.no_grad():
            for p in lstm.parameters():
                p.zero_()
            lstm.bias_ih_l0.copy_(torch.tensor([-big] * 4 + [big] * 4 + [0.0] * 4 + [big] * 4))  # i, f, g, o
            lstm.weight_hr_l0.copy_(torch.eye(3, 4) * torch.tensor(w_hr_diagonal)[:, None])  # (P, H)
        c0 = torch.tensor([[c0]], dtype=dtype, requires_grad=True)
        out, (_, c_n) = lstm(torch.zeros(1, 1, 1, dtype=dtype), (torch.zeros(1, 1, 3, dtype=dtype), c0))
        (dc0,) = torch.autograd.grad(c_n.sum(), c0, retain_graph=True)
        (dw_hr,) = torch.autograd.grad(out.sum(), lstm.weight_hr_l0)
        return c_n, dc0, out, dw_hr.diagonal()

    # The cell clip: c0 at the bound, past it, at the lower bound, within.
    c_n, dc0, _, _ = one_step(0.5, None, [0.5, 0.75, -0.5, 0.25], [1.0, 1.0, 1.0])
    assert c_n.tolist() == [[[0.5, 0.5, -0.5, 0.25]]]
    assert dc0.tolist() == [[[1.0, 0.0, 1.0, 1.0]]]
    # The projection clip: c = 40 gives h_cell = 1, so out = w_hr's diagonal, at, past and at the lower bound.
    _, _, out, dw_hr = one_step(None, 0.5, [40.0] * 4, [0.5, 0.75, -0.5])
    assert out.tolist() == [[[0.5, 0.5, -0.5]]]
    assert dw_hr.tolist() == [1.0, 0.0, 1.0]


def test_dropout_between_layers_matches_torch_layers_with_the_same_mask():
    """Dropout on the first layer's output: torch.nn.LSTM layers in float64 with the mask ours drew (F.dropout
    draws by shape, so the same seed gives the same mask on ones of that shape)."""
    ours, theirs = make_pair(torch.float32, num_layers=2, bidirectional=True, proj_size=PROJ, dropout=0.4)
    x, h0, c0 = inputs(torch.float32, ours, packed=False)
    torch.manual_seed(7)
    got_out, got = run(ours, x, h0, c0, False)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones(STEPS * BATCH, 2 * PROJ), 0.4, training=True).double().view(STEPS, BATCH, -1)
    layers = [torch.nn.LSTM(INPUT if k == 0 else 2 * PROJ, HIDDEN, bidirectional=True, proj_size=PROJ,
                            dtype=torch.float64) for k in range(2)]
    for k, layer in enumerate(layers):  # layer k of theirs under the names of a one-layer LSTM
        layer.load_state_dict({name.replace(f"_l{k}", "_l0"): p for name, p in theirs.state_dict().items()
                               if f"_l{k}" in name})
    x64, h64, c64 = (t.detach().double().requires_grad_() for t in (x, h0, c0))
    mid, (h_a, c_a) = layers[0](x64, (h64[:2], c64[:2]))
    out, (h_b, c_b) = layers[1](mid * mask, (h64[2:], c64[2:]))
    want_out = (out, torch.cat((h_a, h_b)), torch.cat((c_a, c_b)))
    want = torch.autograd.grad(loss_of(want_out), [*layers[0].parameters(), *layers[1].parameters(), x64, h64, c64])
    assert_all_close((*got_out, *got), (*want_out, *want))


def test_backward_is_deterministic():
    ours, _ = make_pair(torch.float32, num_layers=2, bidirectional=True, proj_size=PROJ)
    x, h0, c0 = inputs(torch.float32, ours, packed=True)
    first = run(ours, x, h0, c0, True)[1]
    second = run(ours, x, h0, c0, True)[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_unused_outputs_and_inputs_without_grad():
    """A loss on h_n alone (out and c_n get no gradient) and an input that needs none."""
    ours, theirs = make_pair(torch.float64, num_layers=2, proj_size=PROJ)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    _, (h_n, _) = ours(x)
    _, (want_h, _) = theirs(x)
    got = torch.autograd.grad(h_n.sum(), list(ours.parameters()))
    want = torch.autograd.grad(want_h.sum(), list(theirs.parameters()))
    assert_all_close(got, want)


# ----------------------------------------------------------------------------- the operators

def _layer_args(dtype=torch.float32, proj=True, clips=(0.5, 0.4)):
    h, p, b = 6, 3 if proj else 6, 3
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (rand(7, 4 * h), [3, 2, 2], rand(b, p), rand(b, h), rand(4 * h, p), rand(p, h) if proj else None,
            rand(4 * h), clips[0], clips[1] if proj else None, True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])])
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "no_proj"])
def test_layer_operators_opcheck(proj, device):
    """The fakes against the kernels, on the CPU and, where there is a GPU, on CUDA (csrc/cuda's cell policy)."""
    fwd, bwd = torch.ops.ctxkern.lstm_layer_fwd_train, torch.ops.ctxkern.lstm_layer_bwd
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _layer_args(proj=proj))
    torch.library.opcheck(fwd, args)
    gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse = args
    out, h_n, c_n, gates, c_prev, h_prev, proj_raw = fwd(*args)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(bwd, (*grads, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh, w_hr, True, cell_clip,
                                proj_clip, reverse))
    torch.library.opcheck(bwd, (*grads, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh, w_hr, False, None,
                                proj_clip, False))


@pytest.mark.parametrize("proj", [True, False], ids=["proj", "no_proj"])
def test_inference_operator_takes_strided_operands(proj):
    """lstm_layer_fwd reads gates_in in place and the bias as given: strided ones (a row stride past 4H, a bias
    with a step) give the results of their contiguous copies, and equal the training operator's outputs."""
    gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse = _layer_args(proj=proj)
    wide = torch.randn(gates_in.shape[0], gates_in.shape[1] + 3)
    wide[:, :gates_in.shape[1]] = gates_in
    stepped = torch.randn(2 * bias.numel())
    stepped[::2] = bias
    strided = (wide[:, :gates_in.shape[1]], stepped[::2])
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    plain = torch.ops.ctxkern.lstm_layer_fwd(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip,
                                             reverse)
    got = torch.ops.ctxkern.lstm_layer_fwd(strided[0], batch_sizes, h0, c0, w_hh, w_hr, strided[1], cell_clip,
                                           proj_clip, reverse)
    train = torch.ops.ctxkern.lstm_layer_fwd_train(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip,
                                                   proj_clip, reverse)[:3]
    for a, b, c in zip(got, plain, train):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_layer_operators_name_the_bad_argument():
    fwd, bwd = torch.ops.ctxkern.lstm_layer_fwd_train, torch.ops.ctxkern.lstm_layer_bwd
    gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip, proj_clip, reverse = _layer_args()
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        fwd(gates_in, [2, 3, 2], h0, c0, w_hh, w_hr, bias, None, None, False)
    with pytest.raises(RuntimeError, match="c0 must have shape"):
        fwd(gates_in, batch_sizes, h0, c0[:, :2], w_hh, w_hr, bias, None, None, False)
    with pytest.raises(RuntimeError, match="gates_in must be float32, float16, bfloat16 or float64"):
        fwd(gates_in.int(), batch_sizes, h0, c0, w_hh, w_hr, bias, None, None, False)
    with pytest.raises(RuntimeError, match="proj_clip clamps the projection"):
        fwd(gates_in, batch_sizes, torch.zeros(3, 6), c0, torch.zeros(24, 6), None, bias, None, 0.5, False)
    with pytest.raises(RuntimeError, match="bias must have gates_in's dtype"):
        fwd(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias.double(), None, None, False)
    out, h_n, c_n, gates, c_prev, h_prev, proj_raw = fwd(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, 0.5, 0.4,
                                                         True)
    dout, dh_n, dc_n = torch.zeros_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n)
    with pytest.raises(RuntimeError, match="dout must have shape"):
        bwd(dout[:3], dh_n, dc_n, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh, w_hr, True, 0.5, 0.4, True)
    with pytest.raises(RuntimeError, match="proj_raw must have shape"):
        bwd(dout, dh_n, dc_n, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh, w_hr, True, 0.5, None, True)
    with pytest.raises(RuntimeError, match="c_prev must have gates's dtype"):
        bwd(dout, dh_n, dc_n, gates, c_prev.double(), h_prev, proj_raw, batch_sizes, w_hh, w_hr, True, 0.5, 0.4, True)
    with pytest.raises(RuntimeError, match="batch_sizes must sum to gates's rows"):
        bwd(dout, dh_n, dc_n, gates, c_prev, h_prev, proj_raw, [3, 2], w_hh, w_hr, True, 0.5, 0.4, True)


@pytest.mark.parametrize("config", [dict(), dict(proj_size=19), dict(num_layers=2, bidirectional=True, proj_size=19)],
                         ids=["1layer", "proj", "bi-proj"])
def test_batch_of_one_matches_float64_torch_lstm(config):
    """A batch of one runs its products as matrix-vector products of its own (csrc/cpu/lstm_layer.cpp's
    one_row_product, both weight layouts: the forward's transposed views, the backward's row-major weights),
    at sizes with whole vectors and a tail (hidden 37, projection 19)."""
    theirs = torch.nn.LSTM(24, 37, dtype=torch.float64, **config)
    ours = ctxkern.nn.LSTM(24, 37, backend="cpu", **config)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 1, 24, generator=g, requires_grad=True)
    with torch.no_grad():
        inferred = ours(x)
    out, (h_n, c_n) = ours(x)
    want, (want_h, want_c) = theirs(x.detach().double().requires_grad_())
    for a, b in zip((inferred[0], *inferred[1], out, h_n, c_n), (want, want_h, want_c) * 2):
        assert_fp32_close(a, b)
    got = torch.autograd.grad(loss_of((out, h_n, c_n)), [*ours.parameters()])
    expected = torch.autograd.grad(loss_of((want, want_h, want_c)), [*theirs.parameters()])
    for a, b in zip(got, expected, strict=True):
        assert_fp32_close(a, b)
