"""CLIP's towers end to end: images/s of get_image_features and texts/s of get_text_features at ViT-B/32 and
ViT-B/16 sizes (OpenAI's configurations with random weights), models.Clip against transformers' CLIPModel with
SDPA attention on the same weights, device and dtype. Inputs: random pixel values (preprocessing is not timed);
three batches of real-length prompts as token ids, padded to the longest with its mask, as transformers'
CLIPTokenizer gives them (one token per word and per punctuation mark, as CLIP's BPE mostly gives for such
prompts; no CLIP vocabulary is bundled to tokenize them for real):
- "a photo of a {label}." over 64 labels, and zero-shot's templates times labels in Clip.zero_shot's order:
  each word one id throughout, so the prompts share their beginnings as real ones do (models.Clip computes a
  shared beginning once: models/_prompt_tree.py);
- distinct captions: the first set's lengths, no two prompts sharing a token past BOS (what that shortcut
  cannot help).
The check: each candidate's features against CLIPModel's in float64.

TFLOP/s count the towers' useful work: per layer and token 2 * (4 W^2 + 2 W I) flops for the projections and
the MLP, 4 W flops per attended (query, key) pair (S^2 per image, the causal half n (n + 1) / 2 per prompt), plus
the patch convolution; models.Clip's shortcuts (the pooled row only in the last block, shared beginnings once)
are not credited as work.
"""
from __future__ import annotations

import copy
import re
import zlib

import torch

from ctxkern.bench.case import Candidate, Case
from ctxkern.bench.peers import ctxkern_backends
from ctxkern.models.clip import DEFAULT_TEMPLATES

HF_PEER = "HF CLIPModel (SDPA)"
# 64 labels of ImageNet-like classes, one to three words.
LABELS = ["cat", "dog", "golden retriever", "tabby cat", "school bus", "red fox", "espresso", "mountain bike",
          "pizza", "grand piano", "lighthouse", "hot air balloon", "sea turtle", "fire truck", "banana",
          "wooden spoon", "goldfish", "bald eagle", "tree frog", "king penguin", "zebra", "volcano", "canoe",
          "teapot", "umbrella", "violin", "sports car", "strawberry", "daisy", "jellyfish", "castle", "tractor",
          "tiger shark", "hummingbird", "great white shark", "koala", "jigsaw puzzle", "broccoli", "acoustic guitar",
          "lemon", "snail", "ladybug", "barn owl", "pineapple", "tennis ball", "park bench", "steam locomotive",
          "bell pepper", "cheeseburger", "water bottle", "monarch butterfly", "snowplow", "pretzel", "gondola",
          "harmonica", "mushroom", "ice cream", "red wine", "suspension bridge", "alarm clock", "dining table",
          "space shuttle", "honeycomb", "coral reef"]


def _hf_config(patch: int):
    from transformers import CLIPConfig

    # openai/clip-vit-base-patch32 / -patch16: text 512 wide, 12 layers, 8 heads; vision 768 wide, 12 layers.
    return CLIPConfig(text_config={"eos_token_id": 49407},
                      vision_config={"patch_size": patch}, projection_dim=512)


def _hf_model(patch: int, device: str, dtype: torch.dtype):
    from transformers import CLIPModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = CLIPModel(_hf_config(patch))
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype).eval()


def _template_major(n: int) -> list[str]:
    """'a photo of a {label}.' for each label, then the next template's: n <= 64 are the issue's short prompts."""
    return [template.format(label) for template in DEFAULT_TEMPLATES for label in LABELS][:n]


def _label_major(n: int) -> list[str]:
    """Clip.zero_shot's order: each label's prompts of all its templates together."""
    return [template.format(label) for label in LABELS for template in DEFAULT_TEMPLATES][:n]


# The text cases: (name, the prompts of a batch of n, every word a distinct id).
PROMPT_SETS = (("'a photo of a {label}.'", _template_major, False),
               ("zero-shot templates x labels", _label_major, False),
               ("distinct captions as long", _template_major, True))


