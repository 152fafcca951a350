"""The models' Linear: torch.nn.Linear + activation, with fp32 CPU inference on oneDNN's matmul."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_fp32_close
from ctxkern.models import _linear
from ctxkern.models._linear import ACTIVATIONS, Linear

REFERENCE = {None: lambda x: x, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
             "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu,
             "swish": F.silu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def float64_reference(layer, x):
    return REFERENCE[layer.activation](F.linear(x.double(), layer.weight.double(), layer.bias.double()))


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(args[3:])
        return real(*args)

    monkeypatch.setattr(_linear.torch.ops.mkldnn, "_linear_pointwise", counting, raising=False)
    return calls


@pytest.mark.skipif(not _linear.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("activation", list(ACTIVATIONS), ids=str)
@pytest.mark.parametrize("shape", [(1, 384), (7, 383), (3, 41, 384)], ids=lambda s: "x".join(map(str, s)))
def test_inference_runs_onednn_and_matches_float64(activation, shape, onednn_calls):
    layer = Linear(shape[-1], 257, activation=activation)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = layer(x)
    assert onednn_calls, "fp32 CPU inference should take oneDNN's matmul"
    assert out.shape == (*shape[:-1], 257)
    assert_fp32_close(out, float64_reference(layer, x))


@pytest.mark.parametrize("activation", ["gelu", None], ids=str)
def test_training_takes_f_linear_with_gradients(activation, onednn_calls):
    layer = Linear(64, 32, activation=activation)
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    assert not onednn_calls, "oneDNN's linear has no autograd formula; a gradient needs F.linear"
    out.sum().backward()
    xd = x.detach().double().requires_grad_()
    ref = REFERENCE[activation](F.linear(xd, layer.weight.double(), layer.bias.double()))
    ref.sum().backward()
    assert_fp32_close(out, ref)
    assert_fp32_close(x.grad, xd.grad)


def test_bf16_and_non_float32_take_f_linear(onednn_calls):
    layer = Linear(16, 8).bfloat16()
    with torch.inference_mode():
        layer(torch.randn(4, 16, dtype=torch.bfloat16))
    assert not onednn_calls


def test_state_dict_is_torch_linear():
    layer = Linear(6, 4, activation="gelu")
    plain = torch.nn.Linear(6, 4)
    plain.load_state_dict(layer.state_dict())
    assert layer.state_dict().keys() == plain.state_dict().keys()


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh_exp'"):
        Linear(4, 4, activation="tanh_exp")


def test_row_buckets_are_few_and_tight():
    """oneDNN keeps a primitive per row count it sees, so the rows are padded to row_bucket(m): few distinct
    counts (32 below 256, 16 per doubling above), at most 1/16 more rows from 256 on."""
    counts = range(1, 16385)
    buckets = {m: _linear.row_bucket(m) for m in counts}
    assert len(set(buckets.values())) <= 32 + 16 * 6
    for m, b in buckets.items():
        assert b >= m and _linear.row_bucket(b) == b
        assert b - m < (8 if m < 256 else m / 16 + 1e-9)


@pytest.mark.skipif(not _linear.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu", None], ids=str)
def test_cached_onednn_parameters_follow_changes_of_the_weights(activation, onednn_calls):
    """oneDNN runs on cached copies of the parameters (the weight in its blocked layout; for QuickGELU,
    1.702-scaled copies): a change of the parameters (in place, or a new tensor) must reach the output."""
    layer = Linear(48, 40, activation=activation)
    x = torch.randn(5, 48)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(-0.5)
        layer.bias.add_(1.0)
    with torch.inference_mode():
        assert_fp32_close(layer(x), float64_reference(layer, x))
    layer.weight = torch.nn.Parameter(torch.randn(40, 48))
    with torch.inference_mode():
        assert_fp32_close(layer(x), float64_reference(layer, x))


@pytest.mark.skipif(not _linear.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_quick_gelu_mlp_with_the_division_in_the_second_weight_matches_float64(onednn_calls):
    from ctxkern.models._transformer import Mlp

    mlp = Mlp(48, 96, "quick_gelu")
    x = torch.randn(7, 48)
    with torch.inference_mode():
        mlp(x)
    with torch.no_grad():
        mlp.fc2.weight.mul_(-2.0)
    with torch.inference_mode():
        out = mlp(x)
    assert len(onednn_calls) == 4
    hidden = float64_reference(mlp.fc1, x)
    assert_fp32_close(out, F.linear(hidden, mlp.fc2.weight.double(), mlp.fc2.bias.double()))


@pytest.mark.skipif(not _linear.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_a_layer_that_ran_can_be_copied_pickled_and_saved():
    """The cached packed weight (an opaque oneDNN tensor) stays out of copies, which pack their own."""
    import copy
    import io
    import pickle

    layer = Linear(48, 40, activation="gelu")
    x = torch.randn(5, 48)
    with torch.inference_mode():
        expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buffer, weights_only=False)):
        with torch.inference_mode():
            assert torch.equal(other(x), expected)
