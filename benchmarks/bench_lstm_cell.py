"""The LSTM cell and the LSTM layer stack: ctxkern against torch eager, torch.compile, torch.nn.LSTM (cuDNN on a
GPU) and an eager LSTMCell loop (`make bench`)."""
from candidates import bench_candidate, parametrize_candidates


def pytest_generate_tests(metafunc):
    op = "lstm_cell" if metafunc.function.__name__ == "test_lstm_cell" else "lstm"
    parametrize_candidates(metafunc, op)


def test_lstm_cell(benchmark, device, case_index, backend):
    bench_candidate(benchmark, "lstm_cell", device, case_index, backend)


def test_lstm(benchmark, device, case_index, backend):
    bench_candidate(benchmark, "lstm", device, case_index, backend)
