"""ELMo against the original TensorFlow bilm's outputs on AllenNLP's fixture (tests/fixtures/elmo, Apache-2.0, see
its SOURCE.md) on every CPU backend, and against a float64 biLM written from bilm-tf's equations
(tests/elmo_reference.py): the char-CNN, the clipped projected cells, skip connections on and off, the stateful
rules, gradients, the vocabulary cache and the scalar mix."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from elmo_reference import ReferenceBiLm
from helpers import BACKEND_DEVICES, require_backend
from ctxkern import models
from ctxkern.models import batch_to_ids
from ctxkern.models.elmo import ScalarMix, remove_sentence_boundaries

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "elmo"
OPTIONS, WEIGHTS = FIXTURES / "options.json", FIXTURES / "lm_weights.hdf5"
SENTENCES = json.loads((FIXTURES / "sentences.json").read_text())
SHORT = [["The", "cat", "sat", "."], ["Él", "comió"], [], ["a", "b", "c", "d", "e", "f"]]


def tf_expected(k: int, i: int) -> np.ndarray:
    """bilm-tf's top layer for sentence k of batch i: (T, 2P), forward half then backward half."""
    with h5py.File(FIXTURES / f"lm_embeddings_{k}.hdf5", "r") as fin:
        forward, backward = fin[str(i)][...]
    return np.concatenate((forward, backward), axis=-1)


def assert_f64_close(got, ref, tol=1e-5):
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


@pytest.fixture(scope="module")
def reference():
    return ReferenceBiLm(OPTIONS, WEIGHTS)


# ----------------------------------------------------------------------------------------------- TensorFlow

@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES])
def test_stateful_bilm_reproduces_tensorflow_outputs(backend, device):
    """The 10 batches of 3, in order, through one stateful biLM: the top layer of sentences 0 and 1 of each batch
    equals bilm-tf's within rtol 1e-5, atol 1e-6 (what SOURCE.md prescribes)."""
    require_backend(backend)
    bilm = models.ElmoBiLm(OPTIONS, WEIGHTS, device=device, backend=backend)
    for i in range(10):
        batch = [SENTENCES[k][i].split() for k in range(3)]
        out = bilm(batch_to_ids(batch).to(device))
        top, mask = remove_sentence_boundaries(out["activations"][2], out["mask"])
        assert mask.sum(1).tolist() == [len(s) for s in batch]
        for k in range(2):
            got = top[k, :len(batch[k])].cpu().numpy()
            np.testing.assert_allclose(got, tf_expected(k, i), rtol=1e-5, atol=1e-6, err_msg=f"batch {i} row {k}")


