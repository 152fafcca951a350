"""Reading ELMo's released files: options.json and the hdf5 weights (bilm-tf's layout, as AllenNLP reads it).

Every dataset is checked against the shape the options imply, and each error names the file and the dataset.
The TensorFlow layouts are converted here, once, to the torch layouts the modules hold:
- CNN/W_cnn_i (1, width, char_dim, n) -> Conv1d weight (n, char_dim, width);
- CNN_high_k: TensorFlow's highway is x * (1 - t) + relu(x W_transform + b_transform) * t with the transform gate
  t = sigmoid(x W_carry + b_carry); AllenNLP's Highway (whose parameters Elmo keeps) computes
  g * x + (1 - g) * relu(...) with one Linear of [W_transform; -W_carry], so g = sigmoid(-(x W_carry + b_carry))
  = 1 - t: the carry weights are negated;
- RNN_d/.../Cell{l}/LSTMCell: W_0 (input + P, 4H) holds the input and recurrent weights stacked, gates in
  TensorFlow's order i, j (the cell input), f, o, and TensorFlow adds 1 to the forget gate's bias at run time;
  torch's order is i, f, g, o, so the j and f blocks swap and the forget bias gets its +1 here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ctxkern.models._checkpoint import CheckpointError, read_json


@dataclass(frozen=True)
class ElmoOptions:
    """options.json of an ELMo biLM."""
    char_dim: int
    filters: tuple[tuple[int, int], ...]  # (width, number of filters)
    n_highway: int
    activation: str  # "relu" or "tanh"
    max_characters_per_token: int
    n_layers: int
    cell_dim: int  # H, the LSTM memory cell
    projection_dim: int  # P, the projected state and the token embedding
    cell_clip: float  # 0: none
    proj_clip: float  # 0: none
    use_skip_connections: bool

    @property
    def n_filters(self) -> int:
        return sum(n for _, n in self.filters)


def _field(data: dict, path: Path, section: str, key: str, kind, default=None):
    value = data.get(section, {}).get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: missing \"{section}\": {{\"{key}\": ...}}")
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if not ok:
        raise CheckpointError(f"{path}: \"{section}\".\"{key}\" must be {kind.__name__}, got {value!r}")
    return value


def read_options(options_file) -> ElmoOptions:
    path = Path(options_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ELMo options file")
    data = read_json(path)
    if not isinstance(data.get("lstm"), dict) or not isinstance(data.get("char_cnn"), dict):
        raise CheckpointError(f"{path}: an ELMo options file needs the objects \"lstm\" and \"char_cnn\"")
    cnn = data["char_cnn"]
    if not isinstance(cnn.get("embedding"), dict):
        raise CheckpointError(f"{path}: missing \"char_cnn\": {{\"embedding\": {{\"dim\": ...}}}}")
    filters = cnn.get("filters")
    if (not isinstance(filters, list) or not filters or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(v, int) and v > 0 for v in f) for f in filters)):
        raise CheckpointError(f"{path}: \"char_cnn\".\"filters\" must be a list of [width, number] pairs, "
                              f"got {filters!r}")
    activation = _field(data, path, "char_cnn", "activation", str)
    if activation not in ("relu", "tanh"):
        raise CheckpointError(f"{path}: \"char_cnn\".\"activation\" must be \"relu\" or \"tanh\", got {activation!r}")
    clips = {}
    for key in ("cell_clip", "proj_clip"):
        value = data["lstm"].get(key, 0) or 0  # absent or null: no clip
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
            raise CheckpointError(f"{path}: \"lstm\".\"{key}\" must be a number >= 0, got {value!r}")
        clips[key] = float(value)
    options = ElmoOptions(
        char_dim=_field({"e": cnn["embedding"]}, path, "e", "dim", int),
        filters=tuple((w, n) for w, n in filters),
        n_highway=_field(data, path, "char_cnn", "n_highway", int),
        activation=activation,
        max_characters_per_token=_field(data, path, "char_cnn", "max_characters_per_token", int, 50),
        n_layers=_field(data, path, "lstm", "n_layers", int),
        cell_dim=_field(data, path, "lstm", "dim", int),
        projection_dim=_field(data, path, "lstm", "projection_dim", int),
        cell_clip=clips["cell_clip"], proj_clip=clips["proj_clip"],
        # bilm-tf reads a missing key as False (no skip connections), and so does this.
        use_skip_connections=_field(data, path, "lstm", "use_skip_connections", bool, False))
    for name in ("char_dim", "n_layers", "cell_dim", "projection_dim", "max_characters_per_token"):
        if getattr(options, name) < 1:
            raise CheckpointError(f"{path}: {name} must be at least 1, got {getattr(options, name)}")
    if options.n_highway < 0:
        raise CheckpointError(f"{path}: n_highway must be >= 0, got {options.n_highway}")
    if options.max_characters_per_token < 3:
        raise CheckpointError(f"{path}: max_characters_per_token must be at least 3, got "
                              f"{options.max_characters_per_token}")
    return options


class _Datasets:
    """The hdf5 file's datasets, read with their expected shapes checked; errors name the file and dataset."""

    def __init__(self, fin, path: Path, options_path: Path):
        self.fin, self.path, self.options_path = fin, path, options_path

    def __call__(self, name: str, shape: tuple[int, ...] | None) -> Tensor:
        import h5py

        if name not in self.fin or not isinstance(self.fin[name], h5py.Dataset):
            raise CheckpointError(f"{self.path}: missing dataset {name!r}"
                                  + (f" (shape {shape} expected from {self.options_path})" if shape else ""))
        dataset = self.fin[name]
        if shape is not None and tuple(dataset.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: dataset {name!r} has shape {tuple(dataset.shape)}, "
                                  f"{self.options_path} implies {tuple(shape)}")
        if dataset.dtype.kind != "f":
            raise CheckpointError(f"{self.path}: dataset {name!r} has dtype {dataset.dtype}, expected floating point")
        return torch.from_numpy(dataset[...]).float()


