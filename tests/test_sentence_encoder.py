"""models.SentenceEncoder against sentence-transformers' SentenceTransformer.encode: the bundled all-MiniLM-L6-v2
(mean pooling, Normalize, max_seq_length 256) and sentence-transformers folders built around a small random BERT,
and the errors of bad folders and bad arguments."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from helpers import bundled_model_folder
from ctxkern.models import CheckpointError, SentenceEncoder
from random_hf import randomize

# Mixed lengths: an empty string, whitespace only, accents, CJK and an emoji, and one input far past 256 tokens.
SENTENCES = [
    "The cat sat on the mat.",
    "",
    "Déjà vu — a naïve café in 東京 🙂",
    " ".join(f"word{i}" for i in range(300)),
    "Hi",
    "   ",
    "A considerably longer sentence about fused kernels, attention over padded batches and LayerNorm.",
    "Contextual embeddings map every token to a vector that depends on its neighbours.",
]
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-5         # unit vectors: measured about 2e-7 on the bundled model
MINILM_DIM = 384


def assert_matches(ours, theirs):
    """Row by row: cosine above MIN_COSINE and max abs difference within MAX_ABS_DIFF of the reference's scale."""
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    cosine = F.cosine_similarity(ours, theirs.to(ours.device), dim=1)
    assert (cosine > MIN_COSINE).all(), f"cosine per sentence {cosine.tolist()}"
    scale = max(1.0, theirs.abs().max().item())
    diff = (ours - theirs).abs().max().item()
    assert diff <= MAX_ABS_DIFF * scale, f"max abs difference {diff:.3g}"


@pytest.fixture(autouse=True, scope="module")
def _bundled_model():
    """Every test here needs the bundled model, if only its tokenizer."""
    bundled_model_folder()


# ----------------------------------------------------------------------------- the bundled all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def st_minilm():
    return SentenceTransformer(str(bundled_model_folder()), device="cpu")


@pytest.fixture(scope="module")
def reference(st_minilm):
    return st_minilm.encode(SENTENCES, convert_to_tensor=True)


@pytest.fixture(scope="module")
def encoders():
    """The bundled model (path=None) on the padding-free path (the default) and on the padded one."""
    return {None: SentenceEncoder.from_pretrained(), False: SentenceEncoder.from_pretrained(padding_free=False)}


@pytest.mark.parametrize("batch_size", [1, 7, None], ids=["batch-1", "batch-7", "batch-default"])
@pytest.mark.parametrize("padding_free", [None, False], ids=["padding-free", "padded"])
def test_minilm_matches_sentence_transformers(encoders, reference, padding_free, batch_size):
    encoder = encoders[padding_free]
    ours = encoder.encode(SENTENCES) if batch_size is None else encoder.encode(SENTENCES, batch_size=batch_size)
    assert ours.shape == (len(SENTENCES), MINILM_DIM)
    assert_matches(ours, reference)


def test_minilm_tokens_and_truncation_match_sentence_transformers(encoders, st_minilm):
    assert st_minilm.max_seq_length == 256
    theirs = st_minilm.tokenizer(SENTENCES, truncation=True, max_length=st_minilm.max_seq_length)["input_ids"]
    ours = encoders[None].tokenize(SENTENCES)
    assert ours == theirs
    assert len(ours[SENTENCES.index(max(SENTENCES, key=len))]) == 256


@pytest.mark.parametrize("max_seq_length", [5, 40])
def test_setting_max_seq_length_truncates_as_sentence_transformers(max_seq_length):
    ours, theirs = SentenceEncoder.from_pretrained(), SentenceTransformer(str(bundled_model_folder()), device="cpu")
    ours.max_seq_length = theirs.max_seq_length = max_seq_length
    assert ours.max_seq_length == max_seq_length
    assert max(map(len, ours.tokenize(SENTENCES))) == max_seq_length
    assert_matches(ours.encode(SENTENCES), theirs.encode(SENTENCES, convert_to_tensor=True))


@pytest.mark.parametrize("value", [0, -3, 513, 2.5, True, "64"])
def test_max_seq_length_out_of_range_is_refused(encoders, value):
    with pytest.raises(ValueError, match=r"max_seq_length must be an integer from 1 to .*512, got"):
        encoders[None].max_seq_length = value
    assert encoders[None].max_seq_length == 256


def test_minilm_output_is_float32_and_unit_length(encoders):
    out = encoders[None].encode(SENTENCES, batch_size=3)
    assert out.dtype == torch.float32
    assert (out.norm(dim=1) - 1).abs().max() < 1e-5, "the model ends in Normalize"


def test_minilm_keeps_the_input_order(encoders, reference):
    permutation = torch.randperm(len(SENTENCES))
    ours = encoders[None].encode([SENTENCES[i] for i in permutation], batch_size=3)
    assert_matches(ours, reference[permutation])


def test_minilm_single_string_is_one_sentence(encoders, reference):
    ours = encoders[None].encode(SENTENCES[0])
    assert ours.shape == (1, MINILM_DIM)
    assert_matches(ours, reference[:1])


def test_minilm_generator_of_sentences_is_not_silently_dropped(encoders, reference):
    try:
        ours = encoders[None].encode(sentence for sentence in SENTENCES)
    except (TypeError, ValueError) as err:
        assert "sentences" in str(err)
    else:
        assert_matches(ours, reference)


