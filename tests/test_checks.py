"""The boundary checks shared by every op (ctxkern/ops/_checks.py, csrc/checks.h) and the eager fast path
(ctxkern/ops/_register.py): one wording per concept, masks, max_seqlen, meta tensors, torch modes."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import require_backend
from ctxkern import ops
from ctxkern.ops.attention import CUDA_HEAD_DIMS, MAX_HEAD_DIM, supports_head_dim
from ctxkern.ops.layer_norm import _FWD as LAYER_NORM_KERNELS
from ctxkern.ops.lstm_cell import _FWD as LSTM_CELL_KERNELS
from ctxkern.reference import attention_ref, layer_norm_ref, masked_mean_pool_ref


# ----------------------------------------------------------------------------- cu_seqlens: one wording

BAD_CU_SEQLENS = [([1, 4, 6], "must start at 0, got 1"),
                  ([0, 4, 3, 6], "must be non-decreasing, got {name}[1] = 4 > {name}[2] = 3"),
                  ([0, 2, 5], "must end at {total}, got 5")]


@pytest.mark.parametrize("cu,message", BAD_CU_SEQLENS)
def test_pool_cu_seqlens_message_is_the_same_in_python_and_cpp(cu, message):
    require_backend("cpu")
    hidden, cu_t = torch.randn(6, 8), torch.tensor(cu, dtype=torch.int32)
    expected = "cu_seqlens " + message.format(name="cu_seqlens", total="hidden's length 6")
    with pytest.raises(ValueError) as python_err:
        ops.masked_mean_pool_varlen(hidden, cu_t)
    with pytest.raises(RuntimeError) as cpp_err:
        torch.ops.ctxkern.masked_mean_pool_varlen_fwd(hidden, cu_t, False)
    assert str(python_err.value) == expected
    assert str(cpp_err.value).splitlines()[0] == expected


@pytest.mark.parametrize("cu,message", BAD_CU_SEQLENS + [
    ([0, 6, 6], "max_seqlen_k = 5 is smaller than a sequence of 6 in cu_seqlens_k")])
def test_attention_cu_seqlens_message_is_the_same_in_python_and_cpp(cu, message):
    require_backend("cpu")
    q = torch.randn(6, 2, 16)
    bad = torch.tensor(cu, dtype=torch.int32)
    good = torch.linspace(0, 6, len(cu)).to(torch.int32)  # [0, 3, 6] or [0, 2, 4, 6]: valid, and as long as bad
    expected = message if message.startswith("max") else \
        "cu_seqlens_k " + message.format(name="cu_seqlens_k", total="k's length 6")
    with pytest.raises(ValueError) as python_err:
        ops.attention_varlen(q, q, q, good, bad, 6, 5)
    with pytest.raises(RuntimeError) as cpp_err:
        torch.ops.ctxkern.attention_varlen_fwd(q, q, q, good, bad, 6, 5, False, 0.25)
    assert str(python_err.value) == expected
    assert str(cpp_err.value).splitlines()[0] == expected


# ----------------------------------------------------------------------------- masks

def _additive(keep: torch.Tensor, masked_value: float) -> torch.Tensor:
    """Hugging Face's additive form of a keep-mask: 0 where attended, masked_value where not."""
    return torch.zeros(keep.shape).masked_fill(~keep, masked_value)


KEEP = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
ADDITIVE = [pytest.param(float("-inf"), id="-inf"), pytest.param(torch.finfo(torch.float32).min, id="finfo.min"),
            pytest.param(-10000.0, id="-1e4")]


@pytest.mark.parametrize("masked_value", ADDITIVE)
def test_attention_refuses_an_additive_float_mask(masked_value):
    q = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must hold 0 \(padding\) and 1 \(token\).*"
                                         r"additive mask.*key_padding_mask == 0"):
        ops.attention(q, q, q, key_padding_mask=_additive(KEEP, masked_value))


