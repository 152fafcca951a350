"""ELMo in the `ctxkern` command: `embed --model elmo:OPTIONS.json,WEIGHTS.hdf5` and `elmo embed-file`.

No ELMo weights are bundled (the released ones are hundreds of MB and on no package registry): both commands
take the options.json and hdf5 weight file of an AllenNLP / bilm-tf model.
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

import torch
from torch import Tensor

PREFIX = "elmo:"
# Words and single punctuation marks, so that "loan." is the tokens "loan" and "." as in ELMo's training text.
_TOKEN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


def tokenize(sentence: str) -> list[str]:
    return _TOKEN.findall(sentence)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """"elmo:OPTIONS.json,WEIGHTS.hdf5" -> (options file, weight file)."""
    files = spec[len(PREFIX):].split(",")
    if len(files) != 2 or not all(files):
        raise ValueError(f"--model {spec!r}: an ELMo model is elmo:OPTIONS.json,WEIGHTS.hdf5 (two files, comma "
                         "between)")
    return files[0], files[1]


class ElmoWordEncoder:
    """What `ctxkern embed` needs of a model, from ELMo: each token's vector is the mean of the biLM's layers
    (the scalar mix with equal weights and gamma 1, Elmo's initial one), computed per sentence (stateless)."""

    def __init__(self, spec: str, device: str, backend: str) -> None:
        from ctxkern.models import ElmoBiLm

        options, weights = parse_model_spec(spec)
        self.bilm = ElmoBiLm(options, weights, stateful=False, device=device, backend=backend).eval()
        self.device = torch.device(device)
        self.dim = self.bilm.get_output_dim()

    def _token_vectors(self, tokens: list[list[str]]) -> tuple[Tensor, Tensor]:
        """-> (B, T, 2P) layer means without the sentence boundaries, and the mask (B, T)."""
        from ctxkern.models import batch_to_ids
        from ctxkern.models.elmo import remove_sentence_boundaries

        with torch.no_grad():
            out = self.bilm(batch_to_ids(tokens).to(self.device))
            mean = torch.stack(out["activations"]).mean(0)  # (B, T + 2, 2P)
            return remove_sentence_boundaries(mean, out["mask"])

    def encode(self, sentences: Sequence[str]) -> Tensor:
        """Sentence vectors (N, 2P): the mean of their tokens' vectors."""
        vectors, mask = self._token_vectors([tokenize(s) for s in sentences])
        counts = mask.sum(1, keepdim=True).clamp(min=1)
        return (vectors * mask.unsqueeze(-1)).sum(1) / counts

    def word_vectors(self, sentences: Sequence[str], word: str) -> Tensor:
        """The contextual vector of the first token equal to word (case-insensitive) in each sentence (N, 2P)."""
        tokens = [tokenize(s) for s in sentences]
        positions = []
        for i, sentence in enumerate(tokens):
            lowered = [t.lower() for t in sentence]
            if word.lower() not in lowered:
                raise ValueError(f"word {word!r} is not a token of sentence {i} ({sentences[i]!r}); its tokens: "
                                 f"{sentence}")
            positions.append(lowered.index(word.lower()))
        vectors, _ = self._token_vectors(tokens)
        return vectors[torch.arange(len(tokens)), torch.tensor(positions)]


def _missing_file_is_a_usage_error(run):
    """`ctxkern` reports ValueError / RuntimeError as "ctxkern: error: ..."; a missing file is one too."""
    try:
        return run()
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err


def load_encoder(args) -> ElmoWordEncoder:
    encoder = _missing_file_is_a_usage_error(lambda: ElmoWordEncoder(args.model, args.device, args.backend))
    print(f"model ELMo {args.model[len(PREFIX):]}, {encoder.dim}-dim (mean of {encoder.bilm.num_layers} layers), "
          f"on {args.device}, backend {args.backend}")
    return encoder


def _embed_file(args) -> int:
    from ctxkern.models import ElmoEmbedder

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")

    def run():
        embedder = ElmoEmbedder(args.options_file, args.weight_file, device=args.device,
                                batch_size=args.batch_size, backend=args.backend)
        embedder.embed_file(args.input_file, args.output_file, args.output_format, args.batch_size,
                            forget_sentences=args.forget_sentences, use_sentence_keys=args.use_sentence_keys,
                            progress=not args.no_progress)

    _missing_file_is_a_usage_error(run)
    print(f"wrote {args.output_file}", file=sys.stderr)
    return 0


def add_parser(sub, default_device: str, backends: Sequence[str]) -> None:
    """`ctxkern elmo embed-file`: AllenNLP's `allennlp elmo` command and its hdf5 layout."""
    elmo = sub.add_parser("elmo", help="ELMo vectors of a text file, as AllenNLP's `allennlp elmo` command")
    commands = elmo.add_subparsers(dest="elmo_command", required=True, metavar="COMMAND")
    embed = commands.add_parser(
        "embed-file", help="one hdf5 dataset per line of IN (whitespace-tokenized), and a sentence_to_index map",
        description="Writes AllenNLP's elmo command's layout: dataset \"i\" for line i, (n_layers + 1, T, 2P) "
                    "with --all, (T, 2P) with --top or --average, and \"sentence_to_index\". No ELMo weights are "
                    "bundled: pass an AllenNLP / bilm-tf model's files.")
    embed.add_argument("input_file", help="a UTF-8 text file, one whitespace-tokenized sentence per line")
    embed.add_argument("output_file", help="the hdf5 file to write")
    embed.add_argument("--options-file", required=True, help="the model's options.json")
    embed.add_argument("--weight-file", required=True, help="the model's hdf5 weight file")
    layers = embed.add_mutually_exclusive_group()
    layers.add_argument("--all", dest="output_format", action="store_const", const="all",
                        help="every layer, (n_layers + 1, T, 2P) per sentence (the default)")
    layers.add_argument("--top", dest="output_format", action="store_const", const="top", help="the top layer")
    layers.add_argument("--average", dest="output_format", action="store_const", const="average",
                        help="the mean of the layers")
    embed.set_defaults(output_format="all")
    embed.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    embed.add_argument("--forget-sentences", action="store_true", help="do not write sentence_to_index")
    embed.add_argument("--use-sentence-keys", action="store_true", help="name the datasets by the sentences")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.add_argument("--device", default=default_device, help=f"torch device (default here: {default_device})")
    embed.add_argument("--backend", default="auto", choices=backends, help="the LSTM cell's kernels (default auto)")
    embed.set_defaults(run=_embed_file)


def is_elmo_model(model) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


__all__ = ["ElmoWordEncoder", "add_parser", "is_elmo_model", "load_encoder", "parse_model_spec", "tokenize"]
