"""Every op in every autograd mode the kernels do not implement themselves: double backward (create_graph=True),
forward-mode AD, torch.func's transforms. Each is computed (through the reference, ctxkern/ops/_autograd_modes.py)
and checked against the float64 reference: before, double backward gave zeros and jvp a wrong tangent silently.

The inputs are float32 so that the forward runs the kernel operator (float64 would run the reference throughout);
the oracle is the same computation with backend="torch" in float64.
"""
import pytest
import torch
from torch.autograd import forward_ad

import ctxkern
from helpers import BACKEND_DEVICES, KERNEL_DEVICES, assert_fp32_close, require_backend
from ctxkern import ops

HEAD_DIM = 32  # the smallest head dim the cuda backend's kernels are built for


def _seq_mask(device):
    # The second row's last token is padding; the third row is all padding (a row with no token / no key).
    return torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool, device=device)


def _cu(device):
    return torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=device)


def _qkv(device, q_lead, kv_lead):
    """q (*q_lead, H, D), k and v (*kv_lead, H, D) with one head."""
    q = torch.randn(*q_lead, 1, HEAD_DIM, device=device)
    return [q, *(torch.randn(*kv_lead, 1, HEAD_DIM, device=device) for _ in range(2))]


# name -> (inputs(device) with the differentiable tensors first, number of them, f(backend, *inputs) -> tensor)
CASES = {
    "layer_norm": (lambda d: [torch.randn(3, 5, device=d) + 1, torch.randn(3, 5, device=d),
                              torch.randn(5, device=d) + 1, torch.randn(5, device=d)], 4,
                   lambda be, x, r, w, b: ops.layer_norm(x, w, b, 1e-5, residual=r, backend=be)),
    "masked_mean_pool": (lambda d: [torch.randn(3, 3, 4, device=d), _seq_mask(d)], 1,
                         lambda be, h, m: ops.masked_mean_pool(h, m, backend=be)),
    "masked_mean_pool-normalize": (lambda d: [torch.randn(3, 3, 4, device=d), _seq_mask(d)], 1,
                                   lambda be, h, m: ops.masked_mean_pool(h, m, normalize=True, backend=be)),
    "masked_mean_pool_varlen": (lambda d: [torch.randn(5, 4, device=d), _cu(d)], 1,
                                lambda be, h, cu: ops.masked_mean_pool_varlen(h, cu, backend=be)),
    "masked_mean_pool_varlen-normalize": (
        lambda d: [torch.randn(5, 4, device=d), _cu(d)], 1,
        lambda be, h, cu: ops.masked_mean_pool_varlen(h, cu, normalize=True, backend=be)),
    "attention": (lambda d: [*_qkv(d, (3, 2), (3, 3)), _seq_mask(d)], 3,
                  lambda be, q, k, v, m: ops.attention(q, k, v, key_padding_mask=m, backend=be)),
    "attention-causal": (lambda d: _qkv(d, (1, 3), (1, 3)), 3,
                         lambda be, q, k, v: ops.attention(q, k, v, causal=True, backend=be)),
    "attention_varlen": (lambda d: [*_qkv(d, (5,), (5,)), _cu(d)], 3,
                         lambda be, q, k, v, cu: ops.attention_varlen(q, k, v, cu, cu, 3, 3, causal=True,
                                                                      backend=be)),
    "lstm_cell": (lambda d: [torch.randn(2, 8, device=d), torch.randn(2, 8, device=d), torch.randn(2, 2, device=d),
                             torch.randn(8, device=d)], 4,
                  lambda be, ig, hg, c, b: torch.cat(ops.lstm_cell(ig, hg, c, b, backend=be), dim=-1)),
    "lstm_cell-clip": (lambda d: [torch.randn(2, 8, device=d), torch.randn(2, 8, device=d),
                                  2 * torch.randn(2, 2, device=d), torch.randn(8, device=d)], 4,
                       lambda be, ig, hg, c, b: torch.cat(ops.lstm_cell(ig, hg, c, b, cell_clip=0.5, backend=be),
                                                          dim=-1)),
}


def _setup(name, backend, device):
    require_backend(backend)
    make, n_diff, f = CASES[name]
    inputs = make(device)
    return inputs, n_diff, f


def _f64(inputs):
    return [t.double() if t.is_floating_point() else t for t in inputs]


def _assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert_fp32_close(g, w)


