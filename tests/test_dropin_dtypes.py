"""The drop-in modules run every dtype combination their torch counterpart runs, with torch's output and gradient
dtypes, and refuse, naming the argument, what torch refuses; the ops take float64 (served by the reference).

What torch 2.13 does on a CPU: torch.nn.LayerNorm takes input and parameters of one dtype, or float32
parameters with a float16 / bfloat16 input (computed in float32, returned in the input's dtype, the parameters'
gradients in float32); torch.nn.LSTM takes input and parameters of one dtype, float64 included. Which
combinations torch accepts is found by running torch here, not written down, so the tests follow torch.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import ctxkern
from helpers import (BACKEND_DEVICES, KERNEL_DEVICES, assert_close_for_dtype, assert_low_precision_close,
                     require_backend)
from ctxkern import ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ids = lambda d: str(d).removeprefix("torch.")  # noqa: E731


def _assert_close(out, ref64, torch_out):
    """Against the float64 computation: float64 as torch's float64, float32 within a few ulps, fp16 / bf16 within
    twice torch's own error in that dtype."""
    assert out.dtype == torch_out.dtype
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-12, atol=1e-12)
    else:
        assert_close_for_dtype(out, ref64, torch_out)


def _layer_norms(x_dtype, p_dtype, backend, device):
    """(ours on device, torch's and torch's float64 on the CPU, x on the CPU): torch's CPU semantics, the mixed
    precision included, are the ones followed on every device."""
    ours = ctxkern.nn.LayerNorm(40, backend=backend, device=device, dtype=p_dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(40) * 0.5 + 1)
        ours.bias.copy_(torch.randn(40) * 0.5)
    theirs = torch.nn.LayerNorm(40, dtype=p_dtype)
    theirs.load_state_dict(ours.state_dict())
    ref64 = torch.nn.LayerNorm(40, dtype=torch.float64)
    ref64.load_state_dict(ours.state_dict())
    return ours, theirs, ref64, (torch.randn(4, 3, 40) * 2 + 1).to(x_dtype)


def _run(module, x, dy):
    """[y, dx, dweight, dbias] on the CPU."""
    device = module.weight.device
    x = x.detach().to(device).requires_grad_()
    module.zero_grad()
    y = module(x)
    y.backward(dy.to(device=device, dtype=y.dtype))
    return [t.cpu() for t in (y, x.grad, module.weight.grad, module.bias.grad)]


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("p_dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=_ids)
def test_layer_norm_runs_what_torch_runs(x_dtype, p_dtype, backend, device):
    require_backend(backend)
    ours, theirs, ref64, x = _layer_norms(x_dtype, p_dtype, backend, device)
    try:
        theirs(x)
    except RuntimeError:
        with pytest.raises(ValueError, match="weight must have x's dtype"):
            ours(x.to(device))
        return
    dy = torch.randn(x.shape).to(theirs(x).dtype)  # the same cotangent for the float64 run
    got, want, ref = _run(ours, x, dy), _run(theirs, x, dy), _run(ref64, x.double(), dy.double())
    for g, w, r in zip(got, want, ref):
        assert g.dtype == w.dtype
        _assert_close(g, r, w)


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16), ids=_ids)
def test_layer_norm_mixed_precision_with_residual(x_dtype, backend, device):
    """ctxkern's residual (in the input's dtype) with float32 parameters: LayerNorm of the float32 sum."""
    require_backend(backend)
    ours, theirs, ref64, x = _layer_norms(x_dtype, torch.float32, backend, device)
    r = torch.randn(x.shape).to(x_dtype)
    y = ours(x.to(device), r.to(device))
    assert y.dtype == x_dtype
    with torch.no_grad():
        yardstick = theirs(x.float() + r.float()).to(x_dtype)  # torch's mixed precision on the float32 sum
        assert_low_precision_close(y.cpu(), ref64(x.double() + r.double()), yardstick)
    with pytest.raises(ValueError, match="residual must have input's dtype"):
        ours(x.to(device), r.float().to(device))


def test_layer_norm_mixed_precision_still_names_a_backend_that_cannot_run():
    if ctxkern.backends()["cuda"] == "available":
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' unavailable: "):
        ctxkern.nn.LayerNorm(8, backend="cuda")(torch.randn(2, 8).bfloat16())


