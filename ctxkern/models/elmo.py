"""ELMo (Peters et al. 2018) on ctxkern's fused LSTM cell, reading AllenNLP's / bilm-tf's released files.

A token's characters -> char-CNN (one convolution per filter width, max over characters, relu / tanh) -> highway
layers -> projection to P: the context-free token embedding. Sentence-boundary tokens <S> and </S> are added
around each sentence; a biLM of separate forward and backward stacks (a backward layer reads only the backward
layer below it) of LSTMs with projection, cell_clip and proj_clip, and skip connections from layer 1 up when
the options say so, runs over them. Its layers (the token embedding duplicated, then each LSTM layer's forward
and backward halves side by side) are mixed by a learned scalar mix.

The module and parameter names are AllenNLP's (Elmo._elmo_lstm._token_embedder.char_conv_0.weight,
scalar_mix_0.scalar_parameters.0, ...); each LSTM layer is a ctxkern.nn.LSTM, whose parameter names differ from
AllenNLP's LstmCellWithProjection's, and a load_state_dict hook reads AllenNLP's names too (_ElmoLstm).

Stateful like AllenNLP (the default): row k's final LSTM states of one call are row k's initial states of the
next, so consecutive batches read as one text; the stored states grow with zero rows for a larger batch, and
a smaller batch uses (and updates) only the first rows. reset_states() clears them; stateful=False starts each
call from zeros, so a sentence's vectors do not depend on what ran before.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ctxkern import _dispatch
from ctxkern import nn as ctxnn
from ctxkern.models._elmo_chars import BOS_CHARACTERS, EOS_CHARACTERS, PADDING, batch_to_ids
from ctxkern.models._elmo_weights import ElmoOptions, read_options, read_weights

PADDING_ID = PADDING + 1  # the padding character's id in batch_to_ids' ids

__all__ = ["ElmoBiLm", "Elmo", "ElmoEmbedder", "ScalarMix", "batch_to_ids", "remove_sentence_boundaries"]


# ----------------------------------------------------------------------------------------------- boundaries

def add_sentence_boundaries(x: Tensor, lengths: Tensor, bos: Tensor, eos: Tensor) -> Tensor:
    """x (B, T, ...) with sentence i's tokens at 0..lengths[i]-1 -> (B, T + 2, ...) with bos before them and
    eos right after each sentence's last token (AllenNLP's add_sentence_boundary_token_ids)."""
    batch = x.shape[0]
    out = x.new_zeros((batch, x.shape[1] + 2, *x.shape[2:]))
    out[:, 1:-1] = x
    rows = torch.arange(batch, device=x.device)
    out[:, 0] = bos
    out[rows, lengths + 1] = eos.to(out.dtype).expand(batch, *eos.shape)
    return out


def remove_sentence_boundaries(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, T + 2, D) and its mask (B, T + 2) -> (B, T, D) without each sentence's <S> and </S>, zeros past
    its end, and the mask (B, T) bool; no loop over the sentences."""
    lengths = mask.sum(1) - 2  # (B,): the tokens between the boundaries
    new_mask = torch.arange(x.shape[1] - 2, device=x.device) < lengths.unsqueeze(1)  # (B, T)
    return torch.where(new_mask.unsqueeze(-1), x[:, 1:-1], x.new_zeros(())), new_mask


# ----------------------------------------------------------------------------------------------- char-CNN

