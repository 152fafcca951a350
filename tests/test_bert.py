"""models.Bert against Hugging Face's transformers.BertModel: the bundled all-MiniLM-L6-v2 on real tokenized
sentences, small random configurations saved by save_pretrained in every checkpoint form, every CPU backend,
gradients, and the errors of bad checkpoints and bad inputs."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import bundled_model_folder, require_backend
from ctxkern.models import Bert, CheckpointError
from ctxkern.models.bert import BertConfig
from random_hf import randomize

# Sentences of different lengths, with punctuation, accents, CJK and an emoji for the tokenizer.
SENTENCES = [
    "The cat sat on the mat.",
    "A considerably longer sentence about fused kernels, attention over padded batches and LayerNorm.",
    "Hi",
    "Déjà vu — a naïve café in 東京 🙂",
    "Contextual embeddings map every token to a vector that depends on its neighbours.",
]
SECOND_SEGMENTS = ["Where did it sit?", "Why fuse them?", "Hello there, how are you?", "Un café.", "Which ones?"]
MINILM_ATOL = 1e-4          # the task's bound on the real model (fp32, 6 layers)
SMALL_ATOL = 1e-5           # small random models: 2 or 3 layers of width 64


def real_token_error(ours, theirs, mask):
    """Max abs difference over real tokens only: Hugging Face's states at padding positions are meaningless."""
    return (ours - theirs)[mask.bool()].abs().max().item()


# ----------------------------------------------------------------------------- the bundled all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm_path():
    return bundled_model_folder()


@pytest.fixture(scope="module")
def hf_minilm(minilm_path):
    return transformers.BertModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    """Our model for each padding_free setting."""
    return {padding_free: Bert.from_pretrained(minilm_path, padding_free=padding_free)
            for padding_free in (None, True, False)}


def tokenized(tokenizer, kind):
    if kind == "padded":
        return tokenizer(SENTENCES, padding=True, return_tensors="pt")
    if kind == "pairs":                                    # token_type_ids 1 on the second segment
        return tokenizer(SENTENCES, SECOND_SEGMENTS, padding=True, return_tensors="pt")
    # Every sentence but "Hi" has at least 6 tokens, so truncating them to 6 leaves a batch without padding.
    batch = tokenizer(SENTENCES[:2] + SENTENCES[3:], truncation=True, max_length=6, padding=True,
                      return_tensors="pt")
    assert batch["attention_mask"].all()
    return batch