def prompt_ids(prompts: list[str], device: str, *, distinct_words: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as ids: BOS, a token per word and per punctuation mark, EOS; padded with EOS to the longest,
    and the mask. Each word always the same id, as a tokenizer gives it (so prompts share their beginnings as
    real ones do); distinct_words: every word a different id instead (no prompt shares a token past BOS)."""
    bos, eos = 49406, 49407
    words = [re.findall(r"\w+|[^\w\s]", prompt) for prompt in prompts]
    if distinct_words:
        distinct = iter((1 + torch.randperm(bos - 1, generator=torch.Generator().manual_seed(0))).tolist())
        rows = [[bos] + [next(distinct) for _ in ws] + [eos] for ws in words]
    else:
        rows = [[bos] + [_word_id(w) for w in ws] + [eos] for ws in words]
    width = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def _word_id(word: str) -> int:
    return 256 + zlib.crc32(word.encode()) % 49000        # a stand-in vocabulary: stable, below BOS


def tower_flops(tokens: list[int], width: int, intermediate: int, layers: int, causal: bool) -> float:
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in tokens)
    return layers * (2.0 * sum(tokens) * (4 * width**2 + 2 * width * intermediate) + 4.0 * width * pairs)


def _inference(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


def _cases_for(name: str, patch: int, device: str, dtype: torch.dtype, images: int, texts: int,
               warmup: int, rounds: int, with_text: bool) -> list[Case]:
    from ctxkern.models import Clip
    from ctxkern.models._clip_checkpoint import from_hf_model

    hf = _hf_model(patch, device, dtype)
    hf64 = copy.deepcopy(hf).double()
    ours = {backend: from_hf_model(Clip, hf, backend=backend) for backend in ctxkern_backends(device)}
    v = hf.config.vision_config
    pixels = torch.randn(images, 3, v.image_size, v.image_size, device=device, dtype=dtype)
    s = (v.image_size // patch) ** 2 + 1
    image_flops = (tower_flops([s] * images, v.hidden_size, v.intermediate_size, v.num_hidden_layers, False)
                   + 2.0 * images * (s - 1) * 3 * patch**2 * v.hidden_size)
    image_case = Case(op="clip_image_features", shape=f"{name} B={images}", dtype=dtype, bytes_moved=None,
                      flops=image_flops, items=images, peer=HF_PEER, cpu_rounds=rounds, cpu_warmup=warmup,
                      reference=_inference(lambda: (hf64.get_image_features(pixel_values=pixels.double())
                                                    .pooler_output,)),
                      candidates=[Candidate(HF_PEER, _inference(
                          lambda: hf.get_image_features(pixel_values=pixels).pooler_output), baseline=True)])
    for backend, clip in ours.items():
        image_case.candidates.append(Candidate(f"ctxkern.{backend} Clip", _inference(
            lambda clip=clip: clip.get_image_features(pixels)), baseline=False))
    # The text tower is the same in both presets: its cases run once, with the first.
    text_cases = [_text_case(f"{name} {set_name}", hf, hf64, ours, *prompt_ids(make(texts), device,
                                                                                distinct_words=distinct),
                             warmup, rounds) for set_name, make, distinct in PROMPT_SETS] if with_text else []
    return [image_case, *text_cases]


def _text_case(name: str, hf, hf64, ours: dict, ids: torch.Tensor, mask: torch.Tensor, warmup: int,
               rounds: int) -> Case:
    t = hf.config.text_config
    lengths = mask.sum(1).tolist()
    case = Case(op="clip_text_features", shape=f"{name} B={len(ids)} tokens={sum(lengths)} padded to "
                                               f"{ids.shape[1]}", dtype=hf.dtype, bytes_moved=None,
                flops=tower_flops(lengths, t.hidden_size, t.intermediate_size, t.num_hidden_layers, True),
                items=len(ids), peer=HF_PEER, cpu_rounds=rounds, cpu_warmup=warmup,
                reference=_inference(lambda: (hf64.get_text_features(input_ids=ids, attention_mask=mask)
                                              .pooler_output,)),
                candidates=[Candidate(HF_PEER, _inference(
                    lambda: hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output),
                    baseline=True)])
    for backend, clip in ours.items():
        case.candidates.append(Candidate(f"ctxkern.{backend} Clip", _inference(
            lambda clip=clip: clip.get_text_features(ids, mask)), baseline=False))
    return case


def cases(device: str, quick: bool, with_compile: bool) -> list[Case]:
    """CPU: fp32 at ViT-B/32 and ViT-B/16, 32 images, 64 prompts. CUDA: fp16 and bf16, 256 images, 256 prompts.
    Quick (a smoke test): ViT-B/32 only, 4 images and 32 prompts, fp32 on a CPU (bf16 on CUDA), 2 rounds."""
    if quick:
        dtypes, models = [torch.float32 if device == "cpu" else torch.bfloat16], [("ViT-B/32", 32)]
    else:
        dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]
        models = [("ViT-B/32", 32), ("ViT-B/16", 16)]
    images, texts = (4, 32) if quick else ((32, 64) if device == "cpu" else (256, 256))
    warmup, rounds = (0, 2) if quick else (1, 7)
    return [case for i, (name, patch) in enumerate(models) for dtype in dtypes
            for case in _cases_for(name, patch, device, dtype, images, texts, warmup, rounds, with_text=i == 0)]
