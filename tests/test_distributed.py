"""The distributed path on a local Ray instance (one start for the module): Ray Data map_batches with a
SentenceEncoder per worker writes index shards, and the merged index equals the single-process one."""
import subprocess
import sys

import numpy as np
import pytest

from helpers import bundled_model_folder
from ctxkern.models import SentenceEncoder
from ctxkern.search import DEFAULT_CORPUS, Index

ray = pytest.importorskip("ray", reason="Ray is not installed (the optional [distributed] extra: ray[data])")
pytest.importorskip("ray.data", reason="Ray is installed without Ray Data (pip install \"ray[data]\")")
from ctxkern.search.distributed import encode_shards  # noqa: E402

TEXTS = [f"{sentence} ({i})" for i in range(3) for sentence in DEFAULT_CORPUS]     # 60 documents
LINES = [2 * i + 1 for i in range(len(TEXTS))]                                     # as if every other line were empty


@pytest.fixture(scope="module")
def local_ray():
    bundled_model_folder()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(local_ray, tmp_path_factory):
    return encode_shards(TEXTS, LINES, tmp_path_factory.mktemp("run") / "shards", workers=2, shard_docs=25)


def test_merged_shards_equal_the_single_process_index(shards, tmp_path):
    assert len(shards) == 3 and all(p.name.startswith("shard-") for p in shards)
    merged = Index.merge([Index.load(p) for p in shards])
    single = Index.build(TEXTS, SentenceEncoder.from_pretrained(), lines=LINES)
    assert merged.texts == single.texts and (merged.lines == single.lines).all()
    cosine = (merged.embeddings * single.embeddings).sum(1)          # unit rows
    assert cosine.min() > 0.99999, cosine.min()
    assert merged.model["fingerprint"] == single.model["fingerprint"]


def test_ctxkern_index_merge_command(shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ctxkern", "index", "merge", *map(str, shards), "--out",
                           str(tmp_path / "ix")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(TEXTS)} documents from 3 shards" in proc.stdout
    merged = Index.load(tmp_path / "ix")
    assert merged.texts == TEXTS and merged.lines.tolist() == LINES


def test_a_non_empty_shards_folder_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-old").mkdir()
    with pytest.raises(ValueError, match="is not empty: shards of an earlier run would be merged twice"):
        encode_shards(TEXTS, LINES, tmp_path / "shards")


def test_shards_of_another_model_are_not_merged(shards):
    other = Index(384, model={"name": "other", "fingerprint": "0"})
    other.add(["x"], np.ones((1, 384), np.float32))
    with pytest.raises(ValueError, match="shard 1 was made by model 'other'"):
        Index.merge([Index.load(shards[0]), other])
