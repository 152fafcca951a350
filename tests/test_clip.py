"""models.Clip against transformers' CLIPModel in fp32: small random configurations saved by save_pretrained
(QuickGELU and GELU, both of transformers' EOS rules) and the same weights as an open_clip folder, on the torch,
cpu and interpreted-Triton backends: text and image features, logits, parameter gradients, and the two
conventions of text ids (Hugging Face's padded batch with a mask, open_clip's 77 ids padded with 0)."""
import pytest
import torch
import transformers

from helpers import BACKEND_DEVICES, require_backend
from ctxkern.models import Clip
from random_clip import IMAGE_SIZE, save_hf_clip, save_open_clip

REL = 1e-4           # the bound on features, relative to their largest magnitude
# Prompts of the small vocabulary's words, an empty one and one past the 77-token context (truncated).
PROMPTS = ["a photo of a cat", "", "a small red bird", "the dog " * 60, "a drawing of the large blue car."]
# Zero-shot-like prompts sharing their beginnings, a duplicate and a prompt that begins another (computed once
# each: models/_prompt_tree.py).
SHARED_PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a cat.", "a photo of a", "a photo",
                  "a drawing of a cat.", "a photo of the large red car."]
CPU_BACKENDS = [p for p in BACKEND_DEVICES if p.values[1] == "cpu"]
KINDS = [("quick_gelu", "first_eos"), ("gelu", "argmax")]


