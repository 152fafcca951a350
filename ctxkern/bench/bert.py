"""End-to-end sentence embeddings: the same sentences (ctxkern.bench.sentences) through the same model, from
text to normalized (N, 384) embeddings, tokenization included, batch size 32. Two sets: a fixed mix of lengths
(mostly short, a tail of long passages) and 128 long paragraphs of real documentation (pydoc_data.topics).

The model is the bundled all-MiniLM-L6-v2 when its package is installed, else a random-weight model of its
configuration saved once as a sentence-transformers folder that every candidate loads. Candidates:
sentence-transformers' encode (the peer the speed-up is taken against), Hugging Face's BertModel (SDPA) with
its tokenizer and a mean pool, ONNX Runtime on an export of the same BertModel (bench/onnx_runtime.py; an
optional peer, skipped with the reason when onnxruntime or onnx is missing; on the CPU in fp32 only), and
ctxkern's SentenceEncoder padding-free (its default) and padded, per backend; ctxkern's rows also report the
speed-up over each other peer. The check: each candidate's embeddings against sentence-transformers' own
encode in float64. fp32 on a CPU; on CUDA also fp16 and bf16, and a padding study: one batch of 32 sentences,
about half of it padding, our padded path against our padding-free one. A quick run: one batch of short
sentences, fp32 (bf16 on CUDA), few timing rounds (the ONNX export included: a few seconds on first use, then
cached). In the shape, N sentences hold `tokens` real tokens after truncation, and real= is their share of the
padded batches (sorted by length) that the padded candidates build.

TFLOP/s count the encoder's useful work on the real tokens (tokenization and pooling are not counted):
per layer, 2 * (4 H^2 + 2 H I) flops per token for the projections and the MLP, and 4 * H flops per
(query, key) pair of a sentence for attention (two products over all heads). No torch.compile candidate:
encode's batches change shape with every batch.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ctxkern.bench import onnx_runtime
from ctxkern.bench.case import Candidate, Case
from ctxkern.bench.peers import ctxkern_backends
from ctxkern.bench.sentences import WORDS, doc_paragraphs, realistic_sentences, sentences_of_word_counts
from ctxkern.models import bundled_model_path

BATCH_SIZE = 32
ST_ENCODE = "sentence-transformers encode"
ONNX_RUNTIME = "ONNX Runtime (CPU EP) + mean pool"
# The second set: paragraphs of Python's documentation, real text where most inputs are long (60-270 tokens).
DOC_PARAGRAPHS = 128
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
MAX_SEQ_LENGTH = 256
# The padding study: one batch whose sentences grow evenly from 3 to 100 words, so about half of the padded
# batch (B x its longest sentence) is padding.
PADDING_STUDY_WORDS = [3 + round(i * 97 / (BATCH_SIZE - 1)) for i in range(BATCH_SIZE)]
# A quick run: one batch of query-like sentences (4-12 words, mixed order), a smoke test that lasts seconds.
QUICK_WORDS = [4 + 5 * i % 9 for i in range(BATCH_SIZE)]


def _write_random_minilm(folder: Path) -> None:
    """A sentence-transformers folder (Transformer -> mean Pooling -> Normalize) of a random-weight BERT with
    all-MiniLM-L6-v2's configuration, and a BERT WordPiece tokenizer whose vocabulary is the benchmark prose's
    words plus single characters (so a token count is about a word count, somewhat below the real model's)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in WORDS for c in w.lower()})
    words = sorted({w.strip(".,;:'\"!?()").lower() for w in WORDS} - {""} - set(chars))
    vocab = {token: i for i, token in enumerate(specials + chars + [f"##{c}" for c in chars] + words)}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                            cls_token="[CLS]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM)).save_pretrained(folder)
    pooling = {"word_embedding_dimension": MINILM["hidden_size"], "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ_LENGTH,
                                                                  "do_lower_case": False}))
    modules = [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate((("", "Transformer"), ("1_Pooling", "Pooling"),
                                                 ("2_Normalize", "Normalize")))]
    (folder / "modules.json").write_text(json.dumps(modules))


