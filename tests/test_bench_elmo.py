"""The ELMo benchmark's peers compute what ElmoBiLm computes: the eager port of AllenNLP's algorithm (its
LstmCellWithProjection time loop) on a random model in the released layout, and torch.nn.LSTM with proj_size
on the LSTM part without clipping; and `ctxkern bench --op elmo --quick` runs."""
import torch

from ctxkern.bench import elmo as bench_elmo
from ctxkern.models import ElmoBiLm, batch_to_ids

TINY = dict(dim=24, projection_dim=8, n_highway=2, filters=[[1, 4], [2, 4], [3, 8]], char_dim=4)


def _model(tmp_path):
    options, weights = bench_elmo.write_random_elmo(tmp_path, **TINY)
    return ElmoBiLm(options, weights, stateful=False, dtype=torch.float64)


def test_allennlp_port_matches_elmo_bilm(tmp_path):
    bilm = _model(tmp_path)
    port = bench_elmo.AllenNlpPort(bilm, torch.float64)
    ids = batch_to_ids([["a", "bc", "def"], ["g"], ["hij", "k", "l", "mn", "o"]])
    with torch.no_grad():
        ours = bilm(ids)["activations"]
    for got, want in zip(ours, port(ids), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_lstm_peer_matches_unclipped_elmo_lstm(tmp_path):
    bilm = _model(tmp_path)
    lstm = bilm._elmo_lstm
    for module in lstm.children():
        module.cell_clip = module.proj_clip = None  # the peer has no clipping
    ids = batch_to_ids([["a", "bc", "def"], ["g"], ["hij", "k", "l", "mn", "o"]])
    with torch.no_grad():
        x, mask = bilm._token_embedder(ids)
        ours = lstm(x, mask)
    theirs = bench_elmo.torch_lstm(lstm.float(), "cpu")(x.float(), mask)
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-5, atol=1e-6)
    port = bench_elmo.AllenNlpPort(bilm, torch.float64, clip=False)
    torch.testing.assert_close(torch.stack(port.lstm(x, mask)), ours, rtol=1e-10, atol=1e-12)


def test_quick_bench_checks_and_times_every_candidate(monkeypatch):
    """The quick cases' candidates pass their check and are timed (on a tiny model, for the test's time)."""
    from ctxkern.bench.case import run_case

    monkeypatch.setitem(bench_elmo.CONFIGS, "small", TINY)
    cases = bench_elmo.cases("cpu", quick=True, with_compile=False)
    assert [c.op for c in cases] == ["elmo_bilm", "elmo_lstm"]
    cases[0].cpu_rounds = cases[1].cpu_rounds = 1
    for case in cases:
        rows = run_case(case, "cpu", peaks={})
        assert all("error" not in r and r["median_ms"] > 0 and r["items_per_s"] > 0 for r in rows), rows
