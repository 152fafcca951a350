"""`ctxkern clip classify` (zero-shot classification of images) and `ctxkern clip search` (text-to-image search
over a folder), on models.Clip. No CLIP weights are bundled: --model names a Hugging Face or open_clip folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
NO_MODEL = ("ctxkern clip needs --model DIR: a CLIP checkpoint folder (Hugging Face's CLIPModel.save_pretrained, "
            "e.g. a download of openai/clip-vit-base-patch32, or an open_clip hub folder). No CLIP weights are "
            "bundled with ctxkern.")


def _load(args):
    from ctxkern.models import Clip

    if not args.model:
        raise ValueError(NO_MODEL)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    clip = Clip.from_pretrained(args.model, device=args.device, backend=args.backend)
    print(f"model {args.model}, {clip.config.projection_dim}-dim, on {args.device}, backend {args.backend}")
    return clip


def _classify(args) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError(f"--labels must name at least one class (comma-separated), got {args.labels!r}")
    templates = None
    if args.template:
        templates = args.template
        if any("{}" not in t for t in templates):
            raise ValueError("--template must hold {} where the label goes, e.g. 'a photo of a {}.'")
    clip = _load(args)
    probabilities = clip.zero_shot(args.images, labels, templates, batch_size=args.batch_size).cpu()
    top = min(args.top, len(labels))
    for image, row in zip(args.images, probabilities):
        best = row.topk(top)
        ranked = ", ".join(f"{labels[i]} {p:.3f}" for i, p in zip(best.indices.tolist(), best.values.tolist()))
        print(f"{image}: {ranked}")
    return 0


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--images {folder}: holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def encode_folder(clip, files: list[Path], batch_size: int, warn: Callable[[str], None]):
    """(the readable files, their embeddings (N, E)); an unreadable file is skipped with a warning."""
    import torch
    from tqdm.auto import tqdm

    from ctxkern.models._clip_inputs import UnreadableImage, open_image

    kept, embeddings = [], []
    with tqdm(total=len(files), desc="encoding images", unit="image", file=sys.stderr,
              disable=len(files) <= batch_size) as bar:
        for start in range(0, len(files), batch_size):
            images = []
            for path in files[start:start + batch_size]:
                try:
                    images.append(open_image(path))
                    kept.append(path)
                except UnreadableImage as err:
                    warn(f"skipped {err}")
            if images:
                embeddings.append(clip.encode_image(images, batch_size=batch_size))
            bar.update(len(files[start:start + batch_size]))
    if not kept:
        raise ValueError("no image could be read")
    return kept, torch.cat(embeddings)


def _search(args) -> int:
    from ctxkern.search import top_k

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    files = image_files(Path(args.images))
    clip = _load(args)
    kept, images = encode_folder(clip, files, args.batch_size,
                                 lambda msg: print(f"ctxkern: warning: {msg}", file=sys.stderr))
    query = clip.encode_text([args.query])[0]
    print(f"query: {args.query} ({len(kept)} images)")
    for index, score in top_k(query, images, args.top):
        print(f"{score:7.4f}  {kept[index]}")
    return 0


def add_parser(sub, default_device: str, backends: tuple[str, ...]) -> None:
    """`ctxkern clip` and its two subcommands, on the main parser's subparsers."""
    clip = sub.add_parser("clip", help="zero-shot image classification and text-to-image search with CLIP",
                          description=__doc__)
    commands = clip.add_subparsers(dest="clip_command", required=True, metavar="COMMAND")
    classify = commands.add_parser("classify", help="zero-shot classification of images among labels")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--labels", required=True, help='the classes, comma-separated, e.g. "a cat,a dog"')
    classify.add_argument("--template", action="append",
                          help="a prompt template with {} for the label (repeatable; default: CLIP's usual "
                               "photo templates)")
    classify.add_argument("--top", type=int, default=5, help="how many labels to print per image (default 5)")
    classify.set_defaults(run=_classify)
    search = commands.add_parser("search", help="rank a folder of images by similarity to a text query")
    search.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    search.add_argument("--query", required=True, help="the text to search for")
    search.add_argument("--top", type=int, default=5, help="how many results (default 5)")
    search.set_defaults(run=_search)
    for parser in (classify, search):
        parser.add_argument("--model", help="a CLIP folder, Hugging Face or open_clip (required: no CLIP weights "
                                            "are bundled)")
        parser.add_argument("--device", default=default_device,
                            help=f"the torch device, e.g. cpu, cuda (default here: {default_device})")
        parser.add_argument("--backend", default="auto", choices=backends,
                            help="which kernels the model runs (default: auto)")
        parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
