"""`ctxkern embed --model elmo:...` and `ctxkern elmo embed-file` on AllenNLP's small fixture biLM: the printed
cosines against vectors computed here from ElmoEmbedder, and AllenNLP's `elmo` command's hdf5 layout."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ctxkern import cli
from ctxkern.models import ElmoEmbedder

FIXTURES = Path(__file__).parent / "fixtures" / "elmo"
OPTIONS, WEIGHTS = str(FIXTURES / "options.json"), str(FIXTURES / "lm_weights.hdf5")
MODEL = f"elmo:{OPTIONS},{WEIGHTS}"
SENTENCES = ["The bank approved my loan application.", "I sat on the bank of the river.",
             "Interest rates at the central bank rose."]
TOKENS = [["The", "bank", "approved", "my", "loan", "application", "."],
          ["I", "sat", "on", "the", "bank", "of", "the", "river", "."],
          ["Interest", "rates", "at", "the", "central", "bank", "rose", "."]]


def printed_matrix(stdout: str, n: int) -> torch.Tensor:
    rows = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(rows) == n, stdout
    return torch.tensor([[float(x) for x in row.split()[1:n + 1]] for row in rows])


def cosines(vectors):
    v = torch.nn.functional.normalize(torch.as_tensor(np.stack(vectors)).double(), dim=-1)
    return v @ v.T


def test_embed_word_prints_cosines_of_elmo_layer_means(capsys):
    assert cli.main(["embed", "--model", MODEL, "--word", "bank", *SENTENCES]) == 0
    printed = printed_matrix(capsys.readouterr().out, 3)
    # each sentence alone through a fresh (stateful, hence zero-started) biLM: the stateless per-sentence vectors
    vectors = [ElmoEmbedder(OPTIONS, WEIGHTS).embed_sentence(t).mean(0)[t.index("bank")] for t in TOKENS]
    assert (printed.double() - cosines(vectors)).abs().max() <= 6e-4


def test_embed_sentences_prints_cosines_of_token_means(capsys):
    assert cli.main(["embed", "--model", MODEL, *SENTENCES[:2]]) == 0
    printed = printed_matrix(capsys.readouterr().out, 2)
    vectors = [ElmoEmbedder(OPTIONS, WEIGHTS).embed_sentence(t).mean(0).mean(0) for t in TOKENS[:2]]
    assert (printed.double() - cosines(vectors)).abs().max() <= 6e-4


@pytest.mark.parametrize("flag", ["--all", "--top", "--average"])
def test_elmo_embed_file_writes_allennlp_layout(tmp_path, flag):
    lines = [" ".join(t) for t in TOKENS]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.hdf5"
    assert cli.main(["elmo", "embed-file", str(tmp_path / "in.txt"), str(out), "--options-file", OPTIONS,
                     "--weight-file", WEIGHTS, "--batch-size", "2", "--no-progress", flag]) == 0
    expected = list(ElmoEmbedder(OPTIONS, WEIGHTS, batch_size=2).embed_sentences(TOKENS))
    with h5py.File(out, "r") as fin:
        assert json.loads(fin["sentence_to_index"][0]) == {s: str(i) for i, s in enumerate(lines)}
        for i, want in enumerate(expected):
            want = {"--all": want, "--top": want[-1], "--average": want.mean(0)}[flag]
            np.testing.assert_allclose(fin[str(i)][...], want, rtol=1e-6, atol=1e-7)


def test_bad_model_spec_and_files_are_usage_errors(tmp_path, capsys):
    assert cli.main(["embed", "--model", f"elmo:{OPTIONS}", "x"]) == 2
    assert "elmo:OPTIONS.json,WEIGHTS.hdf5" in capsys.readouterr().err
    assert cli.main(["embed", "--model", f"elmo:{tmp_path}/no.json,{WEIGHTS}", "x"]) == 2
    assert "no.json: no such ELMo options file" in capsys.readouterr().err
    assert cli.main(["embed", "--model", MODEL, "--word", "zebra", "a b"]) == 2
    assert "word 'zebra' is not a token of sentence 0" in capsys.readouterr().err
    assert cli.main(["elmo", "embed-file", str(tmp_path / "missing.txt"), str(tmp_path / "o.hdf5"),
                     "--options-file", OPTIONS, "--weight-file", WEIGHTS]) == 2
    assert "missing.txt: no such input file" in capsys.readouterr().err