def rel_err(ours, theirs):
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(activation, eos rule) -> (HF folder, open_clip folder, the CLIPModel)."""
    out = {}
    for act, rule in KINDS:
        hf_folder = tmp_path_factory.mktemp(f"hf-{act}-{rule}")
        model = save_hf_clip(hf_folder, act, rule)
        open_folder = tmp_path_factory.mktemp(f"open-clip-{act}-{rule}")
        save_open_clip(open_folder, model, hf_folder)
        out[act, rule] = hf_folder, open_folder, model
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(folders):
    return transformers.CLIPTokenizer.from_pretrained(folders[KINDS[0]][0])


def hf_batch(tokenizer):
    batch = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 77 and (batch["attention_mask"].sum(1) == 2).any()
    return batch


def pixels(n=3):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE)


# Every backend on the Hugging Face folders; the open_clip folders (the same model, read differently) on torch and
# cpu, interpreted Triton being the slowest.
FEATURE_CASES = [pytest.param(*b.values, kind, layout, id=f"{layout}-{'-'.join(kind)}-{b.id}")
                 for b in CPU_BACKENDS for kind in KINDS for layout in ("hugging-face", "open-clip")
                 if layout == "hugging-face" or b.values[0] != "triton"]


@pytest.mark.parametrize("backend, device, kind, layout", FEATURE_CASES)
def test_features_and_logits_match_transformers(folders, hf_tokenizer, backend, device, kind, layout):
    require_backend(backend)
    hf_folder, open_folder, hf = folders[kind]
    clip = Clip.from_pretrained(hf_folder if layout == "hugging-face" else open_folder, backend=backend)
    batch, pix = hf_batch(hf_tokenizer), pixels()
    with torch.inference_mode():
        theirs = hf(**batch, pixel_values=pix)
        text = hf.get_text_features(**batch).pooler_output
        image = hf.get_image_features(pixel_values=pix).pooler_output
        assert rel_err(clip.get_text_features(batch["input_ids"], batch["attention_mask"]), text) < REL
        assert rel_err(clip.get_image_features(pix), image) < REL
        ours = clip(batch["input_ids"], pix, batch["attention_mask"])
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert rel_err(getattr(ours, name), getattr(theirs, name)) < REL, name


@pytest.mark.parametrize("kind", KINDS, ids=["-".join(k) for k in KINDS])
def test_open_clip_ids_without_mask_give_the_same_features(folders, hf_tokenizer, kind):
    """open_clip's convention: exactly 77 ids, padded with 0, no mask; EOS found by the folder's rule."""
    hf_folder, _, hf = folders[kind]
    clip = Clip.from_pretrained(hf_folder, backend="cpu")
    batch = hf_batch(hf_tokenizer)
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)            # (B, 77), 0-padded
    with torch.inference_mode():
        text = hf.get_text_features(**batch).pooler_output
        assert rel_err(clip.get_text_features(ids), text) < REL


def test_left_padding_matches_transformers(folders, hf_tokenizer):
    """Padding before the pooled token: the causal attention with the padding mask (not the packed path)."""
    hf_folder, _, hf = folders[KINDS[0]]
    clip = Clip.from_pretrained(hf_folder, backend="cpu")
    rows = hf_tokenizer(PROMPTS[:3])["input_ids"]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():
        text = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        assert rel_err(clip.get_text_features(ids, mask), text) < REL


def _hf_name(ours: str) -> list[str]:
    """The CLIPModel parameter(s) one of ours holds (qkv: query, key and value stacked)."""
    tower, _, rest = ours.partition(".")
    renames = {"final_layer_norm": "final_layer_norm", "pre_layernorm": "pre_layrnorm",
               "post_layernorm": "post_layernorm"}
    if tower in ("text_projection", "visual_projection", "logit_scale"):
        return [ours]
    prefix = f"{tower}_model."
    if rest.startswith("layers."):
        _, i, sub = rest.split(".", 2)
        base = f"{prefix}encoder.layers.{i}."
        if sub.startswith("attention.qkv."):
            return [f"{base}self_attn.{p}_proj.{sub.rsplit('.', 1)[1]}" for p in "qkv"]
        sub = sub.replace("attention.out.", "self_attn.out_proj.")
        return [base + sub]
    head = rest.split(".")[0]
    if head in renames:
        return [prefix + rest.replace(head, renames[head], 1)]
    return [f"{prefix}embeddings.{rest}"]


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_parameter_gradients_match_transformers(folders, hf_tokenizer, backend, device):
    require_backend(backend)
    hf_folder, _, hf = folders[KINDS[1]]
    clip = Clip.from_pretrained(hf_folder, backend=backend)
    batch, pix = hf_batch(hf_tokenizer), pixels(2)
    weights = torch.randn(len(PROMPTS), 2)
    hf.zero_grad()
    theirs = hf(**batch, pixel_values=pix)
    (theirs.logits_per_text * weights).sum().backward()
    ours = clip(batch["input_ids"], pix, batch["attention_mask"])
    (ours.logits_per_text * weights).sum().backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in clip.named_parameters():
        ref = torch.cat([hf_params[n].grad for n in _hf_name(name)]) if p.dim() else hf_params[name].grad
        scale = max(ref.abs().max().item(), 1e-6)
        assert (p.grad - ref.view_as(p.grad)).abs().max().item() <= REL * scale, name
        checked += 1
    assert checked == len(list(clip.parameters()))
    hf.zero_grad()


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS, ids=["-".join(k) for k in KINDS])
def test_prompts_sharing_beginnings_match_transformers(folders, hf_tokenizer, backend, device, kind):
    """Features and parameter gradients of prompts that share beginnings (under the argmax rule of the GELU
    model, a pooled token can fall inside another prompt's path)."""
    require_backend(backend)
    hf_folder, _, hf = folders[kind]
    clip = Clip.from_pretrained(hf_folder, backend=backend)
    batch = hf_tokenizer(SHARED_PROMPTS, padding=True, return_tensors="pt")
    weights = torch.randn(len(SHARED_PROMPTS), 24)
    hf.zero_grad()
    theirs = hf.get_text_features(**batch).pooler_output
    (theirs * weights).sum().backward()
    ours = clip.get_text_features(batch["input_ids"], batch["attention_mask"])
    (ours * weights).sum().backward()
    assert rel_err(ours.detach(), theirs.detach()) < REL
    hf_params = dict(hf.named_parameters())
    for name, p in clip.text.named_parameters():
        ref = torch.cat([hf_params[n].grad for n in _hf_name(f"text.{name}")])
        assert (p.grad - ref.view_as(p.grad)).abs().max().item() <= REL * max(ref.abs().max().item(), 1e-6), name
    hf.zero_grad()


def test_padded_rows_and_batch_composition_do_not_change_a_row(folders, hf_tokenizer):
    """A prompt's features are the same alone and in a padded batch of longer ones."""
    clip = Clip.from_pretrained(folders[KINDS[0]][0], backend="cpu")
    with torch.inference_mode():
        together = clip.get_text_features(**clip.tokenize(PROMPTS))
        alone = torch.cat([clip.get_text_features(**clip.tokenize([p])) for p in PROMPTS])
    assert rel_err(together, alone) < 1e-5


def test_encode_and_zero_shot(folders, tmp_path):
    from PIL import Image

    clip = Clip.from_pretrained(folders[KINDS[0]][0], backend="cpu")
    paths = []
    for i, color in enumerate(["red", "blue"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (41, 33), color).save(paths[-1])
    text, image = clip.encode_text(PROMPTS, batch_size=2), clip.encode_image(paths, batch_size=1)
    assert text.dtype == image.dtype == torch.float32 and text.shape == (5, 24) and image.shape == (2, 24)
    assert torch.allclose(text.norm(dim=-1), torch.ones(5)) and torch.allclose(image.norm(dim=-1), torch.ones(2))
    with torch.inference_mode():
        expected = clip(**clip.tokenize(PROMPTS[:1]), pixel_values=clip.preprocess(paths)).image_embeds
    assert rel_err(image, expected) < 1e-5
    probs = clip.zero_shot(paths, ["cat", "dog", "car"], templates=["a photo of a {}.", "a drawing of a {}."])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    # The probabilities from the averaged, renormalized prompt embeddings, computed here from encode_text.
    prompts = [t.format(c) for c in ["cat", "dog", "car"] for t in ["a photo of a {}.", "a drawing of a {}."]]
    labels = torch.nn.functional.normalize(clip.encode_text(prompts).view(3, 2, -1).mean(1), dim=-1)
    expected = (clip.logit_scale.detach().exp() * image @ labels.T).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        clip.zero_shot(paths, [])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_is_close(folders, hf_tokenizer, dtype):
    _, _, hf = folders[KINDS[0]]
    clip = Clip.from_pretrained(folders[KINDS[0]][0], backend="cpu", dtype=dtype)
    batch, pix = hf_batch(hf_tokenizer), pixels()
    with torch.inference_mode():
        text = hf.get_text_features(**batch).pooler_output
        ours = clip.get_text_features(batch["input_ids"], batch["attention_mask"])
        image = hf.get_image_features(pixel_values=pix).pooler_output
        ours_image = clip.get_image_features(pix.to(dtype))
    assert ours.dtype == dtype and rel_err(ours, text) < 0.05 and rel_err(ours_image, image) < 0.05
