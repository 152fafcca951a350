"""Reading Hugging Face checkpoint folders: config.json and the weights, with errors that name the file and the
offending tensor instead of a bare traceback from deep inside safetensors or torch.load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

# Weight files in the order Hugging Face prefers them; an index names the shards of a sharded checkpoint.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and, where one is at fault, the tensor."""


def read_json(path: Path, kind: type = dict):
    """The JSON object (or, with kind=list, array) in path."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}, "
                              f"got {type(data).__name__}")
    return data


def checkpoint_folder(path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a Hugging Face checkpoint folder is expected)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json in the checkpoint folder")
    return folder


def weight_files(folder: Path, names: tuple[str, ...] = WEIGHT_FILES) -> list[Path]:
    """The weight files of a checkpoint: the first of `names` present (one file), or the shards its index names."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path}: no weight_map of tensor names to shard files")
        return [folder / shard for shard in dict.fromkeys(weight_map.values())]
    raise CheckpointError(f"{folder}: no weights (looked for {', '.join(names)})")


def _read_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (named by the checkpoint's index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch.load raise many types for truncated or corrupt files
        raise CheckpointError(f"{path}: cannot read the weights, the file is truncated or corrupt "
                              f"({type(err).__name__}: {err})") from err
    if not isinstance(tensors, Mapping) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(tensors)


def read_weights(folder: Path, names: tuple[str, ...] = WEIGHT_FILES) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """All tensors of a checkpoint folder, and the file each came from (for error messages)."""
    tensors, source = {}, {}
    for path in weight_files(folder, names):
        for name, tensor in _read_file(path).items():
            tensors[name], source[name] = tensor, path
    return tensors, source


def check_tensors(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Tensor],
                  source: Mapping[str, Path], *, ignore: Callable[[str], bool] = lambda name: False,
                  config_name: str = "config.json") -> None:
    """Every expected tensor present with its shape, and nothing unexpected besides what `ignore` accepts."""
    for name, shape in expected.items():
        if name not in tensors:
            files = ", ".join(sorted({str(p) for p in source.values()})) or "the checkpoint"
            raise CheckpointError(f"{files}: missing tensor {name!r} (shape {shape} expected from {config_name})")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{source[name]}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"{config_name} implies {tuple(shape)}")
        if not tensors[name].is_floating_point():
            raise CheckpointError(f"{source[name]}: tensor {name!r} has dtype {tensors[name].dtype}, "
                                  "expected floating point")
    for name in tensors:
        if name not in expected and not ignore(name):
            raise CheckpointError(f"{source[name]}: unexpected tensor {name!r}, which this model's {config_name} "
                                  "does not have")
