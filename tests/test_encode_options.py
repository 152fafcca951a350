"""SentenceEncoder.encode's sentence-transformers options, similarity() and save(), each against
sentence-transformers on the bundled all-MiniLM-L6-v2 (and a small random BERT folder where the bundled model
cannot show the option: no Normalize, a folder's prompts and similarity function)."""
import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from helpers import bundled_model_folder
from ctxkern.models import CheckpointError, SentenceEncoder
from test_sentence_encoder import SENTENCES, assert_matches, small_bert, write_legacy_folder  # noqa: F401

PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def st():
    return SentenceTransformer(str(bundled_model_folder()), device="cpu")


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.from_pretrained()


def with_st_config(tmp_path, config, name="minilm"):
    """The bundled folder (its files linked, not copied) with config_sentence_transformers.json replaced."""
    folder = tmp_path / name
    folder.mkdir()
    for item in bundled_model_folder().iterdir():
        if item.name != "config_sentence_transformers.json":
            (folder / item.name).symlink_to(item)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------- output types

def test_default_is_a_float32_tensor_and_convert_to_numpy_is_sentence_transformers_default(encoder, st):
    theirs = st.encode(SENTENCES)
    assert isinstance(theirs, np.ndarray)
    ours = encoder.encode(SENTENCES, convert_to_numpy=True)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == theirs.shape
    assert_matches(torch.from_numpy(ours), torch.from_numpy(theirs))
    assert isinstance(encoder.encode(SENTENCES), torch.Tensor)


def test_convert_to_tensor_wins_over_convert_to_numpy(encoder, st):
    ours = encoder.encode(SENTENCES, convert_to_numpy=True, convert_to_tensor=True)
    theirs = st.encode(SENTENCES, convert_to_numpy=True, convert_to_tensor=True)
    assert isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor)
    assert_matches(ours, theirs)