@pytest.mark.parametrize("masked_value", ADDITIVE)
def test_masked_mean_pool_refuses_an_additive_float_mask(masked_value):
    with pytest.raises(ValueError, match=r"mask must hold 0 \(padding\) and 1 \(token\).*mask == 0"):
        ops.masked_mean_pool(torch.randn(2, 5, 8), _additive(KEEP, masked_value))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_converted_additive_mask_and_float_and_integer_masks_mean_keep(backend):
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    hidden = torch.randn(2, 5, 8)
    want_attention = attention_ref(q.double(), k.double(), v.double(), KEEP)
    want_pool = masked_mean_pool_ref(hidden.double(), KEEP)
    # The conversion the error message asks for, HF's float 0 / 1 mask, and integer counts (any value >= 0).
    for mask in (_additive(KEEP, float("-inf")) == 0, KEEP.float(), KEEP.long() * 3, KEEP.to(torch.uint8)):
        out = ops.attention(q, k, v, key_padding_mask=mask, backend=backend)
        assert (out.double() - want_attention).abs().max() < 1e-5
        assert (ops.masked_mean_pool(hidden, mask, backend=backend).double() - want_pool).abs().max() < 1e-5


def test_negative_integer_masks_are_refused():
    with pytest.raises(ValueError, match=r"mask must be >= 0 \(nonzero = token\) when it is an integer tensor, got -1"):
        ops.masked_mean_pool(torch.randn(2, 5, 8), KEEP.long() - 1)
    q = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must be >= 0"):
        ops.attention(q, q, q, key_padding_mask=-KEEP.int())


# ----------------------------------------------------------------------------- max_seqlen

CU = torch.tensor([0, 3, 7], dtype=torch.int32)


@pytest.mark.parametrize("max_seqlen", [4, np.int64(4), np.int32(5), torch.tensor(4),
                                        torch.tensor(4, dtype=torch.int32)],
                         ids=["int", "np.int64", "np.int32", "0-d int64 tensor", "0-d int32 tensor"])
def test_max_seqlen_takes_any_integral_value(max_seqlen):
    q = torch.randn(7, 2, 8)
    want = ops.attention_varlen(q, q, q, CU, CU, 4, 4)
    assert torch.equal(ops.attention_varlen(q, q, q, CU, CU, max_seqlen, max_seqlen), want)


@pytest.mark.parametrize("max_seqlen", [4.0, True, -1, torch.tensor(4.0), torch.tensor([4]), "4", None],
                         ids=["float", "bool", "negative", "0-d float tensor", "1-d tensor", "str", "None"])
def test_max_seqlen_refuses_what_is_not_a_length(max_seqlen):
    q = torch.randn(7, 2, 8)
    with pytest.raises(ValueError, match=r"max_seqlen_q must be a non-negative integer"):
        ops.attention_varlen(q, q, q, CU, CU, max_seqlen, 4)


# ----------------------------------------------------------------------------- meta tensors

def test_varlen_ops_on_meta_tensors_give_meta_outputs():
    q, cu = torch.empty(7, 2, 8, device="meta"), CU.to("meta")
    out = ops.attention_varlen(q, q, q, cu, cu, 4, 4)
    assert out.is_meta and out.shape == (7, 2, 8)
    pooled = ops.masked_mean_pool_varlen(torch.empty(7, 8, device="meta"), cu)
    assert pooled.is_meta and pooled.shape == (2, 8)


def test_dense_ops_on_meta_tensors_give_meta_outputs():
    x = torch.empty(3, 5, 8, device="meta")
    assert ops.layer_norm(x, residual=x).shape == (3, 5, 8)
    assert ops.masked_mean_pool(x, torch.empty(3, 5, device="meta")).shape == (3, 8)
    assert ops.attention(x[..., None, :], x[..., None, :], x[..., None, :],
                         key_padding_mask=torch.empty(3, 5, device="meta")).shape == (3, 5, 1, 8)
    h, c = ops.lstm_cell(torch.empty(3, 8, device="meta"), torch.empty(3, 8, device="meta"),
                         torch.empty(3, 2, device="meta"))
    assert h.is_meta and h.shape == c.shape == (3, 2)