def _quiet_transformers() -> None:
    """No "Loading weights" progress bar per model in the benchmark's output (this process only)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _sentence_transformers(folder: Path, device: str, dtype: torch.dtype):
    from sentence_transformers import SentenceTransformer

    _quiet_transformers()
    return SentenceTransformer(str(folder), device=device).to(dtype).eval()


def _st_encode(model, sentences: Sequence[str]) -> Callable[[], torch.Tensor]:
    return lambda: model.encode(sentences, batch_size=BATCH_SIZE, convert_to_tensor=True, show_progress_bar=False)


def _padded_encode(tokenizer, forward: Callable[[dict], torch.Tensor], sentences: Sequence[str], hidden: int,
                   device: str) -> Callable[[], torch.Tensor]:
    """What a user of transformers (or of an ONNX export of it) writes: its tokenizer, sentences sorted by length
    like sentence-transformers, padded per batch, forward(inputs) -> (B, S, H) states, a masked mean and an L2
    normalization."""
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))

    @torch.inference_mode()
    def encode() -> torch.Tensor:
        out = torch.empty(len(sentences), hidden, device=device)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            inputs = tokenizer([sentences[i] for i in batch], padding=True, truncation=True,
                               max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(device)
            states = forward(inputs)                                           # (B, S, H)
            mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)     # (B, S, 1)
            mean = (states * mask).sum(1, dtype=torch.float32) / mask.sum(1, dtype=torch.float32).clamp_min(1)
            out[batch] = F.normalize(mean, dim=-1)
        return out

    return encode


def _hf_sdpa_encode(folder: Path, device: str, dtype: torch.dtype, sentences: Sequence[str]):
    """Hugging Face's BertModel (SDPA attention) with its tokenizer."""
    from transformers import AutoTokenizer, BertModel

    _quiet_transformers()
    model = BertModel.from_pretrained(folder, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
    return _padded_encode(AutoTokenizer.from_pretrained(folder), lambda inputs: model(**inputs).last_hidden_state,
                          sentences, model.config.hidden_size, device)


def _onnx_runtime_candidate(folder: Path, device: str, dtype: torch.dtype, sentences: Sequence[str],
                            cache: Optional[Path]) -> Candidate:
    """ONNX Runtime on the CPU in fp32 (bench/onnx_runtime.py), with transformers' tokenizer; a skipped
    candidate, with the reason, where it cannot run."""
    reason = onnx_runtime.unavailable_reason()
    if reason is None and (device != "cpu" or dtype != torch.float32):
        reason = "run on the CPU in fp32 only (its CUDA provider is not installed here)"
    if reason is not None:
        return Candidate(ONNX_RUNTIME, lambda: None, baseline=True, skip=reason)
    from transformers import AutoTokenizer

    session = onnx_runtime.session(onnx_runtime.export_onnx(folder, cache))
    return Candidate(ONNX_RUNTIME, _padded_encode(AutoTokenizer.from_pretrained(folder),
                                                  onnx_runtime.forward(session), sentences,
                                                  MINILM["hidden_size"], device), baseline=True)


def _ctxkern_encode(folder: Path, device: str, dtype: torch.dtype, backend: str, padding_free: bool,
                    sentences: Sequence[str]) -> Callable[[], torch.Tensor]:
    from ctxkern.models import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(folder, device=device, dtype=dtype, backend=backend,
                                              padding_free=None if padding_free else False)
    return lambda: encoder.encode(sentences, batch_size=BATCH_SIZE, show_progress_bar=False)


def _token_counts(folder: Path, sentences: Sequence[str]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]]


def encoder_flops(lengths: Sequence[int], hidden: int, intermediate: int, layers: int) -> float:
    tokens, pairs = sum(lengths), sum(n * n for n in lengths)
    return layers * (2.0 * tokens * (4 * hidden**2 + 2 * hidden * intermediate) + 4.0 * hidden * pairs)


def _padded_tokens(lengths: Sequence[int]) -> int:
    """Token slots of the padded batches when sentences are sorted by length (the padded candidates' layout)."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i:i + BATCH_SIZE]) for i in range(0, len(ordered), BATCH_SIZE))


def _case(op: str, label: str, folder: Path, device: str, dtype: torch.dtype, sentences: list[str],
          reference_model, warmup: int, rounds: int, onnx_cache: Optional[Path]) -> Case:
    lengths = _token_counts(folder, sentences)
    case = Case(op=op, shape=f"{label} N={len(sentences)} tokens={sum(lengths)} "
                             f"real={sum(lengths) / _padded_tokens(lengths):.0%}", dtype=dtype, bytes_moved=None,
                flops=encoder_flops(lengths, MINILM["hidden_size"], MINILM["intermediate_size"],
                                    MINILM["num_hidden_layers"]),
                reference=lambda: (_st_encode(reference_model, sentences)(),),
                items=len(sentences), peer=ST_ENCODE, cpu_rounds=rounds, cpu_warmup=warmup,
                candidates=[Candidate(ST_ENCODE, _st_encode(_sentence_transformers(folder, device, dtype), sentences),
                                      baseline=True),
                            Candidate("HF BertModel (SDPA) + mean pool",
                                      _hf_sdpa_encode(folder, device, dtype, sentences), baseline=True),
                            _onnx_runtime_candidate(folder, device, dtype, sentences, onnx_cache)])
    for backend in ctxkern_backends(device):
        for padding_free in (True, False):
            case.candidates.append(Candidate(
                f"ctxkern.{backend} SentenceEncoder" + ("" if padding_free else " padded"),
                _ctxkern_encode(folder, device, dtype, backend, padding_free, sentences), baseline=False))
    return case


def cases(device: str, quick: bool, with_compile: bool, onnx_cache: Optional[Path] = None) -> list[Case]:
    """The sentence sets: a quick run, one batch of short sentences; else the mix of lengths
    (realistic_sentences) and long paragraphs of real documentation (doc_paragraphs), each a case per dtype.
    onnx_cache: where the ONNX export is cached (default: onnx_runtime.cache_root())."""
    if quick:
        dtypes = [torch.float32 if device == "cpu" else torch.bfloat16]
    else:
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    sets = ([("", sentences_of_word_counts(QUICK_WORDS))] if quick else
            [("", realistic_sentences(256)), ("docs ", doc_paragraphs(DOC_PARAGRAPHS))])
    warmup, rounds = (0, 2) if quick else (1, 5)
    # Every model is loaded here, while a random-weight folder still exists.
    with tempfile.TemporaryDirectory(prefix="ctxkern-bench-minilm-") as tmp:
        try:
            folder, label = bundled_model_path(), "all-MiniLM-L6-v2"
        except RuntimeError:
            folder, label = Path(tmp), "random-weight MiniLM-L6"
            _write_random_minilm(folder)
        reference_model = _sentence_transformers(folder, device, torch.float64)
        out = [_case("bert_encode", f"{prefix}{label}", folder, device, dtype, sentences, reference_model, warmup,
                     rounds, onnx_cache)
               for prefix, sentences in sets for dtype in dtypes]
        if device == "cuda" and not quick:
            out.append(_case("bert_encode_padding_study", label, folder, device, torch.bfloat16,
                             sentences_of_word_counts(PADDING_STUDY_WORDS), reference_model, warmup,
                             rounds, onnx_cache))
    return out