def _gradient_penalty(f, backend, inputs, n_diff, cot):
    """The gradient penalty sum_i ||d<f, cot>/d input_i||^2 and its gradient, the double backward users write."""
    leaves = [t.detach().requires_grad_() for t in inputs[:n_diff]]
    out = f(backend, *leaves, *inputs[n_diff:])
    grads = torch.autograd.grad((out * cot).sum(), leaves, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    if not penalty.requires_grad:
        # A linear op: the gradient does not depend on the inputs.
        return [penalty, *(torch.zeros_like(t) for t in leaves)]
    # (materialized: the gradient in a bias does not depend on it, so neither does the penalty)
    return [penalty, *torch.autograd.grad(penalty, leaves, materialize_grads=True)]


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_double_backward_matches_float64_reference(name, backend, device):
    inputs, n_diff, f = _setup(name, backend, device)
    cot = torch.randn(f("torch", *inputs).shape, device=device)
    got = _gradient_penalty(f, backend, inputs, n_diff, cot)
    want = _gradient_penalty(f, "torch", _f64(inputs), n_diff, cot.double())
    assert want[0] > 0
    _assert_all_close(got, want)


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_double_backward_in_the_output_gradient(name, backend, device):
    """The first backward is linear in the output gradient: its derivative in it must flow too (gradgradcheck
    differentiates in both)."""
    inputs, n_diff, f = _setup(name, backend, device)

    def run(be, inputs, cot):
        cot = cot.detach().requires_grad_()
        leaves = [t.detach().requires_grad_() for t in inputs[:n_diff]]
        grads = torch.autograd.grad(f(be, *leaves, *inputs[n_diff:]), leaves, cot, create_graph=True)
        return torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), cot)

    cot = torch.randn(f("torch", *inputs).shape, device=device)
    _assert_all_close(run(backend, inputs, cot), run("torch", _f64(inputs), cot.double()))


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_func_jvp_matches_float64_reference(name, backend, device):
    inputs, n_diff, f = _setup(name, backend, device)
    tangents = [torch.randn_like(t) for t in inputs[:n_diff]]

    def jvp(be, inputs, tangents):
        return torch.func.jvp(lambda *xs: f(be, *xs, *inputs[n_diff:]), tuple(inputs[:n_diff]), tuple(tangents))

    _assert_all_close(jvp(backend, inputs, tangents), jvp("torch", _f64(inputs), _f64(tangents)))


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_forward_ad_dual_tensors_match_float64_reference(name, backend, device):
    inputs, n_diff, f = _setup(name, backend, device)
    tangents = [torch.randn_like(t) for t in inputs[:n_diff]]

    def jvp(be, inputs, tangents):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(inputs, tangents)]
            primal, tangent = forward_ad.unpack_dual(f(be, *duals, *inputs[n_diff:]))
            return primal, tangent

    _assert_all_close(jvp(backend, inputs, tangents), jvp("torch", _f64(inputs), _f64(tangents)))


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_func_jacrev_and_hessian_match_float64_reference(name, backend, device):
    inputs, n_diff, f = _setup(name, backend, device)
    cot = torch.randn(f("torch", *inputs).shape, device=device)
    argnums = tuple(range(n_diff))

    def transforms(be, inputs, cot):
        fn = lambda *xs: f(be, *xs, *inputs[n_diff:])  # noqa: E731
        scalar = lambda *xs: (fn(*xs) * cot).sum()  # noqa: E731
        jac = torch.func.jacrev(fn, argnums=argnums)(*inputs[:n_diff])
        hess = torch.func.hessian(scalar)(*inputs[:n_diff])  # in the first input
        grads = torch.func.grad(scalar, argnums=argnums)(*inputs[:n_diff])
        return [*jac, hess, *grads]

    _assert_all_close(transforms(backend, inputs, cot), transforms("torch", _f64(inputs), cot.double()))


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_vmap_matches_a_loop(name, backend, device):
    inputs, n_diff, f = _setup(name, backend, device)
    batch = [torch.stack([t, 2 * t]) for t in inputs[:n_diff]]
    got = torch.func.vmap(lambda *xs: f(backend, *xs, *inputs[n_diff:]))(*batch)
    want = torch.stack([f("torch", *_f64([b[i] for b in batch]), *inputs[n_diff:]) for i in range(2)])
    _assert_all_close([got], [want])


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck_in_float64(name):
    """float64 runs the reference whatever the backend (no kernel computes it), so one backend checks it."""
    inputs, n_diff, f = _setup(name, "cpu", "cpu")
    leaves = [t.double().requires_grad_() for t in inputs[:n_diff]]
    rest = inputs[n_diff:]
    fn = lambda *xs: f("cpu", *xs, *rest)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, leaves, check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_nn_layer_norm_gradient_penalty_matches_torch(backend, device):
    """The finding: a gradient penalty through nn.LayerNorm gave 0 where torch.nn.LayerNorm gives the value."""
    require_backend(backend)
    ours = ctxkern.nn.LayerNorm(16, backend=backend).to(device)
    theirs = torch.nn.LayerNorm(16, device=device, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 16, device=device) * 3 + 1

    def penalty(module, x):
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(module(x).pow(3).sum(), x, create_graph=True)
        p = g.square().sum()
        return [p, *torch.autograd.grad(p, [x, *module.parameters()], materialize_grads=True)]

    _assert_all_close(penalty(ours, x), penalty(theirs, x.double()))


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_nn_lstm_in_every_autograd_mode_matches_torch(backend, device):
    """nn.LSTM through the cell: gradient penalty, jvp and jacrev against torch.nn.LSTM in float64 (on the CPU:
    cuDNN's LSTM has no double backward)."""
    require_backend(backend)
    ours = ctxkern.nn.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend).to(device)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x, tangent = torch.randn(3, 2, 3), torch.randn(3, 2, 3)

    def modes(module, x, tangent):
        leaf = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(module(leaf)[0].pow(2).sum(), leaf, create_graph=True)
        penalty = g.square().sum()
        params = dict(module.named_parameters())
        (dw,) = torch.autograd.grad(penalty, module.weight_hh_l0)
        fn = lambda x: torch.func.functional_call(module, params, (x,))[0]  # noqa: E731
        _, jvp = torch.func.jvp(fn, (x,), (tangent,))
        return [t.cpu() for t in (penalty, dw, jvp, torch.func.jacrev(fn)(x))]

    _assert_all_close(modes(ours, x.to(device), tangent.to(device)), modes(theirs, x.double(), tangent.double()))