@pytest.mark.parametrize("padding_free", [None, False], ids=["padding-free", "padded"])
def test_minilm_empty_list(encoders, padding_free):
    out = encoders[padding_free].encode([])
    assert out.shape == (0, MINILM_DIM) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- small random sentence-transformers folders

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
SMALL_MAX_SEQ_LENGTH = 24   # below the longest sentences' token counts, so truncation shows here too
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# The module names and pooling config that sentence-transformers wrote before 5.x, as the bundled model has them.
LEGACY_TYPES = {"transformer": "sentence_transformers.models.Transformer",
                "pooling": "sentence_transformers.models.Pooling",
                "normalize": "sentence_transformers.models.Normalize"}


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory):
    """A random BERT with all-MiniLM-L6-v2's vocabulary, saved with the bundled tokenizer."""
    folder = tmp_path_factory.mktemp("small_bert")
    config = transformers.BertConfig(vocab_size=30522, **SMALL)
    randomize(transformers.BertModel(config).eval()).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_folder() / name, folder)
    return folder


def write_legacy_folder(folder, bert_folder, pooling, normalize):
    """A sentence-transformers folder as the releases before 5.x saved it (and the Hub holds): modules.json with
    sentence_transformers.models.* types, 1_Pooling/config.json with pooling_mode_*_tokens flags."""
    shutil.copytree(bert_folder, folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": LEGACY_TYPES["transformer"]},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": LEGACY_TYPES["pooling"]}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": LEGACY_TYPES["normalize"]})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": SMALL["hidden_size"], "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": SMALL_MAX_SEQ_LENGTH, "do_lower_case": False}))
    return folder


POOLINGS = [("mean", True), ("mean", False), ("cls", True), ("cls", False)]
POOLING_IDS = ["mean-normalize", "mean", "cls-normalize", "cls"]


@pytest.mark.parametrize("padding_free", [None, False], ids=["padding-free", "padded"])
@pytest.mark.parametrize("pooling,normalize", POOLINGS, ids=POOLING_IDS)
def test_small_legacy_folder_matches_sentence_transformers(small_bert, tmp_path, pooling, normalize,
                                                           padding_free):
    folder = write_legacy_folder(tmp_path / "st", small_bert, pooling, normalize)
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == SMALL_MAX_SEQ_LENGTH
    theirs = st.encode(SENTENCES, convert_to_tensor=True)
    ours = SentenceEncoder.from_pretrained(folder, padding_free=padding_free).encode(SENTENCES, batch_size=3)
    assert ours.shape == (len(SENTENCES), SMALL["hidden_size"])
    assert_matches(ours, theirs)


@pytest.mark.parametrize("padding_free", [None, False], ids=["padding-free", "padded"])
def test_small_plain_bert_folder_is_mean_pooled_like_sentence_transformers(small_bert, padding_free):
    """A Hugging Face folder without modules.json: sentence-transformers adds mean pooling and no Normalize."""
    theirs = SentenceTransformer(str(small_bert), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    ours = SentenceEncoder.from_pretrained(small_bert, padding_free=padding_free).encode(SENTENCES, batch_size=3)
    assert_matches(ours, theirs)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("mean", False), ("cls", False)],
                         ids=["mean-normalize", "mean", "cls"])
def test_small_folder_saved_by_sentence_transformers_matches(small_bert, tmp_path, pooling, normalize):
    transformer = Transformer(str(small_bert), max_seq_length=SMALL_MAX_SEQ_LENGTH)
    modules = [transformer, Pooling(SMALL["hidden_size"], pooling)] + ([Normalize()] if normalize else [])
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert st.max_seq_length == SMALL_MAX_SEQ_LENGTH
    theirs = st.encode(SENTENCES, convert_to_tensor=True)
    ours = SentenceEncoder.from_pretrained(tmp_path / "st").encode(SENTENCES, batch_size=3)
    assert_matches(ours, theirs)


# ----------------------------------------------------------------------------- bad arguments, bad folders

def test_batch_size_zero(encoders):
    with pytest.raises(ValueError, match="batch_size"):
        encoders[None].encode(SENTENCES, batch_size=0)


@pytest.mark.parametrize("sentences", [["fine", 3], [None], [b"bytes"]], ids=["int", "None", "bytes"])
def test_non_string_sentence(encoders, sentences):
    with pytest.raises(TypeError, match="sentences"):
        encoders[None].encode(sentences)


def test_unsupported_module_names_modules_json(small_bert, tmp_path):
    folder = write_legacy_folder(tmp_path / "st", small_bert, "mean", normalize=False)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match=f"{folder / 'modules.json'}.*sentence_transformers.models.Dense"):
        SentenceEncoder.from_pretrained(folder)


def test_max_pooling_names_the_pooling_config(small_bert, tmp_path):
    folder = write_legacy_folder(tmp_path / "st", small_bert, "mean", normalize=False)
    config_path = folder / "1_Pooling" / "config.json"
    config = json.loads(config_path.read_text())
    config |= {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{config_path}.*max"):
        SentenceEncoder.from_pretrained(folder)
