"""Attention: every ctxkern backend against SDPA's backends, HF's eager attention and torch.compile (`make bench`)."""
from candidates import bench_candidate, parametrize_candidates


def pytest_generate_tests(metafunc):
    parametrize_candidates(metafunc, "attention")


def test_attention(benchmark, device, case_index, backend):
    bench_candidate(benchmark, "attention", device, case_index, backend)
