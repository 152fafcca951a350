"""ctxkern.nn.LSTM's training path on CUDA: the layer operators' CUDA kernels (csrc/cuda/bindings.cpp's cell
policy on csrc/lstm_layer_loop.h) against torch.nn.LSTM in float64 on the CPU and AllenNLP's clipped equations
(their opcheck on CUDA is in tests/test_lstm_train.py). Skipped without a GPU (tests/test_lstm_train.py covers the CPU)."""
import pytest
import torch

import ctxkern
from allennlp_lstm import allennlp_reference
from helpers import assert_fp32_close, cuda_only, require_backend
from test_lstm_train import CONFIGS, LENGTHS, PROJ, _layer_args, inputs, loss_of, make_pair, run

pytestmark = [pytest.mark.cuda, cuda_only]


@pytest.fixture(autouse=True)
def _cuda_backend():
    require_backend("cuda")


def on_cuda(module):
    """A float32 copy of module on the GPU, on the cuda backend."""
    copy = ctxkern.nn.LSTM(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                           module.dropout, module.bidirectional, module.proj_size, device="cuda", backend="cuda",
                           cell_clip=module.cell_clip, proj_clip=module.proj_clip)
    copy.load_state_dict(module.state_dict())
    return copy


def uses_cuda_layer_operators(module, *args) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(module, *args)
    return {"ctxkern::lstm_layer_fwd_train", "ctxkern::lstm_layer_bwd"} <= {e.name for e in prof.events()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", ["proj", "bi-2layers", "no-bias"])
def test_float32_gradients_match_float64_torch_lstm(name, packed):
    config = dict(CONFIGS[name], batch_first=False)
    ours_cpu, theirs = make_pair(torch.float64, **config)
    ours = on_cuda(ours_cpu)
    x, h0, c0 = (t.detach().float().cuda().requires_grad_() for t in inputs(torch.float64, ours_cpu, packed))
    assert uses_cuda_layer_operators(ours, x, h0, c0, packed)
    got_out, got = run(ours, x, h0, c0, packed)
    want_out, want = run(theirs, *(t.detach().double().cpu().requires_grad_() for t in (x, h0, c0)), packed)
    for a, b in zip((*got_out, *got), (*want_out, *want), strict=True):
        assert_fp32_close(a.cpu(), b)


def test_clipped_gradients_follow_allennlp():
    torch.manual_seed(0)
    ref = ctxkern.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=PROJ, cell_clip=0.3, proj_clip=0.2,
                          dtype=torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-1.5, 1.5)
    ours = on_cuda(ref)
    x64, h64, c64 = inputs(torch.float64, ref, packed=True)
    x, h0, c0 = (t.detach().float().cuda().requires_grad_() for t in (x64, h64, c64))
    got_out, got = run(ours, x, h0, c0, True)
    params = {k: v.detach().double().requires_grad_() for k, v in ref.state_dict().items()}
    leaves = [t.detach().requires_grad_() for t in (x64, h64, c64)]
    want_out = allennlp_reference(ref, leaves[0], LENGTHS, 0.3, 0.2, params, leaves[1], leaves[2])
    want = torch.autograd.grad(loss_of(want_out), [*(params[n] for n, _ in ref.named_parameters()), *leaves])
    assert (got_out[2].abs() == 0.3).any() and (got_out[0].abs() == 0.2).any(), "the clips should bite"
    for a, b in zip((*got_out, *got), (*want_out, *want), strict=True):
        assert_fp32_close(a.cpu(), b)


def test_backward_is_deterministic():
    ours = on_cuda(make_pair(torch.float32, num_layers=2, bidirectional=True, proj_size=PROJ)[0])
    x, h0, c0 = (t.detach().cuda().requires_grad_() for t in inputs(torch.float32, ours, packed=True))
    first, second = run(ours, x, h0, c0, True)[1], run(ours, x, h0, c0, True)[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_float64_is_refused_by_name():
    args = tuple(a.cuda().double() if isinstance(a, torch.Tensor) else a for a in _layer_args())
    with pytest.raises(RuntimeError, match="gates_in must be float32, float16 or bfloat16 on CUDA"):
        torch.ops.ctxkern.lstm_layer_fwd_train(*args)
