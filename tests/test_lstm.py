"""ctxkern.nn.LSTM against torch.nn.LSTM with the same weights (computed in float64), and its clipping against
AllenNLP's equations written out below as a plain float64 loop."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import ctxkern
from helpers import assert_fp32_close, require_backend

INPUT, HIDDEN, PROJ, STEPS, BATCH = 5, 7, 3, 6, 4
LENGTHS = [5, 2, 6, 1]  # unequal and unsorted: packing sorts them, and h_n must come back in this order


def make_pair(backend="auto", **kwargs):
    """(ours, torch's in float64) with the same random weights, loaded through torch's state_dict."""
    theirs = torch.nn.LSTM(INPUT, HIDDEN, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-0.6, 0.6)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, backend=backend, **kwargs)
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
    h0 = torch.randn(layers, BATCH, config["proj_size"] or HIDDEN, requires_grad=True)
    c0 = torch.randn(layers, BATCH, HIDDEN, requires_grad=True)
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
    h0, c0 = torch.randn(layers, BATCH, config["proj_size"] or HIDDEN), torch.randn(layers, BATCH, HIDDEN)
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
    theirs = torch.nn.LSTM(INPUT, HIDDEN, num_layers=2, bias=False, bidirectional=True, proj_size=PROJ)
    torch.manual_seed(3)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, num_layers=2, bias=False, bidirectional=True, proj_size=PROJ)
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
    assert out.shape == (STEPS, 2 * HIDDEN) and h_n.shape == (4, HIDDEN)
    assert_all_close((out, h_n, c_n), (ref_out, ref_h, ref_c))
    out, (h_n, _) = ours(torch.randn(STEPS, 0, INPUT))
    assert out.shape == (STEPS, 0, 2 * HIDDEN) and h_n.shape == (4, 0, HIDDEN)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, num_layers=2, dropout=1.0)
    top = ctxkern.nn.LSTM(HIDDEN, HIDDEN)  # the second layer alone, fed what dropout 1.0 leaves: zeros
    top.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ours.state_dict().items() if "_l1" in k})
    x = torch.randn(STEPS, BATCH, INPUT)
    out_train, _ = ours.train()(x)
    assert_fp32_close(out_train, top(torch.zeros(STEPS, BATCH, HIDDEN))[0].double())
    out_eval, _ = ours.eval()(x)
    assert not torch.allclose(out_eval, out_train)


# ----------------------------------------------------------------------------- clipping (AllenNLP's equations)

def allennlp_reference(lstm, x, lengths, cell_clip, proj_clip):
    """A plain float64 loop, one sequence at a time: per layer and direction, the memory cell is clamped to
    +-cell_clip before its tanh and the projected state to +-proj_clip (AllenNLP's LSTM with projection,
    with torch's gate order and parameter names). x: (T, B, I) padded. -> outputs (T, B, D * P), h_n, c_n."""
    params = {k: v.detach().double() for k, v in lstm.state_dict().items()}
    ndir = 2 if lstm.bidirectional else 1
    outputs = torch.zeros(x.shape[0], x.shape[1], ndir * lstm.proj_size, dtype=torch.float64)
    h_n = torch.zeros(lstm.num_layers * ndir, x.shape[1], lstm.proj_size, dtype=torch.float64)
    c_n = torch.zeros(lstm.num_layers * ndir, x.shape[1], lstm.hidden_size, dtype=torch.float64)
    for b, length in enumerate(lengths):
        layer_input = x[:length, b].double()
        for layer in range(lstm.num_layers):
            per_direction = []
            for d in range(ndir):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh, w_hr = params["weight_ih" + sfx], params["weight_hh" + sfx], params["weight_hr" + sfx]
                bias = params["bias_ih" + sfx] + params["bias_hh" + sfx]
                h = torch.zeros(lstm.proj_size, dtype=torch.float64)
                c = torch.zeros(lstm.hidden_size, dtype=torch.float64)
                out = [None] * length
                for t in (reversed(range(length)) if d else range(length)):
                    i, f, g, o = (w_ih @ layer_input[t] + w_hh @ h + bias).chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    c = c.clamp(-cell_clip, cell_clip)
                    h = (w_hr @ (torch.sigmoid(o) * torch.tanh(c))).clamp(-proj_clip, proj_clip)
                    out[t] = h
                h_n[layer * ndir + d, b], c_n[layer * ndir + d, b] = h, c
                per_direction.append(torch.stack(out))
            layer_input = torch.cat(per_direction, dim=1)
        outputs[:length, b] = layer_input
    return outputs, h_n, c_n


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_cell_and_projection_clipping_follow_allennlp(backend, grad):
    require_backend(backend)
    torch.manual_seed(0)
    lstm = ctxkern.nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ, cell_clip=0.3,
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
    lstm = ctxkern.nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=PROJ)
    with pytest.raises(ValueError, match="input must have input_size = 5 features"):
        lstm(torch.randn(STEPS, BATCH, INPUT + 1))
    with pytest.raises(ValueError, match="input must be a 3-D"):
        lstm(torch.randn(2, STEPS, BATCH, INPUT))
    with pytest.raises(ValueError, match="input must have the parameters' dtype"):
        lstm(torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4, 3\)"):
        lstm(torch.randn(STEPS, BATCH, INPUT), (torch.randn(2, BATCH, HIDDEN), torch.randn(2, BATCH, HIDDEN)))
    with pytest.raises(ValueError, match=r"c0 must have shape \(2, 4, 7\)"):
        lstm(torch.randn(STEPS, BATCH, INPUT), (torch.randn(2, BATCH, PROJ), torch.randn(1, BATCH, HIDDEN)))
    with pytest.raises(ValueError, match="cell_clip must be"):
        ctxkern.nn.LSTM(INPUT, HIDDEN, cell_clip=-1.0)
    with pytest.raises(ValueError, match="proj_clip must be"):
        ctxkern.nn.LSTM(INPUT, HIDDEN, proj_size=2, proj_clip=-0.5)
    with pytest.raises(ValueError, match="proj_clip clamps the projected output"):
        ctxkern.nn.LSTM(INPUT, HIDDEN, proj_clip=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ctxkern.nn.LSTM(INPUT, HIDDEN, backend="gpu")


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

