"""Fixed cost per call of each public op and module, and issue 10's overhead targets, against torch eager.

Each case times ctxkern and its torch counterpart in alternating blocks of calls (~2 ms each) and reports the
fastest block of each: on a shared machine the minimum is the cost without interference. The tiny shapes
measure the fixed cost (checks, backend choice, dispatch, the autograd wrapper); the others are the targets.
    THREADS=2 REPS=40 python benchmarks/overhead.py [substring of the case names]
"""
import os
import sys
import timeit

import torch
import torch.nn.functional as F

from ctxkern import nn, ops

torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def eager_cell(ig, hg, c, bias):
    """ctxkern/bench/lstm_cell.py's eager composition of one LSTM step."""
    gates = ig + hg + bias
    i, f, g, o = gates.chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def backward_of(fn, leaves, grads):
    out = fn(*leaves)
    return lambda: torch.autograd.grad(out, leaves, grads, retain_graph=True)


cases = []


def case(label, ours, theirs):
    cases.append((label, ours, theirs))


x1, w1, b1 = torch.randn(1, 8), torch.randn(8), torch.randn(8)
case("ops.layer_norm (1,8)", lambda: ops.layer_norm(x1, w1, b1), lambda: F.layer_norm(x1, (8,), w1, b1))
m, t = nn.LayerNorm(8), torch.nn.LayerNorm(8)
case("nn.LayerNorm(8) (1,8) grad params", lambda: m(x1), lambda: t(x1))


def nograd(f):
    def g():
        with torch.no_grad():
            return f()
    return g


case("nn.LayerNorm(8) (1,8) no_grad", nograd(lambda: m(x1)), nograd(lambda: t(x1)))
ig, hg, c, bias = torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 2), torch.randn(8)
case("ops.lstm_cell (1,2)", lambda: ops.lstm_cell(ig, hg, c, bias), lambda: eager_cell(ig, hg, c, bias))
q = torch.randn(1, 1, 1, 8); qt = q.transpose(1, 2)
case("ops.attention (1,1,1,8)", lambda: ops.attention(q, q, q),
     lambda: F.scaled_dot_product_attention(qt, qt, qt).transpose(1, 2))
h, mb = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)


def pool(h, m):
    m = m.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


case("ops.masked_mean_pool bool (1,2,8)", lambda: ops.masked_mean_pool(h, mb), lambda: pool(h, mb))
mf = mb.float()
case("ops.masked_mean_pool float (1,2,8)", lambda: ops.masked_mean_pool(h, mf), lambda: pool(h, mf))
hp, cu = torch.randn(2, 8), torch.tensor([0, 2], dtype=torch.int32)
case("ops.masked_mean_pool_varlen (2,8)", lambda: ops.masked_mean_pool_varlen(hp, cu),
     lambda: torch.segment_reduce(hp, "mean", lengths=cu.diff(), axis=0))
qp = torch.randn(2, 1, 8)
case("ops.attention_varlen (2,1,8)", lambda: ops.attention_varlen(qp, qp, qp, cu, cu, 2, 2),
     lambda: F.scaled_dot_product_attention(qt, qt, qt))
# target shapes
x, r, w, b = torch.randn(256, 768), torch.randn(256, 768), torch.randn(768), torch.randn(768)
case("LN fwd 256x768", lambda: ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (768,), w, b))
case("LN fwd+res 256x768", lambda: ops.layer_norm(x, w, b, residual=r), lambda: F.layer_norm(x + r, (768,), w, b))
leaves = [t_.detach().requires_grad_() for t_ in (x, w, b)]
dy = torch.randn(256, 768)
case("LN bwd 256x768", backward_of(lambda x, w, b: ops.layer_norm(x, w, b), leaves, dy),
     backward_of(lambda x, w, b: F.layer_norm(x, (768,), w, b), leaves, dy))
xs, ws, bs = torch.randn(64, 384), torch.randn(384), torch.randn(384)
case("LN fwd 64x384", lambda: ops.layer_norm(xs, ws, bs), lambda: F.layer_norm(xs, (384,), ws, bs))
IG, HG, C, BIAS = torch.randn(16, 2048), torch.randn(16, 2048), torch.randn(16, 512), torch.randn(2048)
case("lstm fwd 16x512", lambda: ops.lstm_cell(IG, HG, C, BIAS), lambda: eager_cell(IG, HG, C, BIAS))
lv = [t_.detach().requires_grad_() for t_ in (IG, HG, C, BIAS)]
g2 = (torch.randn(16, 512), torch.randn(16, 512))
case("lstm bwd 16x512", backward_of(lambda *a: ops.lstm_cell(*a), lv, g2), backward_of(eager_cell, lv, g2))
Q, K, V = (torch.randn(1, 16, 12, 64) for _ in range(3))
Qt, Kt, Vt = (t_.transpose(1, 2) for t_ in (Q, K, V))
case("attention 1x16x12x64", lambda: ops.attention(Q, K, V),
     lambda: F.scaled_dot_product_attention(Qt, Kt, Vt).transpose(1, 2))


sel = sys.argv[1] if len(sys.argv) > 1 else ""
reps = int(os.environ.get("REPS", "40"))
for label, ours, theirs in cases:
    if sel not in label:
        continue
    ours(); theirs()
    n = max(5, int(2e-3 / max(1e-7, timeit.timeit(ours, number=3) / 3)))
    to, tt = [], []
    for _ in range(reps):  # interleaved blocks
        to.append(timeit.timeit(ours, number=n) / n)
        tt.append(timeit.timeit(theirs, number=n) / n)
    o, t_ = min(to) * 1e6, min(tt) * 1e6
    print(f"{label:36s} ctxkern {o:8.1f} us  torch {t_:8.1f} us  ratio {t_ / o:5.2f}x", flush=True)