def test_char_cnn_reproduces_tensorflow_token_embeddings():
    words = (FIXTURES / "vocab_test.txt").read_text(encoding="utf-8").strip().split("\n")
    with h5py.File(FIXTURES / "elmo_token_embeddings.hdf5", "r") as fin:
        expected = fin["embedding"][...]
    assert len(words) == expected.shape[0] and any(len(w.encode()) > len(w) for w in words)
    bilm = models.ElmoBiLm(OPTIONS, WEIGHTS)
    ids = batch_to_ids([words])  # one "sentence" of every word: the char-CNN sees each token alone
    embedded, mask = bilm._token_embedder(ids)
    got, _ = remove_sentence_boundaries(embedded, mask)
    np.testing.assert_allclose(got[0].detach().numpy(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- float64 pieces

@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("words", [["Hello", "wörld", "", "<S>", "</S>"], ["a", "x" * 60, "Hello"], ["x" * 44]],
                         ids=["short", "full-length", "span-44"])
def test_char_cnn_highway_projection_match_float64_equations(tmp_path, activation, words):
    """Short words only (the convolutions stop after the longest word, the padding windows are one value), a
    word that fills all 50 characters, and one whose span leaves some filters no all-padding window."""
    options = json.loads(OPTIONS.read_text())
    options["char_cnn"]["activation"] = activation
    (tmp_path / "options.json").write_text(json.dumps(options))
    bilm = models.ElmoBiLm(tmp_path / "options.json", WEIGHTS, dtype=torch.float64)
    ids = batch_to_ids([words])[0]  # (N, 50)
    got = bilm._token_embedder.embed_tokens(ids)
    ref = ReferenceBiLm(tmp_path / "options.json", WEIGHTS)
    assert_f64_close(got, torch.stack([ref.embed_token(row.tolist()) for row in ids]), 1e-12)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no_skip"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bilm_matches_float64_equations(reference, tmp_path, skip, backend):
    """Every layer of a batch with sentences of different lengths (and an empty one) against the float64
    biLM; without skip connections through an options file that says so (bilm-tf supports both)."""
    options = json.loads(OPTIONS.read_text())
    options["lstm"]["use_skip_connections"] = skip
    (tmp_path / "options.json").write_text(json.dumps(options))
    ref = ReferenceBiLm(tmp_path / "options.json", WEIGHTS)
    bilm = models.ElmoBiLm(tmp_path / "options.json", WEIGHTS, stateful=False, backend=backend)
    ids = batch_to_ids(SHORT)
    out = bilm(ids)
    steps = ids.shape[1] + 2
    for b, sentence in enumerate(SHORT):
        layers, _ = ref.sentence(ids[b, :len(sentence)].tolist())
        n = len(sentence) + 2
        assert out["mask"][b].tolist() == [True] * n + [False] * (steps - n)
        for got, want in zip(out["activations"], layers, strict=True):
            assert_f64_close(got[b, :n], want)
            assert not got[b, n:].any(), "positions past </S> must be zero"


def test_the_clips_matter_for_the_tensorflow_outputs(tmp_path):
    """Without cell_clip and proj_clip (0: none) the fixture's first batch no longer matches bilm-tf's: the
    clipped cells are exercised by the parity test above."""
    options = json.loads(OPTIONS.read_text())
    options["lstm"]["cell_clip"] = options["lstm"]["proj_clip"] = 0
    (tmp_path / "options.json").write_text(json.dumps(options))
    bilm = models.ElmoBiLm(tmp_path / "options.json", WEIGHTS)
    batch = [SENTENCES[k][0].split() for k in range(3)]
    out = bilm(batch_to_ids(batch))
    top, _ = remove_sentence_boundaries(out["activations"][2], out["mask"])
    assert not np.allclose(top[0, :len(batch[0])].numpy(), tf_expected(0, 0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- stateful rules

def _rows(out, b, n):
    return [layer[b, :n + 2] for layer in out["activations"]]


def test_stateful_rules_grow_shrink_reset(reference):
    """Row k's final states start row k's next sentence; a smaller batch uses and updates only its first rows
    (the others keep theirs), a larger one starts its new rows from zeros; reset_states() starts over."""
    bilm = models.ElmoBiLm(OPTIONS, WEIGHTS)
    a, b, c, d = ["one", "two"], ["three"], ["four", "five", "six"], ["seven"]
    state = {k: None for k in range(4)}

    def check(batch):
        out = bilm(batch_to_ids(batch))
        for row, sentence in enumerate(batch):
            layers, state[row] = reference.sentence(batch_to_ids([sentence])[0].tolist(), state[row])
            for got, want in zip(_rows(out, row, len(sentence)), layers):
                assert_f64_close(got, want)

    check([a, b, c])        # from zeros
    check([d, a])           # shrink: rows 0, 1 continue; row 2 keeps its state
    check([b, c, d])        # row 2 resumes from the first call's state
    check([a, b, c, d])     # grow: row 3 starts from zeros
    bilm.reset_states()
    state = {k: None for k in range(4)}
    check([c])


def test_rows_a_batch_did_not_run_keep_their_states():
    """AllenNLP's _update_states: a row whose layer-0 final state is exactly zero (not run) keeps its stored
    state, as do the rows beyond a smaller batch."""
    lstm = models.ElmoBiLm(OPTIONS, WEIGHTS)._elmo_lstm
    h1, c1 = torch.randn(2, 3, 32), torch.randn(2, 3, 128)
    lstm._update_states(h1, c1)
    h2, c2 = torch.randn(2, 2, 32), torch.randn(2, 2, 128)
    h2[0, 1] = 0
    c2[0, 1] = 0
    lstm._update_states(h2, c2)
    assert torch.equal(lstm._state_h, torch.stack([h2[:, 0], h1[:, 1], h1[:, 2]], 1))
    assert torch.equal(lstm._state_c, torch.stack([c2[:, 0], c1[:, 1], c1[:, 2]], 1))


def test_stateless_mode_and_states_follow_to():
    stateless = models.ElmoBiLm(OPTIONS, WEIGHTS, stateful=False)
    ids = batch_to_ids(SHORT)
    first, second = stateless(ids)["activations"][2], stateless(ids)["activations"][2]
    assert torch.equal(first, second)
    stateful = models.ElmoBiLm(OPTIONS, WEIGHTS)
    assert torch.equal(stateful(ids)["activations"][2], first)  # a fresh stateful biLM starts from zeros
    assert not torch.equal(stateful(ids)["activations"][2], first)  # ... and then carries its states
    stateful.to(torch.float64)
    assert stateful._elmo_lstm._state_h.dtype == torch.float64
    assert stateful(ids)["activations"][2].dtype == torch.float64


# ----------------------------------------------------------------------------------------------- gradients, cache

def test_gradients_match_float64_equations(reference):
    """requires_grad=True: the gradient of a loss over every layer with respect to the character embeddings
    (it flows through the LSTMs, the highways and the convolutions) against the float64 biLM's."""
    ref = ReferenceBiLm(OPTIONS, WEIGHTS, requires_grad=True)
    bilm = models.ElmoBiLm(OPTIONS, WEIGHTS, requires_grad=True, stateful=False, dtype=torch.float64)
    batch = [["Grad", "ient", "s"], ["ok"]]
    ids = batch_to_ids(batch)
    out = bilm(ids)
    loss = sum((layer ** 2).sum() for layer in out["activations"])
    loss.backward()
    ref_loss = 0
    for b, sentence in enumerate(batch):
        layers, _ = ref.sentence(ids[b, :len(sentence)].tolist())
        ref_loss = ref_loss + sum((layer ** 2).sum() for layer in layers)
    ref_loss.backward()
    grad = bilm._token_embedder._char_embedding_weights.grad
    assert_f64_close(grad[1:], ref.w["char_embed"].grad, 1e-9)
    assert not grad[0].any(), "the padding row gets no gradient (it embeds nothing)"
    for name, param in bilm.named_parameters():
        if name.endswith("bias_ih_l0"):
            assert not param.requires_grad and not param.any()
        else:
            assert param.requires_grad and param.grad is not None, name
    frozen = models.ElmoBiLm(OPTIONS, WEIGHTS)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_vocabulary_cache_equals_char_cnn():
    words = ["pad", "The", "cat", "sat", "comió", "."]
    cached = models.ElmoBiLm(OPTIONS, WEIGHTS, vocab_to_cache=words, stateful=False)
    plain = models.ElmoBiLm(OPTIONS, WEIGHTS, stateful=False)
    assert torch.allclose(cached._word_embedding.weight, plain._token_embedder.embed_tokens(batch_to_ids([words])[0]),
                          rtol=0, atol=1e-6)
    batch = [["The", "cat", "sat", "."], ["comió"]]
    word_ids = torch.tensor([[words.index(w) for w in s] + [0] * (4 - len(s)) for s in batch])
    ids = batch_to_ids(batch)
    with_cache, without = cached(ids, word_ids), plain(ids)
    assert torch.equal(with_cache["mask"], without["mask"])
    for got, want in zip(with_cache["activations"], without["activations"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ids outside the cached list fall back to the char-CNN (AllenNLP's rule)
    fallback = cached(ids, word_ids + 100)
    for got, want in zip(fallback["activations"], without["activations"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- batch_to_ids

def _word(*ids):
    """A token's 50 ids from AllenNLP's rules: begin-of-word 258, the bytes, end-of-word 259, padding 260; +1."""
    raw = [258, *ids, 259] + [260] * (48 - len(ids))
    return [c + 1 for c in raw]


def test_batch_to_ids_follows_allennlp_character_rules():
    ids = batch_to_ids([["Second", "é", ""], [], ["<S>", "</S>"], ["x" * 49 + "é"]])
    assert ids.dtype == torch.long and ids.shape == (4, 3, 50)
    # AllenNLP's own indexer test spells "Second" as 259, 84, 102, 100, 112, 111, 101, 260, then 261s
    assert ids[0, 0].tolist() == [259, 84, 102, 100, 112, 111, 101, 260] + [261] * 42
    assert ids[0, 1].tolist() == _word(0xC3, 0xA9)  # the two UTF-8 bytes of é
    assert ids[0, 2].tolist() == _word()  # a token of 0 characters is the two word markers
    assert not ids[1].any() and not ids[3, 1:].any()  # padding tokens are zeros
    assert ids[2, 0].tolist() == [259, 257, 260] + [261] * 47 and ids[2, 1].tolist() == [259, 258, 260] + [261] * 47
    # 50 bytes cut to 48: 48 x's, the é's bytes dropped, the end-of-word marker last, no padding left
    assert ids[3, 0].tolist() == [259] + [ord("x") + 1] * 48 + [260]
    cut = batch_to_ids([["x" * 47 + "é"]])[0, 0].tolist()
    assert cut == [259] + [ord("x") + 1] * 47 + [0xC3 + 1, 260]  # cut inside é, as AllenNLP cuts bytes
    assert batch_to_ids([[], []]).shape == (2, 0, 50)
    with pytest.raises(TypeError, match="sentences\\[0\\] must be a list of str tokens"):
        batch_to_ids(["not tokenized"])
    with pytest.raises(TypeError, match="a token must be a str"):
        batch_to_ids([["ok", 3]])


# ----------------------------------------------------------------------------------------------- Elmo

def test_elmo_scalar_mix_with_layer_norm_matches_float64_equations():
    elmo = models.Elmo(OPTIONS, WEIGHTS, 2, do_layer_norm=True, dropout=0.0, stateful=False,
                       dtype=torch.float64)
    with torch.no_grad():
        for k, v in enumerate([0.3, -1.0, 2.0]):
            elmo.scalar_mix_1.scalar_parameters[k].fill_(v)
        elmo.scalar_mix_1.gamma.fill_(1.7)
    ids = batch_to_ids(SHORT)
    out = elmo(ids)
    bilm = elmo._elmo_lstm(ids)
    layers, mask = [t.detach().numpy() for t in bilm["activations"]], bilm["mask"].numpy()
    m = mask[..., None].astype(np.float64)
    count = m.sum() * layers[0].shape[-1]
    w = np.exp([0.3, -1.0, 2.0]) / np.exp([0.3, -1.0, 2.0]).sum()
    mixed = 0
    for weight, x in zip(w, layers):
        mean = (x * m).sum() / count  # over the whole batch's real tokens, not per token
        var = (((x * m) - mean) * m) ** 2
        mixed = mixed + weight * (x - mean) / np.sqrt(var.sum() / count + 1e-13)
    mixed = 1.7 * mixed
    expected, expected_mask = remove_sentence_boundaries(torch.from_numpy(mixed), torch.from_numpy(mask))
    assert torch.equal(out["mask"], expected_mask)
    assert_f64_close(out["elmo_representations"][1], expected, 1e-12)
    assert len(out["elmo_representations"]) == 2


def test_elmo_api_names_shapes_and_boundaries():
    elmo = models.Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, stateful=False)
    names = set(dict(elmo.named_parameters()))
    assert {"scalar_mix_0.scalar_parameters.0", "scalar_mix_0.scalar_parameters.2", "scalar_mix_0.gamma",
            "_elmo_lstm._token_embedder._char_embedding_weights",
            "_elmo_lstm._token_embedder.char_conv_0.weight",
            "_elmo_lstm._token_embedder._highways._layers.1.weight"} <= names
    ids = batch_to_ids(SHORT)
    out = elmo(ids)
    (rep,) = out["elmo_representations"]
    assert rep.shape == (4, 6, 32) and out["mask"].dtype == torch.bool
    assert out["mask"].sum(1).tolist() == [len(s) for s in SHORT]
    # equal mixing weights at init: the mean of the three layers
    bilm = elmo._elmo_lstm(ids)
    mean = sum(bilm["activations"]) / 3
    torch.testing.assert_close(rep, remove_sentence_boundaries(mean, bilm["mask"])[0])
    kept = models.Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, keep_sentence_boundaries=True, stateful=False)(ids)
    assert kept["elmo_representations"][0].shape == (4, 8, 32) and kept["mask"].shape == (4, 8)
    # 4-D input: leading dims flattened and restored (AllenNLP)
    four = elmo(ids.view(2, 2, *ids.shape[1:]))
    torch.testing.assert_close(four["elmo_representations"][0], rep.view(2, 2, 6, 32))
    assert four["mask"].shape == (2, 2, 6)
    fixed = models.Elmo(OPTIONS, WEIGHTS, 1, scalar_mix_parameters=[0.0, 0.0, 1.0])
    assert not fixed.scalar_mix_0.gamma.requires_grad
    with pytest.raises(ValueError, match="scalar_mix_parameters must have 3 values"):
        models.Elmo(OPTIONS, WEIGHTS, 1, scalar_mix_parameters=[1.0])


def test_elmo_loads_allennlp_named_state_dict():
    """A state_dict with AllenNLP's LstmCellWithProjection names (input_linearity, state_linearity,
    state_projection) loads: what a downstream model trained with AllenNLP saved."""
    source = models.Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, stateful=False)
    renames = {"weight_ih_l0": "input_linearity.weight", "weight_hh_l0": "state_linearity.weight",
               "bias_hh_l0": "state_linearity.bias", "weight_hr_l0": "state_projection.weight"}
    allennlp = {}
    for key, value in source.state_dict().items():
        if key.endswith("bias_ih_l0"):
            continue  # AllenNLP has no such tensor
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        allennlp[key] = value.clone() * (1.5 if "input_linearity" in key else 1.0)
    target = models.Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0, stateful=False)
    target.load_state_dict(allennlp)
    assert torch.equal(target._elmo_lstm._elmo_lstm.forward_layer_1.weight_ih_l0,
                       1.5 * source._elmo_lstm._elmo_lstm.forward_layer_1.weight_ih_l0)


# ----------------------------------------------------------------------------------------------- ElmoEmbedder

def test_elmo_embedder_and_embed_file(tmp_path):
    embedder = models.ElmoEmbedder(OPTIONS, WEIGHTS, batch_size=2)
    vectors = embedder.embed_sentence(["The", "cat", "sat"])
    assert vectors.shape == (3, 3, 32) and vectors.dtype == np.float32
    assert embedder.embed_sentence([]).shape == (3, 0, 32)
    lines = ["The cat sat .", "Él comió", "a b c"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fresh = models.ElmoEmbedder(OPTIONS, WEIGHTS, batch_size=2)
    expected = list(fresh.embed_sentences([s.split() for s in lines]))
    models.ElmoEmbedder(OPTIONS, WEIGHTS, batch_size=2).embed_file(tmp_path / "in.txt", tmp_path / "out.hdf5",
                                                                   progress=False)
    with h5py.File(tmp_path / "out.hdf5", "r") as fin:
        assert sorted(fin) == ["0", "1", "2", "sentence_to_index"]
        assert json.loads(fin["sentence_to_index"][0]) == {s: str(i) for i, s in enumerate(lines)}
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(fin[str(i)][...], want)
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"empty lines at indexes \[1\]"):
        embedder.embed_file(tmp_path / "blank.txt", tmp_path / "x.hdf5", progress=False)


# ----------------------------------------------------------------------------------------------- bad input

def _copy_weights(tmp_path, edit):
    path = tmp_path / "weights.hdf5"
    shutil.copyfile(WEIGHTS, path)
    with h5py.File(path, "r+") as fout:
        edit(fout)
    return path


def test_bad_files_name_the_file_and_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: no such ELMo options file"):
        models.ElmoBiLm(tmp_path / "nope.json", WEIGHTS)
    with pytest.raises(FileNotFoundError, match="nope.hdf5: no such ELMo weight file"):
        models.ElmoBiLm(OPTIONS, tmp_path / "nope.hdf5")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(models.CheckpointError, match="bad.json: not readable JSON"):
        models.ElmoBiLm(tmp_path / "bad.json", WEIGHTS)
    (tmp_path / "partial.json").write_text(json.dumps({"lstm": {"dim": 64}, "char_cnn": {"embedding": {"dim": 4}}}))
    with pytest.raises(models.CheckpointError, match="partial.json: .*filters"):
        models.ElmoBiLm(tmp_path / "partial.json", WEIGHTS)
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(models.CheckpointError, match="text.hdf5: not a readable hdf5 weight file"):
        models.ElmoBiLm(OPTIONS, tmp_path / "text.hdf5")
    missing = _copy_weights(tmp_path, lambda f: f.__delitem__("CNN_high_1/W_carry"))
    with pytest.raises(models.CheckpointError, match="weights.hdf5: missing dataset 'CNN_high_1/W_carry'"):
        models.ElmoBiLm(OPTIONS, missing)


def test_wrong_shapes_and_mismatched_options(tmp_path):
    def reshape(f):
        del f["RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0"]
        f["RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0"] = np.zeros((64, 8), dtype=np.float32)

    wrong = _copy_weights(tmp_path, reshape)
    with pytest.raises(models.CheckpointError, match=r"dataset 'RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0' has "
                                                     r"shape \(64, 8\), .*options.json implies \(64, 16\)"):
        models.ElmoBiLm(OPTIONS, wrong)
    options = json.loads(OPTIONS.read_text())
    options["lstm"]["projection_dim"] = 32
    (tmp_path / "options.json").write_text(json.dumps(options))
    with pytest.raises(models.CheckpointError, match=r"lm_weights.hdf5: dataset 'CNN_proj/W_proj' has shape "
                                                     r"\(124, 16\), .*options.json implies \(124, 32\)"):
        models.ElmoBiLm(tmp_path / "options.json", WEIGHTS)


def test_bad_inputs_and_edge_cases():
    bilm = models.ElmoBiLm(OPTIONS, WEIGHTS, stateful=False)
    ids = batch_to_ids([["a"]])
    with pytest.raises(ValueError, match=r"character_ids must lie in \[0, 261\]"):
        bilm(ids + 300)
    with pytest.raises(ValueError, match=r"character_ids must lie in \[0, 261\]"):
        bilm(ids - 300)
    with pytest.raises(ValueError, match="character_ids must be an integer tensor"):
        bilm(ids.float())
    with pytest.raises(ValueError, match=r"character_ids must have shape \(B, T, 50\)"):
        bilm(ids[0])
    with pytest.raises(ValueError, match=r"character_ids must have shape \(B, T, 50\)"):
        bilm(ids[..., :10])
    with pytest.raises(ValueError, match="character_ids must be"):
        models.Elmo(OPTIONS, WEIGHTS, 1)(ids[0])
    # an empty sentence is <S> </S>; a batch of only empty sentences too; an empty batch gives empty outputs
    empty = bilm(batch_to_ids([[], []]))
    assert empty["mask"].tolist() == [[True, True]] * 2 and empty["activations"][2].shape == (2, 2, 32)
    nothing = bilm(torch.zeros(0, 3, 50, dtype=torch.long))
    assert nothing["activations"][1].shape == (0, 5, 32) and nothing["mask"].shape == (0, 5)
    out = models.Elmo(OPTIONS, WEIGHTS, 1, dropout=0.0)(batch_to_ids([[], ["word"]]))
    assert out["mask"].tolist() == [[False], [True]] and not out["elmo_representations"][0][0].any()
    with pytest.raises(ValueError, match="backend must be one of"):
        models.ElmoBiLm(OPTIONS, WEIGHTS, backend="gpu")
