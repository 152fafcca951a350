"""Sentence embeddings end to end: ctxkern's SentenceEncoder (padding-free and padded) against
sentence-transformers' encode, Hugging Face's BertModel (SDPA) and ONNX Runtime, same sentences, same model
(`make bench`)."""
from candidates import bench_candidate, parametrize_candidates


def pytest_generate_tests(metafunc):
    parametrize_candidates(metafunc, "bert")


def test_bert(benchmark, device, case_index, backend):
    bench_candidate(benchmark, "bert", device, case_index, backend)