@pytest.mark.parametrize("padding_free", [None, True, False], ids=["default", "padding-free", "padded"])
@pytest.mark.parametrize("kind", ["padded", "pairs", "no-padding"])
def test_minilm_matches_transformers(minilm, hf_minilm, tokenizer, padding_free, kind):
    batch = tokenized(tokenizer, kind)
    if kind == "pairs":
        assert batch["token_type_ids"].any()
    with torch.inference_mode():
        theirs = hf_minilm(**batch)
        ours = minilm[padding_free](batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert ours.last_hidden_state.shape == theirs.last_hidden_state.shape
    assert real_token_error(ours.last_hidden_state, theirs.last_hidden_state, batch["attention_mask"]) < MINILM_ATOL
    assert (ours.pooler_output - theirs.pooler_output).abs().max() < MINILM_ATOL
    if padding_free and kind != "no-padding":
        padding = ~batch["attention_mask"].bool()
        assert padding.any() and (ours.last_hidden_state[padding] == 0).all(), "padding positions must be zeros"


def test_minilm_without_attention_mask_matches_transformers(minilm, hf_minilm, tokenizer):
    batch = tokenized(tokenizer, "no-padding")
    with torch.inference_mode():
        theirs = hf_minilm(batch["input_ids"])
        ours = minilm[None](batch["input_ids"])
    assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max() < MINILM_ATOL
    assert (ours.pooler_output - theirs.pooler_output).abs().max() < MINILM_ATOL


def test_minilm_padding_free_and_padded_paths_agree(minilm, tokenizer):
    batch = tokenized(tokenizer, "pairs")
    args = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    with torch.inference_mode():
        packed, padded = minilm[True](*args), minilm[False](*args)
    assert real_token_error(packed.last_hidden_state, padded.last_hidden_state, batch["attention_mask"]) < 1e-5
    assert (packed.pooler_output - padded.pooler_output).abs().max() < 1e-5


def test_minilm_forward_packed_equals_padded_per_sentence(minilm, hf_minilm, tokenizer):
    batch = tokenized(tokenizer, "pairs")
    lengths = batch["attention_mask"].sum(1)
    real = batch["attention_mask"].bool()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    with torch.inference_mode():
        packed = minilm[None].forward_packed(batch["input_ids"][real], cu_seqlens, int(lengths.max()),
                                             batch["token_type_ids"][real])
        padded = minilm[False](batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert packed.shape == (int(lengths.sum()), hf_minilm.config.hidden_size)
    for b, n in enumerate(lengths.tolist()):
        sentence = packed[cu_seqlens[b]:cu_seqlens[b + 1]]
        assert (sentence - padded.last_hidden_state[b, :n]).abs().max() < 1e-5, f"sentence {b}"


# ----------------------------------------------------------------------------- small random checkpoints

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=32)
CHECKPOINT_KINDS = ["safetensors", "pytorch-bin", "sharded", "gamma-beta", "sequence-classification", "no-pooler"]


def save_small(folder, kind, hidden_act="gelu"):
    """A random Hugging Face checkpoint in `folder`; returns the BertModel holding the same weights."""
    config = transformers.BertConfig(**SMALL, hidden_act=hidden_act)
    if kind == "sequence-classification":
        full = randomize(transformers.BertForSequenceClassification(config).eval())
        full.save_pretrained(folder)
        return full.bert
    model = randomize(transformers.BertModel(config, add_pooling_layer=kind != "no-pooler").eval())
    if kind in ("pytorch-bin", "gamma-beta"):
        # transformers 5 always writes safetensors (safe_serialization=False is gone); this is the config.json
        # and pytorch_model.bin that save_pretrained(safe_serialization=False) wrote before it. Old BERT
        # checkpoints (TensorFlow ports) name LayerNorm's parameters gamma and beta.
        state = model.state_dict()
        if kind == "gamma-beta":
            state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                     for k, v in state.items()}
        config.save_pretrained(folder)
        torch.save(state, folder / "pytorch_model.bin")
    elif kind == "sharded":                                # model.safetensors.index.json and several shards
        model.save_pretrained(folder, max_shard_size="100KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:
        model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    """(hidden_act, kind) -> (folder, the Hugging Face model), saved once for the module."""
    root = tmp_path_factory.mktemp("small_bert")
    checkpoints = {}
    for act in ("gelu", "gelu_new"):
        for kind in CHECKPOINT_KINDS:
            folder = root / f"{act}-{kind}"
            checkpoints[act, kind] = folder, save_small(folder, kind, act)
    return checkpoints


def small_batch(seed=0, batch=3, length=9):
    """Random ids, token types and a right-padded mask with sentences of different lengths (one full)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (batch, length), generator=g)
    token_types = torch.randint(0, 2, (batch, length), generator=g)
    lengths = torch.tensor([length, 4, 1][:batch])
    mask = (torch.arange(length) < lengths[:, None]).long()
    return ids, mask, token_types


@pytest.mark.parametrize("padding_free", [None, True, False], ids=["default", "padding-free", "padded"])
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_small_checkpoint_matches_transformers(small_checkpoints, hidden_act, kind, padding_free):
    folder, hf = small_checkpoints[hidden_act, kind]
    ids, mask, token_types = small_batch()
    model = Bert.from_pretrained(folder, padding_free=padding_free)
    with torch.inference_mode():
        theirs, ours = hf(ids, mask, token_types), model(ids, mask, token_types)
    assert real_token_error(ours.last_hidden_state, theirs.last_hidden_state, mask) < SMALL_ATOL
    if kind == "no-pooler":
        assert ours.pooler_output is None and theirs.pooler_output is None
    else:
        assert (ours.pooler_output - theirs.pooler_output).abs().max() < SMALL_ATOL


@pytest.mark.parametrize("padding_free", [None, True, False], ids=["default", "padding-free", "padded"])
def test_small_left_padding_and_an_all_padding_row(small_checkpoints, padding_free):
    """Real tokens match wherever the padding sits; a sentence with no token gives no NaN (zeros padding-free)."""
    folder, hf = small_checkpoints["gelu", "safetensors"]
    ids, _, token_types = small_batch(seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                        # left padding: position 0 is padding
    mask[2] = 0                                            # no token at all
    model = Bert.from_pretrained(folder, padding_free=padding_free)
    with torch.inference_mode():
        theirs, ours = hf(ids, mask, token_types), model(ids, mask, token_types)
    assert not ours.last_hidden_state.isnan().any() and not ours.pooler_output.isnan().any()
    assert real_token_error(ours.last_hidden_state, theirs.last_hidden_state, mask) < SMALL_ATOL
    # The pooler reads position 0, which is a real token only in row 1.
    assert (ours.pooler_output[1] - theirs.pooler_output[1]).abs().max() < SMALL_ATOL
    if padding_free is not False:
        assert (ours.last_hidden_state[~mask.bool()] == 0).all()


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_small_checkpoint_every_backend_matches_transformers(small_checkpoints, backend, padding_free):
    require_backend(backend)
    folder, hf = small_checkpoints["gelu_new", "safetensors"]
    ids, mask, token_types = small_batch(seed=1)
    model = Bert.from_pretrained(folder, backend=backend, padding_free=padding_free)
    with torch.inference_mode():
        theirs, ours = hf(ids, mask, token_types), model(ids, mask, token_types)
    assert real_token_error(ours.last_hidden_state, theirs.last_hidden_state, mask) < SMALL_ATOL
    assert (ours.pooler_output - theirs.pooler_output).abs().max() < SMALL_ATOL


def test_float64_is_refused_at_load_naming_dtype(small_checkpoints):
    """The kernels take fp32, fp16 and bf16; a float64 model is refused when loaded, not deep in a forward."""
    folder, _ = small_checkpoints["gelu", "safetensors"]
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        Bert.from_pretrained(folder, dtype=torch.float64)


def hf_gradient(hf, name):
    """The gradient of our parameter `name` from Hugging Face's parameters (our qkv = cat(query, key, value))."""
    grads = dict((n, p.grad) for n, p in hf.named_parameters())
    layer, _, kind = name.partition(".qkv.")
    if kind:
        n = layer.removeprefix("layers.")
        return torch.cat([grads[f"encoder.layer.{n}.attention.self.{p}.{kind}"] for p in ("query", "key", "value")])
    hf_name = {"layers.1.attention_norm.weight": "encoder.layer.1.attention.output.LayerNorm.weight",
               "layers.2.output.weight": "encoder.layer.2.output.dense.weight",
               "layers.2.output_norm.bias": "encoder.layer.2.output.LayerNorm.bias"}.get(name, name)
    return grads[hf_name]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_small_gradients_match_transformers(small_checkpoints, padding_free):
    folder, hf = small_checkpoints["gelu", "safetensors"]
    model = Bert.from_pretrained(folder, padding_free=padding_free)
    ids, mask, token_types = small_batch(seed=3)
    # A loss over real tokens only (HF's padding states are meaningless) and the pooler.
    g = torch.Generator().manual_seed(4)
    token_weights = torch.randn(*ids.shape, SMALL["hidden_size"], generator=g) * mask[..., None]
    pooler_weights = torch.randn(ids.shape[0], SMALL["hidden_size"], generator=g)

    def loss(out):
        return (out.last_hidden_state * token_weights).sum() + (out.pooler_output * pooler_weights).sum()

    hf.zero_grad()
    loss(hf(ids, mask, token_types)).backward()
    loss(model(ids, mask, token_types)).backward()
    ours = dict(model.named_parameters())
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.LayerNorm.weight", "layers.0.qkv.weight", "layers.0.qkv.bias",
                 "layers.1.attention_norm.weight", "layers.2.output.weight", "layers.2.output_norm.bias",
                 "pooler.dense.weight"):
        theirs = hf_gradient(hf, name)
        scale = theirs.abs().max().item()
        assert scale > 0, name
        err = (ours[name].grad - theirs).abs().max().item()
        assert err <= 1e-5 * max(1.0, scale), f"{name}: max error {err:.3g} (gradient scale {scale:.3g})"


