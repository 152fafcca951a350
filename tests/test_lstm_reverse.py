"""ctxkern.nn.LSTM's ELMo extras: reverse=True (one direction run backwards over each sequence's own length)
against torch.nn.LSTM's reverse direction with the same weights, and a clip of 0 meaning no clip (AllenNLP)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import ctxkern
from helpers import assert_fp32_close, require_backend

INPUT, HIDDEN, PROJ, STEPS = 5, 7, 3, 6
LENGTHS = [6, 2, 4, 1]


def _reverse_half_of(bidirectional: torch.nn.LSTM) -> dict:
    """The reverse direction's parameters of a one-layer bidirectional torch.nn.LSTM, under the plain names."""
    return {k.removesuffix("_reverse"): v for k, v in bidirectional.state_dict().items() if k.endswith("_reverse")}


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_reverse_runs_each_sequence_backwards_from_its_own_end(backend, grad):
    require_backend(backend)
    reference = torch.nn.LSTM(INPUT, HIDDEN, bidirectional=True, proj_size=PROJ, dtype=torch.float64)
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, proj_size=PROJ, reverse=True, backend=backend)
    ours.load_state_dict({k: v.float() for k, v in _reverse_half_of(reference).items()})
    x = torch.randn(STEPS, len(LENGTHS), INPUT)
    h0, c0 = torch.randn(1, len(LENGTHS), PROJ), torch.randn(1, len(LENGTHS), HIDDEN)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    with torch.set_grad_enabled(grad):
        out, (h_n, c_n) = ours(packed, (h0, c0))
    padded, _ = pad_packed_sequence(out)
    zeros = torch.zeros_like  # the forward half of the reference starts from zeros; only its reverse half is compared
    ref_out, (ref_h, ref_c) = reference(
        pack_padded_sequence(x.double(), torch.tensor(LENGTHS), enforce_sorted=False),
        (torch.cat((zeros(h0), h0)).double(), torch.cat((zeros(c0), c0)).double()))
    ref_padded, _ = pad_packed_sequence(ref_out)
    assert_fp32_close(padded, ref_padded[..., PROJ:])
    assert_fp32_close(h_n, ref_h[1:])
    assert_fp32_close(c_n, ref_c[1:])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_clip_zero_means_no_clip(backend):
    require_backend(backend)
    reference = torch.nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=PROJ, dtype=torch.float64)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-1.5, 1.5)  # large states: a clip at 0 would zero them
    ours = ctxkern.nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=PROJ, cell_clip=0, proj_clip=0.0,
                           backend=backend)
    ours.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    assert ours.cell_clip is None and ours.proj_clip is None
    x = 2 * torch.randn(STEPS, 2, INPUT)
    out, (h_n, c_n) = ours(x)
    ref_out, (ref_h, ref_c) = reference(x.double())
    assert ref_c.abs().max() > 1, "the weights should give cell values a clip would change"
    for got, ref in ((out, ref_out), (h_n, ref_h), (c_n, ref_c)):
        assert_fp32_close(got, ref)


def test_reverse_needs_one_direction():
    with pytest.raises(ValueError, match="reverse=True .* needs bidirectional=False"):
        ctxkern.nn.LSTM(INPUT, HIDDEN, bidirectional=True, reverse=True)
    assert "reverse=True" in repr(ctxkern.nn.LSTM(INPUT, HIDDEN, reverse=True))