def test_meta_cu_seqlens_beside_real_tensors_is_a_named_error():
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be on q's device cpu, got meta"):
        ops.attention_varlen(torch.randn(7, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8), CU.to("meta"), CU, 4, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens must be on hidden's device cpu, got meta"):
        ops.masked_mean_pool_varlen(torch.randn(7, 8), CU.to("meta"))


# ----------------------------------------------------------------------------- head dims

def test_supports_head_dim_is_the_rule_the_ops_apply():
    assert all(supports_head_dim(d, "cuda") for d in CUDA_HEAD_DIMS) and not supports_head_dim(48, "cuda")
    assert supports_head_dim(1, "cpu") and supports_head_dim(MAX_HEAD_DIM, "triton")
    assert not supports_head_dim(MAX_HEAD_DIM + 1, "cpu") and not supports_head_dim(0, "cpu")
    assert supports_head_dim(MAX_HEAD_DIM + 1, "torch")
    require_backend("cpu")
    for d in (MAX_HEAD_DIM, MAX_HEAD_DIM + 1):
        q = torch.randn(1, 2, 1, d)
        if supports_head_dim(d, "cpu"):
            ops.attention(q, q, q, backend="cpu")
        else:
            with pytest.raises(ValueError, match="head dim must be between 1 and 128 on the cpu backend"):
                ops.attention(q, q, q, backend="cpu")


# ----------------------------------------------------------------------------- the eager fast path

class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_dispatch_modes_see_the_operator():
    """The direct kernel call skips the dispatcher; under a dispatch mode (FakeTensorMode, FLOP counters) the
    registered operator must be called instead, or the mode would never see it."""
    require_backend("cpu")
    x = torch.randn(4, 8)
    with _OpLog() as log:
        ops.layer_norm(x)
    assert "ctxkern.layer_norm_fwd.default" in log.ops


def test_the_profiler_records_the_operator():
    require_backend("cpu")
    x = torch.randn(4, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.layer_norm(x)
    assert "ctxkern::layer_norm_fwd" in {event.name for event in prof.events()}


def test_fake_tensor_mode_runs_the_fakes():
    require_backend("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, 8)
        y = ops.layer_norm(x, torch.ones(8), residual=x)
        h, _c = ops.lstm_cell(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2))
    assert y.shape == (4, 8) and h.shape == (4, 2)


def test_eager_autograd_matches_the_registered_operator():
    """The autograd.Function the eager path uses is built from the operator's own setup_context and backward:
    same outputs, same gradients."""
    require_backend("cpu")
    x, r, w, b = (torch.randn(*s, requires_grad=True) for s in ((5, 24), (5, 24), (24,), (24,)))
    dy = torch.randn(5, 24)
    eager = LAYER_NORM_KERNELS["cpu"](x, r, w, b, 1e-5)
    operator = LAYER_NORM_KERNELS["cpu"].op(x, r, w, b, 1e-5)
    assert "eager" in type(eager[0].grad_fn).__name__ and "eager" not in type(operator[0].grad_fn).__name__
    for got, want in zip(torch.autograd.grad(eager[0], (x, r, w, b), dy),
                         torch.autograd.grad(operator[0], (x, r, w, b), dy), strict=True):
        assert torch.equal(got, want)
    ig, hg, c, bias = (torch.randn(*s, requires_grad=True) for s in ((3, 32), (3, 32), (3, 8), (32,)))
    grads = [torch.randn(3, 8), torch.randn(3, 8)]
    eager, operator = LSTM_CELL_KERNELS["cpu"](ig, hg, c, bias, 0.5), LSTM_CELL_KERNELS["cpu"].op(ig, hg, c, bias, 0.5)
    for got, want in zip(torch.autograd.grad(eager, (ig, hg, c, bias), grads),
                         torch.autograd.grad(operator, (ig, hg, c, bias), grads), strict=True):
        assert torch.equal(got, want)


def test_no_grad_and_inference_mode_outputs_carry_no_graph():
    require_backend("cpu")
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        assert ops.layer_norm(x).grad_fn is None
    with torch.inference_mode():
        y = ops.layer_norm(x.detach())
    assert y.is_inference() and torch.allclose(y, layer_norm_ref(x.detach()), atol=1e-6)