def _tf_gates_to_torch(w: Tensor, h: int) -> Tensor:
    """Rows in TensorFlow's gate order i, j, f, o -> torch's i, f, g(= j), o; w (4H, ...) or (4H,)."""
    i, j, f, o = w.split(h, 0)
    return torch.cat((i, f, j, o), 0)


def read_weights(weight_file, options: ElmoOptions, options_file) -> dict[str, Tensor]:
    """The biLM's tensors in torch layouts, named as ElmoBiLm's state_dict names them (AllenNLP's names for the
    char-CNN; each LSTM layer a ctxkern.nn.LSTM, whose bias_ih stays zero: TensorFlow has one bias per cell)."""
    import h5py

    path = Path(weight_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ELMo weight file")
    try:
        fin = h5py.File(path, "r")
    except OSError as err:
        raise CheckpointError(f"{path}: not a readable hdf5 weight file ({err})") from err
    o = options
    p, h, d = o.projection_dim, o.cell_dim, o.n_filters
    out: dict[str, Tensor] = {}
    with fin:
        read = _Datasets(fin, path, Path(options_file))
        char_embed = read("char_embed", None)
        if char_embed.dim() != 2 or char_embed.shape[1] != o.char_dim:
            raise CheckpointError(f"{path}: dataset 'char_embed' has shape {tuple(char_embed.shape)}, "
                                  f"{options_file} implies (n_characters - 1, {o.char_dim})")
        # Row 0 is the padding character's: zero, so padding tokens embed to nothing (AllenNLP adds it too).
        out["_token_embedder._char_embedding_weights"] = torch.cat((char_embed.new_zeros(1, o.char_dim), char_embed))
        for i, (width, n) in enumerate(o.filters):
            w = read(f"CNN/W_cnn_{i}", (1, width, o.char_dim, n))
            out[f"_token_embedder.char_conv_{i}.weight"] = w[0].permute(2, 1, 0).contiguous()  # (n, char_dim, width)
            out[f"_token_embedder.char_conv_{i}.bias"] = read(f"CNN/b_cnn_{i}", (n,))
        for k in range(o.n_highway):
            w_t, w_c = read(f"CNN_high_{k}/W_transform", (d, d)), read(f"CNN_high_{k}/W_carry", (d, d))
            b_t, b_c = read(f"CNN_high_{k}/b_transform", (d,)), read(f"CNN_high_{k}/b_carry", (d,))
            out[f"_token_embedder._highways._layers.{k}.weight"] = torch.cat((w_t.t(), -w_c.t()))  # (2D, D)
            out[f"_token_embedder._highways._layers.{k}.bias"] = torch.cat((b_t, -b_c))
        out["_token_embedder._projection.weight"] = read("CNN_proj/W_proj", (d, p)).t().contiguous()
        out["_token_embedder._projection.bias"] = read("CNN_proj/b_proj", (p,))
        for direction, name in enumerate(("forward", "backward")):
            for layer in range(o.n_layers):
                cell = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
                w = read(f"{cell}/W_0", (p + p, 4 * h)).t()  # (4H, input + P): input weights, then recurrent
                bias = read(f"{cell}/B", (4 * h,))
                bias = bias.clone()
                bias[2 * h:3 * h] += 1.0  # TensorFlow's forget bias, added at run time there
                prefix = f"_elmo_lstm.{name}_layer_{layer}."
                out[prefix + "weight_ih_l0"] = _tf_gates_to_torch(w[:, :p], h).contiguous()
                out[prefix + "weight_hh_l0"] = _tf_gates_to_torch(w[:, p:], h).contiguous()
                out[prefix + "bias_ih_l0"] = bias.new_zeros(4 * h)
                out[prefix + "bias_hh_l0"] = _tf_gates_to_torch(bias, h)
                out[prefix + "weight_hr_l0"] = read(f"{cell}/W_P_0", (h, p)).t().contiguous()  # (P, H)
    return out
