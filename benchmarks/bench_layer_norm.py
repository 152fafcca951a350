"""LayerNorm: every ctxkern backend against torch eager, torch.compile and peers (`make bench`)."""
from candidates import bench_candidate, parametrize_candidates


def pytest_generate_tests(metafunc):
    parametrize_candidates(metafunc, "layer_norm")


def test_layer_norm(benchmark, device, case_index, backend):
    bench_candidate(benchmark, "layer_norm", device, case_index, backend)
