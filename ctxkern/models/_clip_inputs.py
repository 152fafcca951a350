"""CLIP's inputs: the tokenizer (the `tokenizers` library, transformers' CLIPTokenizer ids) and the image
preprocessing (Pillow, transformers' CLIPImageProcessor pixel values), read from a checkpoint folder.

Preprocessing is transformers' PIL path: convert to RGB (transparency composited onto white), resize the
shortest side to `size` (the long side int(size * long / short)) with bicubic resampling on the 8-bit image,
center crop with the top-left corner at (h - crop) // 2, scale by 1/255 and normalize with the folder's mean and
std. open_clip's torchvision path departs in two details, and this follows transformers (the numeric reference
of the tests, and what a Hugging Face folder's users get): torchvision places the crop at
int(round((h - crop) / 2)), one pixel further down or right when h - crop is odd, and it converts RGBA with
Pillow's convert("RGB"), which drops the alpha channel instead of compositing onto white. Both differ only on
such images, by a one-pixel shift or in transparent regions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ctxkern.models._checkpoint import CheckpointError, read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP's pre-tokenizer (transformers' CLIPTokenizer): the special tokens, English contractions, letters, single
# digits, runs of other non-space characters.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class UnreadableImage(ValueError):
    """An image file that cannot be read (missing, not an image, truncated); the message names the file."""


# ----------------------------------------------------------------------------- tokenizer

def _bpe_tokenizer(vocab_path: Path, merges_path: Path):
    """vocab.json + merges.txt as transformers' CLIPTokenizer builds them into a `tokenizers` pipeline."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = read_json(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{merges_path}: not readable ({err})") from err
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{merges_path}: every line must be a merge of two symbols")
    for token in (BOS, EOS):
        if token not in vocab:
            raise CheckpointError(f"{vocab_path}: no {token} token in the vocabulary")
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=EOS))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]), False, False)
    return tokenizer


def _pad_token(folder: Path) -> Optional[str]:
    """The pad token Hugging Face's tokenizer config names (a string or an AddedToken dict), if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            pad = read_json(path).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


class ClipTokenizer:
    """Texts -> ids truncated to the context length. pad_to_context: open_clip's convention (every row
    `context` ids, padded with pad_id 0); otherwise Hugging Face's (padded to the longest row with the pad
    token, with an attention_mask)."""

    def __init__(self, tokenizer, *, context: int, pad_id: int, pad_to_context: bool) -> None:
        self.tokenizer, self.context, self.pad_id, self.pad_to_context = tokenizer, context, pad_id, pad_to_context
        tokenizer.no_padding()
        tokenizer.enable_truncation(context)

    @classmethod
    def from_folder(cls, folder: Path, *, context: int, open_clip: bool) -> "ClipTokenizer":
        from tokenizers import Tokenizer

        if (folder / "tokenizer.json").is_file():
            try:
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
                raise CheckpointError(f"{folder / 'tokenizer.json'}: not a tokenizers file ({err})") from err
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = _bpe_tokenizer(folder / "vocab.json", folder / "merges.txt")
        else:
            raise CheckpointError(f"{folder}: no tokenizer (looked for tokenizer.json, or vocab.json and "
                                  "merges.txt)")
        if open_clip:
            return cls(tokenizer, context=context, pad_id=0, pad_to_context=True)
        pad = _pad_token(folder) or EOS
        pad_id = tokenizer.token_to_id(pad)
        if pad_id is None:
            raise CheckpointError(f"{folder}: the pad token {pad!r} is not in the tokenizer's vocabulary")
        return cls(tokenizer, context=context, pad_id=pad_id, pad_to_context=False)

    def tokenize(self, texts: Sequence[str], *, device=None) -> dict[str, Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        width = self.context if self.pad_to_context else max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ----------------------------------------------------------------------------- images

def open_image(image):
    """A PIL image, or a path read (fully, so a truncated file fails here) into one."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise ValueError(f"images must be PIL images or paths, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise UnreadableImage(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


class ClipPreprocessor:
    """PIL images or paths -> pixel_values (N, 3, crop, crop), as transformers' CLIPImageProcessor (PIL path)."""

    def __init__(self, *, size: int, crop: int, mean: Sequence[float], std: Sequence[float],
                 rescale_factor: float = 1 / 255) -> None:
        if size <= 0 or crop <= 0:
            raise ValueError(f"size {size} and crop {crop} must be positive")
        self.size, self.crop, self.rescale_factor = size, crop, rescale_factor
        self.mean = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)      # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)

    @classmethod
    def from_hf(cls, path: Path, image_size: int) -> "ClipPreprocessor":
        """preprocessor_config.json (the defaults of CLIPImageProcessor where it is missing)."""
        raw = read_json(path) if path.is_file() else {}
        size, crop = raw.get("size", {"shortest_edge": image_size}), raw.get("crop_size", image_size)
        size = size.get("shortest_edge") if isinstance(size, dict) else size
        crop = crop.get("height") if isinstance(crop, dict) else crop
        unsupported = [k for k, ok in (("do_resize", True), ("do_center_crop", True), ("do_rescale", True),
                                       ("do_normalize", True), ("do_convert_rgb", True), ("resample", 3))
                       if raw.get(k, ok) != ok]
        if unsupported or not isinstance(size, int) or not isinstance(crop, int):
            raise CheckpointError(f"{path}: only CLIP's preprocessing is supported (shortest-edge resize, bicubic, "
                                  f"center crop, rescale, normalize); this config sets {unsupported or 'size'}")
        return cls(size=size, crop=crop, mean=raw.get("image_mean", OPENAI_CLIP_MEAN),
                   std=raw.get("image_std", OPENAI_CLIP_STD), rescale_factor=raw.get("rescale_factor", 1 / 255))

    @classmethod
    def from_open_clip(cls, cfg: dict, path: Path, image_size: int) -> "ClipPreprocessor":
        """open_clip_config.json's preprocess_cfg (open_clip's defaults where it is missing)."""
        size = cfg.get("size", image_size)
        size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
        if (cfg.get("interpolation", "bicubic") != "bicubic" or cfg.get("resize_mode", "shortest") != "shortest"
                or not isinstance(size, int)):
            raise CheckpointError(f"{path}: preprocess_cfg must be a bicubic shortest-side resize to one size, got "
                                  f"{json.dumps(cfg)}")
        return cls(size=size, crop=size, mean=cfg.get("mean", OPENAI_CLIP_MEAN), std=cfg.get("std", OPENAI_CLIP_STD))

    def _resized_crop(self, image) -> np.ndarray:
        from PIL import Image

        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)),
                                          image.convert("RGBA"))
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        array = np.asarray(image)                                                   # (h, w, 3) uint8
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        if top >= 0 and left >= 0:
            return array[top:top + self.crop, left:left + self.crop]
        # Smaller than the crop (a crop larger than the resize): zero padding around it, as transformers does.
        out = np.zeros((self.crop, self.crop, 3), dtype=array.dtype)
        top_out, left_out = max(0, -top), max(0, -left)
        src = array[max(0, top):max(0, top) + self.crop, max(0, left):max(0, left) + self.crop]
        out[top_out:top_out + src.shape[0], left_out:left_out + src.shape[1]] = src
        return out

    def preprocess(self, images) -> Tensor:
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]
        crops = [self._resized_crop(open_image(image)) for image in images]
        if not crops:
            return torch.zeros(0, 3, self.crop, self.crop)
        batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)              # (N, 3, crop, crop) uint8
        return ((batch.double() * self.rescale_factor - self.mean) / self.std).float()