class _Highway(torch.nn.Module):
    """AllenNLP's Highway with relu: per layer one Linear(D, 2D) -> (nonlinear, gate); x = g x + (1 - g) f."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self._layers = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * dim) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._layers:
            nonlinear, gate = layer(x).chunk(2, dim=-1)
            gate = torch.sigmoid(gate)
            x = gate * x + (1 - gate) * F.relu(nonlinear)
        return x


class _ElmoCharacterEncoder(torch.nn.Module):
    """Character ids (B, T, C) -> token embeddings with boundaries (B, T + 2, P) and their mask (B, T + 2)."""

    def __init__(self, options: ElmoOptions, n_characters: int) -> None:
        super().__init__()
        self.options = options
        self._char_embedding_weights = torch.nn.Parameter(torch.zeros(n_characters, options.char_dim))
        for i, (width, n) in enumerate(options.filters):
            self.add_module(f"char_conv_{i}", torch.nn.Conv1d(options.char_dim, n, width))
        self._highways = _Highway(options.n_filters, options.n_highway)
        self._projection = torch.nn.Linear(options.n_filters, options.projection_dim)
        self.register_buffer("_beginning_of_sentence_characters", torch.tensor(BOS_CHARACTERS), persistent=False)
        self.register_buffer("_end_of_sentence_characters", torch.tensor(EOS_CHARACTERS), persistent=False)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """ids (N, C) -> (N, P): the context-free embedding of each token.

        Each filter's max runs over all C - width + 1 windows, as AllenNLP's; but a word fills only its first
        few characters and the rest is the padding character, so every window past the batch's longest word
        holds only padding and has one value for all tokens: it is computed once, from a single window, and
        the convolutions run only over the characters up to the longest word (a third of them, typically).
        """
        weight = self._char_embedding_weights
        chars = ids.shape[1]
        # (N, C) -> the batch's longest span of non-padding characters
        positions = torch.arange(1, chars + 1, device=ids.device)
        span = int(((ids != PADDING_ID) * positions).amax()) if ids.numel() else 0
        widest = max(w for w, _ in self.options.filters)
        used = max(widest, min(chars, span + widest - 1))
        x = F.embedding(ids[:, :used], weight).transpose(1, 2)  # (N, char_dim, used)
        activation = torch.tanh if self.options.activation == "tanh" else F.relu
        convolved = []
        for i, (width, _) in enumerate(self.options.filters):
            conv = getattr(self, f"char_conv_{i}")
            pooled = conv(x[:, :, :max(width, min(chars, span + width - 1))]).amax(dim=-1)  # (N, n_i)
            if span <= chars - width:  # some windows hold only padding: their one value joins the max
                padding = weight[PADDING_ID].view(1, -1, 1).expand(1, -1, width)  # (1, char_dim, width)
                pooled = torch.maximum(pooled, conv(padding)[:, :, 0])
            convolved.append(activation(pooled))
        return self._projection(self._highways(torch.cat(convolved, dim=-1)))

    def forward(self, character_ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = (character_ids > 0).any(-1)  # (B, T): a token has a nonzero id; padding is all zeros
        ids = add_sentence_boundaries(character_ids, mask.sum(1), self._beginning_of_sentence_characters,
                                      self._end_of_sentence_characters)  # (B, T + 2, C)
        batch, steps, chars = ids.shape
        flat = ids.reshape(batch * steps, chars)  # (N, C)
        real = (flat > 0).any(-1)  # (N,)
        # A token's embedding depends on its characters alone, and the char-CNN costs more than the LSTMs of the
        # small model: each distinct token of the batch (<S> and </S> once, "the" once...) is embedded once, and
        # padding not at all (AllenNLP embeds every position; its padding positions are masked downstream).
        distinct, inverse = torch.unique(flat[real], dim=0, return_inverse=True)
        embedded = self.embed_tokens(distinct)  # (U, P)
        out = embedded.new_zeros(batch * steps, embedded.shape[-1])
        out[real] = embedded[inverse]
        return out.view(batch, steps, embedded.shape[-1]), real.view(batch, steps)


# ----------------------------------------------------------------------------------------------- the biLM

_ALLENNLP_LSTM_NAMES = {"input_linearity.weight": "weight_ih_l0", "state_linearity.weight": "weight_hh_l0",
                        "state_linearity.bias": "bias_hh_l0", "state_projection.weight": "weight_hr_l0"}


class _ElmoLstm(torch.nn.Module):
    """The stacked biLSTM: forward_layer_{l} and backward_layer_{l}, each a one-layer ctxkern.nn.LSTM with
    projection and clipping (the backward one with reverse=True), and AllenNLP's stateful _EncoderBase rules."""

    def __init__(self, options: ElmoOptions, stateful: bool, backend: str) -> None:
        super().__init__()
        o = options
        self.num_layers, self.hidden_size, self.cell_size = o.n_layers, o.projection_dim, o.cell_dim
        self.use_skip_connections = o.use_skip_connections
        self.stateful = stateful
        for layer in range(o.n_layers):
            for name in ("forward", "backward"):
                lstm = ctxnn.LSTM(o.projection_dim, o.cell_dim, proj_size=o.projection_dim, cell_clip=o.cell_clip,
                                  proj_clip=o.proj_clip, reverse=name == "backward", backend=backend)
                lstm.bias_ih_l0.requires_grad_(False)  # TensorFlow's cell has one bias: bias_hh holds it
                self.add_module(f"{name}_layer_{layer}", lstm)
        # AllenNLP's _states: h (L, B, 2P) and c (L, B, 2H), forward halves first; buffers, so .to() moves them.
        self.register_buffer("_state_h", None, persistent=False)
        self.register_buffer("_state_c", None, persistent=False)
        self._register_load_state_dict_pre_hook(self._read_allennlp_names)

    @staticmethod
    def _read_allennlp_names(state_dict, prefix, *args) -> None:
        """An AllenNLP ElmoLstm's LstmCellWithProjection names -> this module's (input_linearity.weight ->
        weight_ih_l0, ...), so a state_dict saved by AllenNLP loads; its bias_ih is zero."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            layer, _, leaf = key[len(prefix):].partition(".")
            if leaf in _ALLENNLP_LSTM_NAMES:
                tensor = state_dict.pop(key)
                state_dict[f"{prefix}{layer}.{_ALLENNLP_LSTM_NAMES[leaf]}"] = tensor
                if leaf == "state_linearity.bias":
                    state_dict.setdefault(f"{prefix}{layer}.bias_ih_l0", torch.zeros_like(tensor))

    def reset_states(self) -> None:
        self._state_h = self._state_c = None

    def _initial_states(self, batch: int) -> Optional[tuple[Tensor, Tensor]]:
        if not self.stateful or self._state_h is None:
            return None
        stored = self._state_h.shape[1]
        if batch > stored:  # a larger batch: the new rows start from zeros (and are kept from now on)
            self._state_h, self._state_c = (F.pad(s, (0, 0, 0, batch - stored)) for s in (self._state_h,
                                                                                           self._state_c))
        return self._state_h[:, :batch], self._state_c[:, :batch]

    def _update_states(self, h: Tensor, c: Tensor) -> None:
        """AllenNLP's _update_states: the rows the batch used take its final states; rows beyond the batch and
        rows whose layer-0 final state is exactly zero (not run) keep the stored ones."""
        h, c = h.detach(), c.detach()
        if self._state_h is None:
            self._state_h, self._state_c = h, c
            return
        batch = h.shape[1]
        new = []
        for old, state in ((self._state_h, h), (self._state_c, c)):
            used = (state[0].sum(-1) != 0).view(1, batch, 1)
            rows = torch.where(used, state, old[:, :batch])
            new.append(torch.cat((rows, old[:, batch:]), 1) if old.shape[1] > batch else rows)
        self._state_h, self._state_c = new

    def forward(self, inputs: Tensor, mask: Tensor) -> Tensor:
        """inputs (B, T, P), mask (B, T) -> (L, B, T, 2P); zeros past each sequence's end."""
        batch, steps, _ = inputs.shape
        lengths = mask.sum(1)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        batch_sizes, sorted_indices, unsorted_indices = packed.batch_sizes, packed.sorted_indices, \
            packed.unsorted_indices
        state = self._initial_states(batch)
        p, h = self.hidden_size, self.cell_size
        fwd, bwd = packed.data, packed.data  # (N, P): time-major packed rows
        outputs, h_n, c_n = [], [], []
        for layer in range(self.num_layers):
            halves = []
            for name, x, sl_h, sl_c in (("forward", fwd, slice(0, p), slice(0, h)),
                                        ("backward", bwd, slice(p, 2 * p), slice(h, 2 * h))):
                hx = None if state is None else (state[0][layer:layer + 1, :, sl_h], state[1][layer:layer + 1, :, sl_c])
                out, (hn, cn) = getattr(self, f"{name}_layer_{layer}")(
                    PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), hx)
                y = out.data + x if self.use_skip_connections and layer > 0 else out.data  # (N, P)
                halves.append(y)
                h_n.append(hn)
                c_n.append(cn)
            fwd, bwd = halves
            outputs.append(torch.cat(halves, dim=1))  # (N, 2P)
        stacked = PackedSequence(torch.cat(outputs, dim=1), batch_sizes, sorted_indices, unsorted_indices)
        padded, _ = pad_packed_sequence(stacked, batch_first=True, total_length=steps)  # (B, T, L * 2P)
        # h_n alternates forward, backward per layer: each (1, B, P), in the caller's row order.
        final_h = torch.cat([torch.cat(h_n[2 * k:2 * k + 2], -1) for k in range(self.num_layers)])  # (L, B, 2P)
        final_c = torch.cat([torch.cat(c_n[2 * k:2 * k + 2], -1) for k in range(self.num_layers)])  # (L, B, 2H)
        if self.stateful:
            self._update_states(final_h, final_c)
        return padded.view(batch, steps, self.num_layers, 2 * p).permute(2, 0, 1, 3)  # (L, B, T, 2P)