# ----------------------------------------------------------------------------- bad checkpoints, bad inputs

@pytest.fixture
def good_checkpoint(small_checkpoints, tmp_path):
    """A private copy of a valid safetensors checkpoint, for a test to break."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(small_checkpoints["gelu", "safetensors"][0], folder)
    return folder


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        Bert.from_pretrained(tmp_path / "nowhere")


def test_folder_without_config_is_named(good_checkpoint):
    (good_checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{good_checkpoint}.*config.json"):
        Bert.from_pretrained(good_checkpoint)


def test_folder_without_weights_is_named(good_checkpoint):
    (good_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{good_checkpoint}.*no weights.*model.safetensors"):
        Bert.from_pretrained(good_checkpoint)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights_name_the_file(small_checkpoints, tmp_path, weights):
    kind = "safetensors" if weights == "model.safetensors" else "pytorch-bin"
    folder = tmp_path / kind
    shutil.copytree(small_checkpoints["gelu", kind][0], folder)
    path = folder / weights
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated or corrupt"):
        Bert.from_pretrained(folder)


def test_corrupt_weights_name_the_file(good_checkpoint):
    # safetensors has no checksum, so the bytes overwritten are the header's: its length and the JSON after it.
    path = good_checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:64] = torch.randint(0, 256, (64,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*truncated or corrupt"):
        Bert.from_pretrained(good_checkpoint)


def test_renamed_tensor_is_named_missing(good_checkpoint):
    name = "encoder.layer.1.attention.self.key.weight"
    edit_tensors(good_checkpoint, lambda t: t.__setitem__("encoder.layer.1.attention.self.keys.weight", t.pop(name)))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        Bert.from_pretrained(good_checkpoint)


def test_wrong_shape_names_the_tensor_and_both_shapes(good_checkpoint):
    edit_config(good_checkpoint, intermediate_size=80)
    with pytest.raises(CheckpointError) as err:
        Bert.from_pretrained(good_checkpoint)
    message = str(err.value)
    assert "model.safetensors" in message and "encoder.layer.0.intermediate.dense.weight" in message
    assert "(96, 64)" in message and "(80, 64)" in message


def test_unexpected_tensor_is_named(good_checkpoint):
    path = edit_tensors(good_checkpoint, lambda t: t.__setitem__("encoder.layer.0.adapter.weight", torch.ones(4)))
    with pytest.raises(CheckpointError, match=f"{path}.*unexpected tensor 'encoder.layer.0.adapter.weight'"):
        Bert.from_pretrained(good_checkpoint)


def test_config_that_is_not_json_is_named(good_checkpoint):
    (good_checkpoint / "config.json").write_text("{ hidden_size: 64,")
    with pytest.raises(CheckpointError, match=f"{good_checkpoint / 'config.json'}.*not readable JSON"):
        Bert.from_pretrained(good_checkpoint)


@pytest.fixture(scope="module")
def small_model(small_checkpoints):
    return Bert.from_pretrained(small_checkpoints["gelu", "safetensors"][0])


@pytest.mark.parametrize("shape", [(9,), (2, 3, 9)], ids=["1-D", "3-D"])
def test_input_ids_not_2d(small_model, shape):
    with pytest.raises(ValueError, match=r"input_ids must be \(B, S\)"):
        small_model(torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("argument", ["attention_mask", "token_type_ids"])
def test_mask_or_token_types_of_another_shape(small_model, argument):
    ids = torch.ones(2, 9, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{argument} must have input_ids' shape"):
        small_model(ids, **{argument: torch.ones(2, 8, dtype=torch.long)})


def test_more_positions_than_max_position_embeddings(small_model):
    ids = torch.ones(1, SMALL["max_position_embeddings"] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        small_model(ids)


@pytest.mark.parametrize("cu_seqlens", [[0, 3, 9], [0, 5, 3]], ids=["wrong-total", "decreasing"])
def test_forward_packed_bad_cu_seqlens_is_named(small_model, cu_seqlens):
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
        small_model.forward_packed(torch.ones(5, dtype=torch.long), torch.tensor(cu_seqlens, dtype=torch.int32), 5)


def test_unknown_backend_is_named(good_checkpoint):
    with pytest.raises(ValueError, match="backend.*'fastest'"):
        Bert.from_pretrained(good_checkpoint, backend="fastest")


def test_presets_are_the_models_configs():
    assert BertConfig.preset("all-MiniLM-L6-v2") == BertConfig.from_json(bundled_model_folder() / "config.json")
    hf = transformers.BertConfig()                  # transformers' defaults are bert-base-uncased's
    fields = {f: getattr(hf, f) for f in BertConfig.__dataclass_fields__}
    assert BertConfig.preset("bert-base-uncased") == BertConfig(**fields)
    with pytest.raises(ValueError, match="unknown BERT preset 'bert-huge'; known: bert-base-uncased"):
        BertConfig.preset("bert-huge")