def test_device_cpu_matches_and_a_bad_device_is_named(encoder, st):
    assert_matches(encoder.encode(SENTENCES, device="cpu"), st.encode(SENTENCES, device="cpu",
                                                                      convert_to_tensor=True))
    with pytest.raises(ValueError, match="device 'nowhere'"):
        encoder.encode(SENTENCES, device="nowhere")


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size_is_refused(encoder, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(SENTENCES, batch_size=batch_size)


def test_show_progress_bar(encoder, capsys):
    encoder.encode(SENTENCES, batch_size=2, show_progress_bar=True)
    assert "encoding" in capsys.readouterr().err
    encoder.encode(SENTENCES, batch_size=2, show_progress_bar=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- what is computed

@pytest.mark.parametrize("padding_free", [None, False], ids=["padding-free", "padded"])
def test_token_embeddings_match_sentence_transformers(st, padding_free):
    encoder = SentenceEncoder.from_pretrained(padding_free=padding_free)
    ours = encoder.encode(SENTENCES, batch_size=3, output_value="token_embeddings")
    theirs = st.encode(SENTENCES, batch_size=3, output_value="token_embeddings")
    assert isinstance(ours, list) and len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape and mine.dtype == torch.float32
        assert (mine - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())
    assert max(len(t) for t in ours) == encoder.max_seq_length == 256
    arrays = encoder.encode(SENTENCES[:2], output_value="token_embeddings", convert_to_numpy=True)
    assert all(isinstance(a, np.ndarray) for a in arrays)


def test_token_embeddings_honour_max_seq_length(st):
    encoder = SentenceEncoder.from_pretrained()
    reference = SentenceTransformer(str(bundled_model_folder()), device="cpu")
    encoder.max_seq_length = reference.max_seq_length = 9
    ours = encoder.encode(SENTENCES, output_value="token_embeddings")
    theirs = reference.encode(SENTENCES, output_value="token_embeddings")
    assert [len(t) for t in ours] == [len(t) for t in theirs] and max(len(t) for t in ours) == 9
    for mine, ref in zip(ours, theirs):
        assert (mine - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_unknown_output_value(encoder):
    with pytest.raises(ValueError, match="output_value must be one of"):
        encoder.encode(SENTENCES, output_value=None)


def test_normalize_embeddings_on_a_model_without_normalize(small_bert):
    theirs = SentenceTransformer(str(small_bert), device="cpu").encode(SENTENCES, normalize_embeddings=True,
                                                                       convert_to_tensor=True)
    ours = SentenceEncoder.from_pretrained(small_bert).encode(SENTENCES, normalize_embeddings=True)
    assert (ours.norm(dim=1) - 1).abs().max() < 1e-5
    assert_matches(ours, theirs)


def test_truncate_dim_then_normalize(encoder, st):
    ours = encoder.encode(SENTENCES, truncate_dim=64, normalize_embeddings=True)
    theirs = st.encode(SENTENCES, truncate_dim=64, normalize_embeddings=True, convert_to_tensor=True)
    assert ours.shape == (len(SENTENCES), 64)
    assert_matches(ours, theirs)


def test_prompt_is_prepended_as_in_sentence_transformers(encoder, st):
    ours = encoder.encode(SENTENCES, prompt="query: ")
    assert_matches(ours, st.encode(SENTENCES, prompt="query: ", convert_to_tensor=True))
    assert not torch.allclose(ours, encoder.encode(SENTENCES), atol=1e-3)


def test_folder_prompts_by_name_and_default(tmp_path):
    folder = with_st_config(tmp_path, {"prompts": PROMPTS, "default_prompt_name": "passage",
                                       "similarity_fn_name": "cosine"})
    ours, theirs = SentenceEncoder.from_pretrained(folder), SentenceTransformer(str(folder), device="cpu")
    assert ours.prompts == PROMPTS and ours.default_prompt_name == "passage"
    for name in ("query", "passage"):
        assert_matches(ours.encode(SENTENCES, prompt_name=name),
                       theirs.encode(SENTENCES, prompt_name=name, convert_to_tensor=True))
    assert_matches(ours.encode(SENTENCES), theirs.encode(SENTENCES, convert_to_tensor=True))   # the default
    assert_matches(ours.encode(SENTENCES, prompt=""), theirs.encode(SENTENCES, prompt="", convert_to_tensor=True))
    with pytest.raises(ValueError, match=r"prompt_name 'title' is not one of the model's prompts \['passage', 'query'\]"):
        ours.encode(SENTENCES, prompt_name="title")


def test_folder_with_a_bad_default_prompt_names_its_config(tmp_path):
    folder = with_st_config(tmp_path, {"prompts": PROMPTS, "default_prompt_name": "title"})
    with pytest.raises(CheckpointError, match="config_sentence_transformers.json.*'title'"):
        SentenceEncoder.from_pretrained(folder)


# ----------------------------------------------------------------------------- similarity

@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_functions_match_sentence_transformers(encoder, st, name):
    embeddings = encoder.encode(SENTENCES)
    reference = SentenceTransformer(str(bundled_model_folder()), device="cpu")
    reference.similarity_fn_name = encoder.similarity_fn_name = name
    try:
        ours = encoder.similarity(embeddings[:3], embeddings)
        theirs = reference.similarity(embeddings[:3], embeddings)
    finally:
        encoder.similarity_fn_name = None
    assert ours.shape == (3, len(SENTENCES))
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())
    assert encoder.similarity_fn_name == "cosine"


def test_similarity_takes_numpy_and_single_rows(encoder, st):
    a, b = st.encode(SENTENCES[:2]), st.encode(SENTENCES[0])
    assert encoder.similarity(a, b).shape == (2, 1)
    assert torch.allclose(encoder.similarity(a, b), st.similarity(a, b), atol=1e-6)
    with pytest.raises(ValueError, match="same dimension"):
        encoder.similarity(a, a[:, :5])


def test_folder_similarity_function_is_read(tmp_path):
    folder = with_st_config(tmp_path, {"similarity_fn_name": "dot"})
    assert SentenceEncoder.from_pretrained(folder).similarity_fn_name == "dot"
    assert SentenceTransformer(str(folder), device="cpu").similarity_fn_name == "dot"
    bad = with_st_config(tmp_path, {"similarity_fn_name": "jaccard"}, name="bad")
    with pytest.raises(CheckpointError, match="config_sentence_transformers.json.*similarity_fn_name.*'jaccard'"):
        SentenceEncoder.from_pretrained(bad)


# ----------------------------------------------------------------------------- save

def test_save_is_loaded_alike_by_ctxkern_and_sentence_transformers(encoder, st, tmp_path):
    encoder.prompts, encoder.similarity_fn_name = dict(PROMPTS), "dot"
    try:
        folder = encoder.save(tmp_path / "saved")
    finally:
        encoder.prompts, encoder.similarity_fn_name = {}, None
    theirs = st.encode(SENTENCES, convert_to_tensor=True)
    reloaded, st_reloaded = SentenceEncoder.from_pretrained(folder), SentenceTransformer(str(folder), device="cpu")
    assert_matches(reloaded.encode(SENTENCES), theirs)
    assert_matches(st_reloaded.encode(SENTENCES, convert_to_tensor=True), theirs)
    assert reloaded.max_seq_length == st_reloaded.max_seq_length == 256
    assert reloaded.prompts == PROMPTS
    assert {k: v for k, v in st_reloaded.prompts.items() if v} == PROMPTS   # it adds empty default prompts
    assert reloaded.similarity_fn_name == st_reloaded.similarity_fn_name == "dot"


def test_save_of_a_cls_model_with_a_set_max_seq_length(small_bert, tmp_path):
    source = write_legacy_folder(tmp_path / "st", small_bert, "cls", normalize=False)
    encoder = SentenceEncoder.from_pretrained(source)
    encoder.max_seq_length = 12
    folder = encoder.save(tmp_path / "saved")
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == 12
    assert_matches(SentenceEncoder.from_pretrained(folder).encode(SENTENCES), encoder.encode(SENTENCES))
    assert_matches(st.encode(SENTENCES, convert_to_tensor=True), encoder.encode(SENTENCES))


def test_save_onto_a_file_is_refused(encoder, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file.*not a folder"):
        encoder.save(tmp_path / "file")
