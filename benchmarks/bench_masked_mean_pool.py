"""Masked mean pooling: every ctxkern backend against torch eager, sentence-transformers' Pooling, torch.compile
of its expression and a bmm (`make bench`)."""
from candidates import bench_candidate, parametrize_candidates


def pytest_generate_tests(metafunc):
    parametrize_candidates(metafunc, "masked_mean_pool")


def test_masked_mean_pool(benchmark, device, case_index, backend):
    bench_candidate(benchmark, "masked_mean_pool", device, case_index, backend)
