"""integrations.patch on transformers' CLIP models (CLIPModel, CLIPTextModel, CLIPVisionModel): outputs equal to
the unpatched model's, with the attention (the text tower's causal attention and its padding included) and the
LayerNorms on ctxkern's kernels, and the fallbacks where the kernel cannot compute a mask exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from ctxkern import integrations, ops
from random_clip import IMAGE_SIZE, hf_config, randomize_clip


class Counter:
    def __init__(self, monkeypatch):
        self.calls = {}
        for owner, name in ((ops, "attention"), (ops, "layer_norm"), (F, "scaled_dot_product_attention")):
            monkeypatch.setattr(owner, name, self._counting(name, getattr(owner, name)))

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            key = name + ("+causal" if kwargs.get("causal") else "") + ("+prenorm" if kwargs.get("prenorm") else "")
            self.calls[key] = self.calls.get(key, 0) + 1
            return fn(*args, **kwargs)
        return wrapper


@pytest.fixture
def counter(monkeypatch):
    return Counter(monkeypatch)


def pair(cls, config):
    ref = randomize_clip(transformers.CLIPModel(config)).eval()
    if cls is not transformers.CLIPModel:
        sub = cls(config.text_config if cls is transformers.CLIPTextModel else config.vision_config).eval()
        sub.load_state_dict((ref.text_model if cls is transformers.CLIPTextModel else ref.vision_model).state_dict())
        ref = sub
    patched = type(ref)(copy.deepcopy(ref.config)).eval()     # its own config: patching sets the attention in it
    patched.load_state_dict(ref.state_dict())
    return ref, integrations.patch(patched, backend="cpu")


def text_batch(lengths, vocab, eos):
    ids = torch.randint(1, eos - 1, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = eos
    return ids * mask, mask


@pytest.mark.parametrize("lengths", [[7, 3, 1], [6, 6]], ids=["padded", "unpadded"])
def test_clip_model_matches_unpatched(counter, lengths):
    config = hf_config("gelu")
    ref, patched = pair(transformers.CLIPModel, config)
    ids, mask = text_batch(lengths, config.text_config.vocab_size, config.text_config.eos_token_id)
    pix = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=pix)
        assert counter.calls["scaled_dot_product_attention"] == 4 and "attention" not in counter.calls
        counter.calls.clear()
        out = patched(input_ids=ids, attention_mask=mask, pixel_values=pix)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(out.text_model_output.last_hidden_state[real],
                               expected.text_model_output.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    # 2 text layers (causal) + 2 vision layers on the kernel, no SDPA; each layer's second LayerNorm fused.
    assert counter.calls.get("scaled_dot_product_attention") is None
    assert counter.calls["attention+causal"] == 2 and counter.calls["attention"] == 2
    assert counter.calls["layer_norm+prenorm"] == 4


def test_text_and_vision_models_match_unpatched(counter):
    config = hf_config()
    ref, patched = pair(transformers.CLIPTextModel, config)
    ids, mask = text_batch([5, 2], config.text_config.vocab_size, config.text_config.eos_token_id)
    with torch.no_grad():
        expected, out = ref(input_ids=ids, attention_mask=mask), patched(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)
    ref, patched = pair(transformers.CLIPVisionModel, config)
    pix = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected, out = ref(pixel_values=pix), patched(pixel_values=pix)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert counter.calls["attention+causal"] == 2 and counter.calls["attention"] == 2
    assert counter.calls["scaled_dot_product_attention"] == 4          # the two unpatched models' only


def test_left_padding_runs_the_kernel_and_matches_on_real_tokens(counter):
    """Left padding leaves query rows (at padding) that see no key: the kernel gives them zeros, and every real
    token's state equals the unpatched model's."""
    config = hf_config()
    ref, patched = pair(transformers.CLIPTextModel, config)
    ids, mask = text_batch([5, 3], config.text_config.vocab_size, config.text_config.eos_token_id)
    ids, mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        expected, out = ref(input_ids=ids, attention_mask=mask), patched(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], expected.last_hidden_state[real], rtol=1e-5,
                               atol=1e-5)
    assert counter.calls["attention+causal"] == 2


def test_gradients_match_unpatched():
    config = hf_config("gelu")
    ref, patched = pair(transformers.CLIPModel, config)
    ids, mask = text_batch([6, 4], config.text_config.vocab_size, config.text_config.eos_token_id)
    pix = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    for model in (ref, patched):
        model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits_per_image.sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in patched.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