def _lstms(dtype, device, **kwargs):
    """(ours on device, torch's and torch's float64 on the CPU), as for LayerNorm."""
    # Sizes large enough that the maximum error in fp16 / bf16 is not one element's rounding.
    ours = ctxkern.nn.LSTM(8, 16, num_layers=2, device=device, dtype=dtype, **kwargs)
    theirs = torch.nn.LSTM(8, 16, num_layers=2, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    ref64 = torch.nn.LSTM(8, 16, num_layers=2, dtype=torch.float64, **kwargs)
    ref64.load_state_dict(ours.state_dict())
    return ours, theirs, ref64


def _lstm_outputs(module, x, lengths, grad, dtype):
    """[out, h_n, c_n] and with grad [dx, dweight_hh_l1], on the CPU."""
    x = x.detach().to(module.weight_hh_l0.device).requires_grad_(grad)
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.set_grad_enabled(grad):
        out, (h, c) = module(inp)
        out = out if lengths is None else out.data
        if not grad:
            return [t.cpu() for t in (out, h, c)]
        # One random cotangent per output, representable in the run's dtype, so every run gets the same one.
        g = torch.Generator().manual_seed(0)
        sum((t.double() * torch.randn(t.shape, generator=g).to(dtype).double().to(t.device)).sum()
            for t in (out, h, c)).backward()
    return [t.cpu() for t in (out, h, c, x.grad, module.weight_hh_l1.grad)]


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("grad", (True, False), ids=("grad", "no-grad"))
@pytest.mark.parametrize("packed", (False, True), ids=("padded", "packed"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_lstm_runs_every_dtype_torch_runs(dtype, packed, grad, backend, device):
    """no-grad takes the C++ time loop on the cpu backend (for the kernels' dtypes), grad the Python one."""
    require_backend(backend)
    ours, theirs, ref64 = _lstms(dtype, device, bidirectional=True, proj_size=4)
    ours.backend = backend
    x = torch.randn(6, 5, 8).to(dtype)
    lengths = torch.tensor([6, 2, 3, 6, 1]) if packed else None
    got = _lstm_outputs(ours, x, lengths, grad, dtype)
    want = _lstm_outputs(theirs, x, lengths, grad, dtype)
    ref = _lstm_outputs(ref64, x.double(), lengths, grad, dtype)
    for g, w, r in zip(got, want, ref, strict=True):
        _assert_close(g, r, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_lstm_refuses_what_torch_refuses(dtype):
    ours = ctxkern.nn.LSTM(3, 5, dtype=dtype)
    other = torch.float32 if dtype != torch.float32 else torch.float64
    with pytest.raises(ValueError, match="input must have the parameters' dtype"):
        ours(torch.randn(2, 1, 3, dtype=other))
    with pytest.raises(ValueError):  # torch's own refusal, for comparison
        torch.nn.LSTM(3, 5, dtype=dtype)(torch.randn(2, 1, 3, dtype=other))


# ----------------------------------------------------------------------------- the ops in float64

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ops_take_float64_and_match_torch(backend, device):
    require_backend(backend)
    f64 = dict(device=device, dtype=torch.float64)
    x, w, b = torch.randn(4, 9, **f64), torch.randn(9, **f64), torch.randn(9, **f64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(ops.layer_norm(x, w, b, backend=backend), F.layer_norm(x, (9,), w, b))

    hidden, mask = torch.randn(2, 3, 4, **f64), torch.tensor([[1, 1, 0], [1, 1, 1]], device=device)
    want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    close(ops.masked_mean_pool(hidden, mask, backend=backend), want)
    close(ops.masked_mean_pool(hidden, mask, normalize=True, backend=backend), F.normalize(want, dim=-1))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    close(ops.masked_mean_pool_varlen(hidden.reshape(6, 4)[:5], cu, backend=backend),
          torch.stack([hidden.reshape(6, 4)[:2].mean(0), hidden.reshape(6, 4)[2:5].mean(0)]))

    q, k, v = (torch.randn(2, 3, 2, 32, **f64) for _ in range(3))  # D = 32: a cuda head dim
    keep = torch.tensor([[True, True, False], [True, True, True]], device=device)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=keep[:, None, None, :]).transpose(1, 2)
    close(ops.attention(q, k, v, key_padding_mask=keep, backend=backend), sdpa)
    packed = [t.reshape(6, 2, 32) for t in (q, k, v)]
    cu3 = torch.tensor([0, 3, 6], dtype=torch.int32, device=device)
    sdpa_causal = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True).transpose(1, 2)
    close(ops.attention_varlen(*packed, cu3, cu3, 3, 3, causal=True, backend=backend),
          sdpa_causal.reshape(6, 2, 32))

    gates_x, gates_h, c, bias = torch.randn(3, 8, **f64), torch.randn(3, 8, **f64), torch.randn(3, 2, **f64), None
    h, c_new = ops.lstm_cell(gates_x, gates_h, c, bias, backend=backend)
    i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
    want_c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    close(c_new, want_c)
    close(h, torch.sigmoid(o) * torch.tanh(want_c))
    assert h.dtype == c_new.dtype == torch.float64


def test_nn_all_lists_every_module():
    assert set(ctxkern.nn.__all__) == {"LayerNorm", "LSTM", "MaskedMeanPool"}
    namespace = {}
    exec("from ctxkern.nn import *", namespace)
    assert namespace["MaskedMeanPool"] is ctxkern.nn.MaskedMeanPool

