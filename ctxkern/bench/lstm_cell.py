"""LSTM benchmark cases: the fused cell ("lstm_cell") and the whole layer stack ("lstm").

lstm_cell: one step at ELMo's (B=64, H=4096) and a small (16, 512), forward and backward, against the eager
composition users write (`g = ig + hg + b; i, f, g, o = g.chunk(4, 1); ...`) and torch.compile of it.
lstm: ctxkern.nn.LSTM against torch.nn.LSTM ("torch eager": what a PyTorch user runs, its time loop in C++,
cuDNN on a GPU), a Python loop over the eager cell, and the same loop over a torch.compile'd cell, at ELMo's
biLSTM (T=50, B=64, input 512, hidden 4096, proj 512; shorter on a CPU, where one such run takes seconds) and
at the CPU target configuration (2 layers, bidirectional, hidden 512, proj 128, T=40, B=16), and at three
shapes without a projection (NO_PROJ_SHAPES), where torch runs oneDNN's fused LSTM on a CPU, in inference
(no_grad) and training (forward + backward).
"""
from __future__ import annotations

import torch

from ctxkern import nn, ops
from ctxkern.bench.case import Candidate, Case, backward_only
from ctxkern.bench.peers import compiled, ctxkern_backends
from ctxkern.reference import lstm_cell_ref


def eager_cell(ig, hg, c, bias):
    """The eager composition of one LSTM step (the baseline the fused cell replaces)."""
    gates = ig + hg + bias
    i, f, g, o = gates.chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


# ----------------------------------------------------------------------------------------------- the cell

def _cell_forward_case(ig, hg, c, bias, with_compile: bool) -> Case:
    (b, width), dtype = ig.shape, ig.dtype
    h = width // 4
    case = Case(op="lstm_cell_fwd", shape=f"{b}x{h}", dtype=dtype,
                # reads input_gates, hidden_gates (4H each), c (H) per row and bias once; writes h and c_new
                bytes_moved=ig.element_size() * (b * (4 * h + 4 * h + h + 2 * h) + 4 * h), flops=None,
                reference=lambda: lstm_cell_ref(ig.double(), hg.double(), c.double(), bias.double()),
                candidates=[Candidate("torch eager", lambda: eager_cell(ig, hg, c, bias), baseline=True)])
    if with_compile:
        fn = compiled(eager_cell)
        case.candidates.append(Candidate("torch.compile", lambda: fn(ig, hg, c, bias), baseline=True))
    for name in ctxkern_backends(ig.device.type):
        case.candidates.append(Candidate(f"ctxkern.{name}",
                                         lambda name=name: ops.lstm_cell(ig, hg, c, bias, backend=name), False))
    return case


def _cell_backward_case(ig, hg, c, bias, with_compile: bool) -> Case:
    (b, width), dtype = ig.shape, ig.dtype
    h = width // 4
    dh, dc = torch.randn_like(c), torch.randn_like(c)
    leaves = [t.detach().requires_grad_() for t in (ig, hg, c, bias)]

    def grads_of(forward):
        return backward_only(forward, leaves, (dh, dc))

    def reference():
        refs = [t.detach().double().requires_grad_() for t in (ig, hg, c, bias)]
        return torch.autograd.grad(lstm_cell_ref(*refs), refs, (dh.double(), dc.double()))

    case = Case(op="lstm_cell_bwd", shape=f"{b}x{h}", dtype=dtype,
                # reads ig, hg, c, dh, dc_new; writes dgates (for both gate inputs: one tensor), dc, dbias
                bytes_moved=ig.element_size() * (b * (4 * h * 2 + 3 * h + 4 * h + h) + 2 * 4 * h), flops=None,
                reference=reference, candidates=[Candidate("torch eager", grads_of(eager_cell), baseline=True)])
    if with_compile:
        case.candidates.append(Candidate("torch.compile", grads_of(compiled(eager_cell)), baseline=True))
    for name in ctxkern_backends(ig.device.type):
        case.candidates.append(Candidate(
            f"ctxkern.{name}", grads_of(lambda *a, name=name: ops.lstm_cell(*a, backend=name)), False))
    return case


def cell_cases(device: str, quick: bool, with_compile: bool) -> list[Case]:
    shapes = [(16, 512)] if quick else [(64, 4096), (16, 512)]
    dtypes = [torch.float32] if device == "cpu" or quick else [torch.float32, torch.bfloat16]
    out = []
    for (b, h), dtype in ((s, d) for s in shapes for d in dtypes):
        ig, hg = torch.randn(b, 4 * h, device=device, dtype=dtype), torch.randn(b, 4 * h, device=device, dtype=dtype)
        c, bias = torch.randn(b, h, device=device, dtype=dtype), torch.randn(4 * h, device=device, dtype=dtype)
        out += [_cell_forward_case(ig, hg, c, bias, with_compile), _cell_backward_case(ig, hg, c, bias, with_compile)]
    return out


# ----------------------------------------------------------------------------------------------- the layer

