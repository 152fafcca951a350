"""`ctxkern clip classify` and `ctxkern clip search` on a small random CLIP folder and generated images: the
printed probabilities and ranking equal models.Clip's, unreadable images are named (classify) or skipped with a
warning (search), and a missing --model says that no CLIP weights are bundled."""
import numpy as np
import pytest
import torch
from PIL import Image

from ctxkern import cli
from ctxkern.models import Clip
from random_clip import save_hf_clip

LABELS = ["cat", "dog", "red car"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-model")
    save_hf_clip(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 31), (64, 64), (23, 57)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "nested").mkdir()
    Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), "L").save(folder / "nested" / "gray.jpg")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder


def run(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_classify_prints_the_zero_shot_probabilities(capsys, model_folder, image_folder):
    images = [str(image_folder / "img0.png"), str(image_folder / "nested" / "gray.jpg")]
    code, out, err = run(capsys, "clip", "classify", *images, "--labels", " cat, dog,red car ", "--model",
                         str(model_folder), "--device", "cpu", "--backend", "cpu", "--top", "2")
    assert code == 0, err
    expected = Clip.from_pretrained(model_folder, backend="cpu").zero_shot(images, LABELS)
    lines = [line for line in out.splitlines() if line.startswith(str(image_folder))]
    assert len(lines) == 2
    for line, row in zip(lines, expected):
        best = row.topk(2)
        assert line == f"{images[lines.index(line)]}: " + ", ".join(
            f"{LABELS[i]} {p:.3f}" for i, p in zip(best.indices.tolist(), best.values.tolist()))


def test_search_ranks_the_folder_and_skips_unreadable_images(capsys, model_folder, image_folder, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in image_folder.rglob("*.*"):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_text("a text file named .jpg")
    code, out, err = run(capsys, "clip", "search", "--images", str(folder), "--query", "a photo of a dog",
                         "--model", str(model_folder), "--backend", "cpu", "--top", "3", "--batch-size", "2")
    assert code == 0, err
    assert f"skipped {folder / 'broken.jpg'}" in err
    clip = Clip.from_pretrained(model_folder, backend="cpu")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg") and p.name != "broken.jpg")
    scores = clip.encode_image(files) @ clip.encode_text(["a photo of a dog"])[0]
    best = scores.topk(3)
    expected = [f"{s:7.4f}  {files[i]}" for i, s in zip(best.indices.tolist(), best.values.tolist())]
    assert out.splitlines()[-3:] == expected
    assert "(4 images)" in out


def test_missing_model_says_none_is_bundled(capsys, image_folder):
    code, _, err = run(capsys, "clip", "classify", str(image_folder / "img0.png"), "--labels", "cat")
    assert code == 2 and "--model" in err and "No CLIP weights are bundled" in err


@pytest.mark.parametrize("args, message", [
    (["classify", "IMAGE", "--labels", " , "], "--labels must name at least one class"),
    (["search", "--images", "EMPTY", "--query", "x"], "holds no image files"),
    (["search", "--images", "NOWHERE", "--query", "x"], "not a folder"),
    (["classify", "MISSING", "--labels", "cat"], "MISSING.png: no such image file"),
])
def test_bad_arguments_get_clear_errors(capsys, model_folder, image_folder, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    names = {"IMAGE": str(image_folder / "img0.png"), "EMPTY": str(tmp_path / "empty"),
             "NOWHERE": str(tmp_path / "nowhere"), "MISSING": str(tmp_path / "MISSING.png")}
    args = [names.get(a, a) for a in args]
    code, _, err = run(capsys, "clip", *args, "--model", str(model_folder), "--backend", "cpu")
    assert code == 2 and message in err, err
