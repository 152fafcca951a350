"""models.Clip's inputs and folders: tokenizer ids against transformers' CLIPTokenizer (tokenizer.json, and
vocab.json + merges.txt), pixel values against transformers' CLIPImageProcessor on generated images (odd sizes,
portrait and landscape, grayscale, RGBA, palette with and without transparency, smaller than the crop), and the
errors of bad folders, bad images and bad inputs."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from ctxkern.models import CheckpointError, Clip
from random_clip import IMAGE_SIZE, bpe_vocab, save_hf_clip, save_open_clip

TEXTS = ["a photo of a cat", "", "A Small  RED\tbird!", "it's 2024's car, isn't it?", "Déjà vu — 東京 🙂",
         "the dog " * 60, "drawing123 of the photographer"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-clip")
    save_hf_clip(folder)
    return folder


@pytest.fixture(scope="module")
def clip(hf_folder):
    return Clip.from_pretrained(hf_folder, backend="cpu")


# ----------------------------------------------------------------------------- tokenizer

def test_tokenize_matches_clip_tokenizer(clip, hf_folder):
    theirs = transformers.CLIPTokenizer.from_pretrained(hf_folder)(TEXTS, padding=True, truncation=True,
                                                                    max_length=77, return_tensors="pt")
    ours = clip.tokenize(TEXTS)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["input_ids"].shape[1] == 77, "the long text is truncated to the context, its EOS kept"


def test_tokenize_from_vocab_and_merges_matches_clip_tokenizer(hf_folder, tmp_path):
    """A folder with vocab.json + merges.txt and no tokenizer.json (older CLIP repos)."""
    vocab, merges = bpe_vocab()
    folder = tmp_path / "clip"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    theirs = transformers.CLIPTokenizer(vocab=vocab, merges=merges)(TEXTS, padding=True, truncation=True,
                                                                    max_length=77, return_tensors="pt")
    ours = Clip.from_pretrained(folder, backend="cpu").tokenize(TEXTS)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])


def test_open_clip_folder_tokenizes_to_77_ids_padded_with_zero(hf_folder, tmp_path, clip):
    hf = transformers.CLIPModel.from_pretrained(hf_folder)
    save_open_clip(tmp_path / "oc", hf, hf_folder, weights="bin")
    ids = Clip.from_pretrained(tmp_path / "oc").tokenize(TEXTS)["input_ids"]
    hf_ids = clip.tokenize(TEXTS)
    expected = torch.zeros(len(TEXTS), 77, dtype=torch.long)
    expected[:, :hf_ids["input_ids"].shape[1]] = hf_ids["input_ids"] * hf_ids["attention_mask"]
    assert torch.equal(ids, expected)


# ----------------------------------------------------------------------------- preprocessing

def _images():
    rng = np.random.default_rng(0)

    def noise(h, w, c):
        return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)

    rgba = noise(37, 52, 4)
    rgba[..., 3] = rng.integers(0, 256, (37, 52))
    palette = Image.fromarray(noise(45, 31, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    return {"odd-landscape": Image.fromarray(noise(41, 67, 3)), "odd-portrait": Image.fromarray(noise(83, 31, 3)),
            "square": Image.fromarray(noise(30, 30, 3)), "large": Image.fromarray(noise(301, 257, 3)),
            "grayscale": Image.fromarray(noise(33, 48, 0), "L"), "rgba": Image.fromarray(rgba, "RGBA"),
            "palette": palette, "palette-transparent": transparent,
            "tiny": Image.fromarray(noise(5, 9, 3)), "one-pixel-high": Image.fromarray(noise(1, 40, 3))}


@pytest.mark.parametrize("name", list(_images()))
def test_preprocess_matches_clip_image_processor(clip, hf_folder, name):
    image = _images()[name]
    processor = transformers.AutoImageProcessor.from_pretrained(hf_folder)
    theirs = torch.as_tensor(np.asarray(processor(images=[image], return_tensors="np")["pixel_values"]))
    ours = clip.preprocess([image])
    assert ours.shape == theirs.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - theirs).abs().max() < 1e-5


def test_preprocess_batches_paths_and_images(clip, tmp_path):
    images = _images()
    path = tmp_path / "landscape.jpg"
    images["odd-landscape"].save(path, quality=95)
    batch = clip.preprocess([path, images["rgba"], str(path)])
    assert batch.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and batch.dtype == torch.float32
    assert torch.equal(batch[0], batch[2]) and torch.equal(batch[0], clip.preprocess(Image.open(path))[0])


def _unreadable(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "text-file":
        path.write_text("not an image")
    elif kind == "truncated-jpeg":
        good = tmp_path / "good.jpg"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
        path.write_bytes(good.read_bytes()[:400])
    return path


@pytest.mark.parametrize("kind", ["text-file", "truncated-jpeg", "missing"])
def test_unreadable_images_name_the_file(clip, tmp_path, kind):
    path = _unreadable(tmp_path, kind)
    with pytest.raises(ValueError, match=str(path)):
        clip.preprocess([path])
    with pytest.raises(ValueError, match=str(path)):
        clip.encode_image([path])


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_get_clear_errors(clip):
    with pytest.raises(ValueError, match="pixel_values must be"):
        clip.get_image_features(torch.randn(2, 3, IMAGE_SIZE + 1, IMAGE_SIZE))
    with pytest.raises(ValueError, match="input_ids has 78 positions"):
        clip.get_text_features(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        clip.get_text_features(torch.full((1, 3), 10**6))
    with pytest.raises(ValueError, match="attention_mask must have"):
        clip.get_text_features(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch_size"):
        clip.encode_text(["a"], batch_size=0)
    with pytest.raises(ValueError, match="templates"):
        clip.zero_shot([Image.new("RGB", (8, 8))], ["cat"], templates=["no placeholder"])
    assert clip.encode_text([]).shape == (0, 24) and clip.encode_image([]).shape == (0, 24)


# ----------------------------------------------------------------------------- bad folders

@pytest.fixture
def good(hf_folder, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(hf_folder, folder)
    return folder


def _edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, change, name="model.safetensors"):
    tensors = load_file(folder / name)
    change(tensors)
    save_file(tensors, folder / name)


def test_missing_config_is_named(good):
    (good / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{good}.*neither config.json.*open_clip_config.json"):
        Clip.from_pretrained(good)


def test_missing_weights_are_named(good):
    (good / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{good}.*no weights"):
        Clip.from_pretrained(good)


def test_truncated_weights_name_the_file(good):
    path = good / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated or corrupt"):
        Clip.from_pretrained(good)


def test_missing_tensor_is_named(good):
    name = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    _edit_tensors(good, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        Clip.from_pretrained(good)


def test_misshaped_tensor_names_file_tensor_and_shapes(good):
    name = "text_model.encoder.layers.0.mlp.fc1.weight"
    _edit_tensors(good, lambda t: t.__setitem__(name, torch.zeros(50, 32)))
    with pytest.raises(CheckpointError) as err:
        Clip.from_pretrained(good)
    message = str(err.value)
    assert "model.safetensors" in message and name in message and "(50, 32)" in message and "(48, 32)" in message


def test_unknown_activation_is_named(good):
    _edit_config(good, lambda c: c["text_config"].__setitem__("hidden_act", "mish_v2"))
    with pytest.raises(CheckpointError, match="config.json.*hidden_act.*mish_v2"):
        Clip.from_pretrained(good)


def test_not_a_clip_config_is_named(good):
    _edit_config(good, lambda c: c.__setitem__("model_type", "bert"))
    with pytest.raises(CheckpointError, match="model_type is 'bert'"):
        Clip.from_pretrained(good)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        Clip.from_pretrained(tmp_path / "nowhere")


@pytest.fixture
def open_clip_folder(hf_folder, tmp_path):
    folder = tmp_path / "open_clip"
    save_open_clip(folder, transformers.CLIPModel.from_pretrained(hf_folder), hf_folder)
    return folder


def test_open_clip_missing_and_misshaped_tensors_are_named(open_clip_folder):
    path = open_clip_folder / "open_clip_model.safetensors"
    _edit_tensors(open_clip_folder, lambda t: t.__setitem__("visual.proj", torch.zeros(24, 32)),
                  "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match=f"{path}.*'visual.proj' has shape \\(24, 32\\).*"
                                              "open_clip_config.json implies \\(32, 24\\)"):
        Clip.from_pretrained(open_clip_folder)
    _edit_tensors(open_clip_folder, lambda t: (t.__setitem__("visual.proj", torch.zeros(32, 24)),
                                               t.pop("transformer.resblocks.1.attn.in_proj_weight")),
                  "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'transformer.resblocks.1.attn.in_proj_weight'"):
        Clip.from_pretrained(open_clip_folder)


def test_open_clip_unsupported_options_are_named(open_clip_folder):
    path = open_clip_folder / "open_clip_config.json"
    config = json.loads(path.read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "roberta-base"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_cfg.hf_model_name"):
        Clip.from_pretrained(open_clip_folder)
    (open_clip_folder / "open_clip_model.safetensors").unlink()
    path.write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(CheckpointError, match="model_cfg must hold"):
        Clip.from_pretrained(open_clip_folder)


def test_open_clip_folder_without_weights_is_named(open_clip_folder):
    (open_clip_folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights.*open_clip_model.safetensors"):
        Clip.from_pretrained(open_clip_folder)