def cell_loop_lstm(torch_lstm: torch.nn.LSTM, cell):
    """torch_lstm's computation as a Python loop over `cell` (padded input, batch-major states, no packing):
    the input projection up front, then per step h W_hh^T, the cell and the projection."""
    ndir = 2 if torch_lstm.bidirectional else 1

    def run(x):  # (T, B, I) -> (T, B, D * P)
        for layer in range(torch_lstm.num_layers):
            outs = []
            for d in range(ndir):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(torch_lstm, "weight_ih" + sfx), getattr(torch_lstm, "weight_hh" + sfx)
                w_hr = getattr(torch_lstm, "weight_hr" + sfx, None)
                bias = getattr(torch_lstm, "bias_ih" + sfx) + getattr(torch_lstm, "bias_hh" + sfx)
                gates_in = torch.matmul(x, w_ih.t())  # (T, B, 4H)
                h = x.new_zeros(x.shape[1], w_hh.shape[1])
                c = x.new_zeros(x.shape[1], torch_lstm.hidden_size)
                steps = [None] * x.shape[0]
                for t in (reversed(range(x.shape[0])) if d else range(x.shape[0])):
                    h_cell, c = cell(gates_in[t], torch.mm(h, w_hh.t()), c, bias)
                    h = h_cell if w_hr is None else torch.mm(h_cell, w_hr.t())
                    steps[t] = h
                outs.append(torch.stack(steps))
            x = torch.cat(outs, dim=-1)
        return x

    return run


def _layer_case(config: dict, steps: int, batch: int, device: str, with_compile: bool, train: bool) -> Case:
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(**config, device=device)
    ours = nn.LSTM(**config, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(steps, batch, config["input_size"], device=device)
    reference_lstm = torch.nn.LSTM(**config, device=device).double()
    reference_lstm.load_state_dict(theirs.state_dict())

    def forward_only(model):
        def run():
            with torch.no_grad():
                out = model(x)
            return out[0] if isinstance(out, tuple) else out
        return run

    ndir = 2 if config.get("bidirectional") else 1
    dy = torch.randn(steps, batch, ndir * (config.get("proj_size") or config["hidden_size"]), device=device)

    def forward_backward(model, params):
        x_leaf = x.clone().requires_grad_()

        def run():
            out = model(x_leaf)
            out = out[0] if isinstance(out, tuple) else out
            return out.detach(), torch.autograd.grad(out, (x_leaf, *params), dy)[0]
        return run

    loops = {"eager LSTMCell loop": cell_loop_lstm(theirs, eager_cell)}
    if with_compile:
        loops["torch.compile cell loop"] = cell_loop_lstm(theirs, compiled(eager_cell))
    if train:
        runs = {"torch eager": forward_backward(theirs, list(theirs.parameters()))}
        runs.update({name: forward_backward(loop, list(theirs.parameters())) for name, loop in loops.items()})
        runs["ctxkern"] = forward_backward(ours, list(ours.parameters()))

        def reference():
            xd = x.double().requires_grad_()
            out = reference_lstm(xd)[0]
            return out.detach(), torch.autograd.grad(out, xd, dy.double())[0]
    else:
        runs = {"torch eager": forward_only(theirs)}
        runs.update({name: forward_only(loop) for name, loop in loops.items()})
        runs["ctxkern"] = forward_only(ours)

        def reference():
            with torch.no_grad():
                return (reference_lstm(x.double())[0],)

    h, p, i = config["hidden_size"], config.get("proj_size") or config["hidden_size"], config["input_size"]
    layers = config["num_layers"]
    # Matmul flops of the forward, per layer and direction: the input projection, the recurrent product and
    # the projection (a backward costs about twice the forward).
    flops = 0
    for layer in range(layers):
        layer_in = i if layer == 0 else ndir * p
        flops += ndir * (2 * steps * batch * 4 * h * (layer_in + p) + (2 * steps * batch * h * p if p != h else 0))
    name = ctxkern_backends(device)[0] if ctxkern_backends(device) else "torch"
    candidates = [Candidate(label, run, baseline=label != "ctxkern") for label, run in runs.items()]
    candidates[-1].backend = f"ctxkern.{name}"
    shape = f"T{steps}xB{batch}xI{i}xH{h}" + (f"xP{p}" if p != h else "") + f"xL{layers}" + ("xbi" if ndir == 2 else "")
    return Case(op="lstm_train" if train else "lstm", shape=shape,
                dtype=torch.float32, bytes_moved=4 * (x.numel() + sum(t.numel() for t in theirs.parameters())),
                flops=(3 if train else 1) * flops, reference=reference, candidates=candidates)


def layer_cases(device: str, quick: bool, with_compile: bool) -> list[Case]:
    elmo = dict(input_size=512, hidden_size=4096, proj_size=512, num_layers=1, bidirectional=True)
    target = dict(input_size=256, hidden_size=512, proj_size=128, num_layers=2, bidirectional=True)
    small = dict(input_size=64, hidden_size=128, proj_size=32, num_layers=2, bidirectional=True)
    if quick:
        return [_layer_case(small, 10, 4, device, with_compile, train=False)]
    # On a CPU one ELMo-shaped step of 64 sequences is ~0.1 s: 8 steps of 8 keep the whole run within minutes.
    elmo_steps, elmo_batch = (50, 64) if device == "cuda" else (8, 8)
    cases = [_layer_case(elmo, elmo_steps, elmo_batch, device, with_compile, train=False),
             _layer_case(target, 40, 16, device, with_compile, train=False),
             _layer_case(target, 40, 16, device, with_compile, train=True)]
    # Without a projection, where torch.nn.LSTM runs oneDNN's fused LSTM on a CPU: (config, T, B).
    for config, steps, batch in NO_PROJ_SHAPES:
        cases += [_layer_case(config, steps, batch, device, with_compile, train=train) for train in (False, True)]
    return cases


NO_PROJ_SHAPES = [
    (dict(input_size=128, hidden_size=512, num_layers=1, bidirectional=False), 100, 16),
    (dict(input_size=300, hidden_size=256, num_layers=2, bidirectional=True), 50, 32),
    (dict(input_size=64, hidden_size=128, num_layers=1, bidirectional=False), 20, 1),
]