def _check_character_ids(character_ids, options: ElmoOptions, n_characters: int, name="character_ids") -> None:
    if not isinstance(character_ids, Tensor):
        raise TypeError(f"{name} must be a LongTensor (B, T, {options.max_characters_per_token}) from "
                        f"batch_to_ids, got {type(character_ids).__name__}")
    if character_ids.dtype.is_floating_point or character_ids.dtype.is_complex or character_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (batch_to_ids' ids), got {character_ids.dtype}")
    if character_ids.dim() != 3 or character_ids.shape[-1] != options.max_characters_per_token:
        raise ValueError(f"{name} must have shape (B, T, {options.max_characters_per_token}), got "
                         f"{tuple(character_ids.shape)}")
    if character_ids.numel() and (character_ids.min() < 0 or character_ids.max() >= n_characters):
        raise ValueError(f"{name} must lie in [0, {n_characters - 1}] (the model's character vocabulary), got "
                         f"values in [{character_ids.min().item()}, {character_ids.max().item()}]")


class ElmoBiLm(torch.nn.Module):
    """The pre-trained biLM (AllenNLP's _ElmoBiLm): forward(character_ids (B, T, 50), word_inputs=None) ->
    {"activations": [(B, T + 2, 2P)] * (n_layers + 1), "mask": (B, T + 2) bool}.

    activations[0] is the token embedding twice side by side, then each LSTM layer's forward and backward
    outputs; positions past a sentence's </S> are zero. vocab_to_cache: a word list whose char-CNN embeddings
    are computed once; word_inputs (B, T), ids into that list with 0 as padding, then replace the char-CNN
    (ids outside the list fall back to it, as AllenNLP does). backend picks the LSTM cell's kernels.
    """

    def __init__(self, options_file, weight_file, *, requires_grad: bool = False,
                 vocab_to_cache: Optional[Sequence[str]] = None, stateful: bool = True, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__()
        _dispatch.check_choice(backend)
        options = read_options(options_file)
        tensors = read_weights(weight_file, options, options_file)
        self.options = options
        self._requires_grad = requires_grad
        n_characters = tensors["_token_embedder._char_embedding_weights"].shape[0]
        self._token_embedder = _ElmoCharacterEncoder(options, n_characters)
        self._elmo_lstm = _ElmoLstm(options, stateful, backend)
        self.load_state_dict(tensors, strict=True)
        for name, param in self.named_parameters():
            param.requires_grad_(requires_grad and not name.endswith("bias_ih_l0"))
        self.num_layers = options.n_layers + 1
        self._word_embedding: Optional[torch.nn.Embedding] = None
        self.to(device=device, dtype=dtype)
        if vocab_to_cache:
            self.create_cached_cnn_embeddings(list(vocab_to_cache))

    def get_output_dim(self) -> int:
        return 2 * self.options.projection_dim

    def reset_states(self) -> None:
        """Forget the LSTM states carried over from earlier calls (the next call starts from zeros)."""
        self._elmo_lstm.reset_states()

    @property
    def stateful(self) -> bool:
        return self._elmo_lstm.stateful

    def create_cached_cnn_embeddings(self, tokens: list[str]) -> None:
        """The char-CNN embedding of each word of tokens, kept as _word_embedding (row i = tokens[i]), and of
        <S> and </S>; AllenNLP's cache (its words in batches of 32 x 32, the same function of each word)."""
        if not all(isinstance(t, str) for t in tokens):
            raise TypeError("vocab_to_cache must be a list of str")
        param = self._token_embedder._char_embedding_weights
        with torch.set_grad_enabled(self._requires_grad):
            ids = batch_to_ids([["<S>", "</S>", *tokens]])[0].to(param.device)  # (V + 2, 50)
            embedded = torch.cat([self._token_embedder.embed_tokens(chunk) for chunk in ids.split(1024)])
        self._word_embedding = torch.nn.Embedding.from_pretrained(embedded[2:].detach().clone(),
                                                                  freeze=not self._requires_grad)
        self.register_buffer("_bos_embedding", embedded[0].detach().clone(), persistent=False)
        self.register_buffer("_eos_embedding", embedded[1].detach().clone(), persistent=False)

    def _embed(self, character_ids: Tensor, word_inputs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if self._word_embedding is not None and word_inputs is not None:
            if word_inputs.shape != character_ids.shape[:2] and character_ids.numel():
                raise ValueError(f"word_inputs must have character_ids' (B, T) {tuple(character_ids.shape[:2])}, "
                                 f"got {tuple(word_inputs.shape)}")
            vocab = self._word_embedding.num_embeddings
            if not word_inputs.numel() or (word_inputs.min() >= 0 and word_inputs.max() < vocab):
                mask = word_inputs > 0  # (B, T)
                embedded = add_sentence_boundaries(self._word_embedding(word_inputs), mask.sum(1),
                                                   self._bos_embedding, self._eos_embedding)
                steps = torch.arange(embedded.shape[1], device=embedded.device)
                return embedded, steps < (mask.sum(1) + 2).unsqueeze(1)
        return self._token_embedder(character_ids)

    def forward(self, character_ids: Tensor, word_inputs: Optional[Tensor] = None) -> dict:
        _check_character_ids(character_ids, self.options, self._token_embedder._char_embedding_weights.shape[0])
        token_embedding, mask = self._embed(character_ids, word_inputs)  # (B, T + 2, P), (B, T + 2)
        if token_embedding.shape[0] == 0:
            layers = token_embedding.new_zeros((self.options.n_layers, *token_embedding.shape[:2],
                                                self.get_output_dim()))
        else:
            layers = self._elmo_lstm(token_embedding, mask)  # (L, B, T + 2, 2P)
        # The token layer is masked: the char-CNN of a padding token is not zero.
        first = torch.cat([token_embedding, token_embedding], dim=-1) * mask.unsqueeze(-1)
        return {"activations": [first, *layers.unbind(0)], "mask": mask}


# ----------------------------------------------------------------------------------------------- scalar mix

class ScalarMix(torch.nn.Module):
    """AllenNLP's ScalarMix: gamma * sum_k softmax(s)_k * layer_k, optionally each layer normalized first by
    the mean and variance over all unmasked elements of the whole batch (not a per-token LayerNorm)."""

    def __init__(self, mixture_size: int, do_layer_norm: bool = False,
                 initial_scalar_parameters: Optional[Sequence[float]] = None, trainable: bool = True) -> None:
        super().__init__()
        self.mixture_size, self.do_layer_norm = mixture_size, do_layer_norm
        if initial_scalar_parameters is None:
            initial_scalar_parameters = [0.0] * mixture_size
        elif len(initial_scalar_parameters) != mixture_size:
            raise ValueError(f"scalar_mix_parameters must have {mixture_size} values (one per layer), got "
                             f"{len(initial_scalar_parameters)}")
        self.scalar_parameters = torch.nn.ParameterList(
            torch.nn.Parameter(torch.tensor([float(v)]), requires_grad=trainable) for v in initial_scalar_parameters)
        self.gamma = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=trainable)

    def forward(self, tensors: Sequence[Tensor], mask: Optional[Tensor] = None) -> Tensor:
        if len(tensors) != self.mixture_size:
            raise ValueError(f"ScalarMix takes {self.mixture_size} tensors, got {len(tensors)}")
        weights = torch.softmax(torch.cat(list(self.scalar_parameters)), dim=0)
        if not self.do_layer_norm:
            return self.gamma * sum(w * t for w, t in zip(weights, tensors))
        if mask is None:
            raise ValueError("ScalarMix with do_layer_norm needs the mask")
        broadcast = mask.unsqueeze(-1).to(tensors[0].dtype)  # (B, T, 1)
        count = broadcast.sum() * tensors[0].shape[-1]
        tiny = 1e-4 if tensors[0].dtype == torch.float16 else 1e-13  # AllenNLP's tiny_value_of_dtype

        def normalize(t: Tensor) -> Tensor:
            masked = t * broadcast
            mean = masked.sum() / count
            variance = (((masked - mean) * broadcast) ** 2).sum() / count
            return (t - mean) / torch.sqrt(variance + tiny)

        return self.gamma * sum(w * normalize(t) for w, t in zip(weights, tensors))


# ----------------------------------------------------------------------------------------------- Elmo

class Elmo(torch.nn.Module):
    """AllenNLP's Elmo: num_output_representations learned mixes of the biLM's layers, with dropout.

    forward(character_ids (..., T, 50), word_inputs=None) -> {"elmo_representations": [(..., T, 2P)] * n,
    "mask": (..., T) bool}; leading dims beyond the batch are flattened and restored, as AllenNLP does.
    keep_sentence_boundaries=True keeps <S> and </S> (T + 2 steps). scalar_mix_parameters fixes the mix
    weights (not trained). The remaining keywords go to ElmoBiLm.
    """

    def __init__(self, options_file, weight_file, num_output_representations: int, requires_grad: bool = False,
                 do_layer_norm: bool = False, dropout: float = 0.5, vocab_to_cache: Optional[Sequence[str]] = None,
                 keep_sentence_boundaries: bool = False, scalar_mix_parameters: Optional[Sequence[float]] = None,
                 *, stateful: bool = True, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(num_output_representations, int) or num_output_representations < 1:
            raise ValueError(f"num_output_representations must be an int >= 1, got {num_output_representations!r}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self._elmo_lstm = ElmoBiLm(options_file, weight_file, requires_grad=requires_grad,
                                   vocab_to_cache=vocab_to_cache, stateful=stateful, backend=backend)
        self._has_cached_vocab = vocab_to_cache is not None
        self._keep_sentence_boundaries = keep_sentence_boundaries
        self._dropout = torch.nn.Dropout(p=dropout)
        self._scalar_mixes = []
        for k in range(num_output_representations):
            mix = ScalarMix(self._elmo_lstm.num_layers, do_layer_norm=do_layer_norm,
                            initial_scalar_parameters=scalar_mix_parameters,
                            trainable=scalar_mix_parameters is None)
            self.add_module(f"scalar_mix_{k}", mix)
            self._scalar_mixes.append(mix)
        self.to(device=device, dtype=dtype)

    def get_output_dim(self) -> int:
        return self._elmo_lstm.get_output_dim()

    def reset_states(self) -> None:
        self._elmo_lstm.reset_states()

    def forward(self, character_ids: Tensor, word_inputs: Optional[Tensor] = None) -> dict:
        if not isinstance(character_ids, Tensor) or character_ids.dim() < 3:
            shape = tuple(character_ids.shape) if isinstance(character_ids, Tensor) else type(character_ids).__name__
            raise ValueError(f"character_ids must be (B, T, 50) or have more leading dims, got {shape}")
        lead = character_ids.shape[:-2]
        ids = character_ids.reshape(-1, *character_ids.shape[-2:])  # (B', T, 50): leading dims flattened
        words = None
        if word_inputs is not None and self._has_cached_vocab:
            words = word_inputs.reshape(-1, word_inputs.shape[-1])  # (B', T)
        bilm = self._elmo_lstm(ids, words)
        layers, mask_with_boundaries = bilm["activations"], bilm["mask"]
        representations = []
        mask = mask_with_boundaries
        for mix in self._scalar_mixes:
            mixed = mix(layers, mask_with_boundaries)  # (B', T + 2, 2P)
            if not self._keep_sentence_boundaries:
                mixed, mask = remove_sentence_boundaries(mixed, mask_with_boundaries)
            representations.append(self._dropout(mixed))
        if not self._keep_sentence_boundaries:
            # (..., T, 2P): the caller's leading dims back
            representations = [r.view(*lead, *r.shape[1:]) for r in representations]
            mask = mask.view(*lead, mask.shape[-1])
        return {"elmo_representations": representations, "mask": mask}


# ----------------------------------------------------------------------------------------------- ElmoEmbedder

class ElmoEmbedder:
    """AllenNLP's ElmoEmbedder: every layer's vectors of tokenized sentences, as float32 numpy arrays
    (n_layers + 1, T, 2P), sentence boundaries removed; the biLM is stateful, as AllenNLP's."""

    def __init__(self, options_file, weight_file, *, device=None, batch_size: int = 64,
                 backend: str = "auto") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.elmo_bilm = ElmoBiLm(options_file, weight_file, device=device, backend=backend).eval()
        self.device = next(self.elmo_bilm.parameters()).device

    def batch_to_embeddings(self, batch: list[list[str]]) -> tuple[Tensor, Tensor]:
        """-> activations (B, n_layers + 1, T, 2P) and mask (B, T)."""
        with torch.no_grad():
            bilm = self.elmo_bilm(batch_to_ids(batch).to(self.device))
            pieces = [remove_sentence_boundaries(layer, bilm["mask"]) for layer in bilm["activations"]]
        return torch.stack([p[0] for p in pieces], dim=1), pieces[0][1]

    def embed_batch(self, batch: list[list[str]]) -> list:
        if not batch:
            return []
        embeddings, mask = self.batch_to_embeddings(batch)
        lengths = mask.sum(1).tolist()
        return [embeddings[i, :, :n].cpu().numpy() for i, n in enumerate(lengths)]

    def embed_sentence(self, sentence: list[str]):
        """One tokenized sentence -> (n_layers + 1, T, 2P); an empty one gives T = 0."""
        return self.embed_batch([sentence])[0]

    def embed_sentences(self, sentences: Iterable[list[str]], batch_size: Optional[int] = None):
        """A generator of embed_sentence's arrays, batch_size sentences (default: the embedder's) per call."""
        size = batch_size or self.batch_size
        batch = []
        for sentence in sentences:
            batch.append(sentence)
            if len(batch) == size:
                yield from self.embed_batch(batch)
                batch = []
        yield from self.embed_batch(batch)

    def embed_file(self, input_file, output_file_path, output_format: str = "all",
                   batch_size: Optional[int] = None, forget_sentences: bool = False,
                   use_sentence_keys: bool = False, progress: bool = True) -> None:
        """AllenNLP's `elmo` command: one dataset per line of input_file (a path or an open text file) in the
        hdf5 file output_file_path, keyed by line index (or the sentence), plus "sentence_to_index"."""
        from ctxkern.models._elmo_file import embed_file

        embed_file(self, input_file, output_file_path, output_format, batch_size, forget_sentences,
                   use_sentence_keys, progress)
