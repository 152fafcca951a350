"""The tokens of a batch of causal prompts, each shared prefix computed once.

Under causal attention a token's states depend only on the tokens up to it, so two prompts that begin alike
("a photo of a cat." and "a photo of a dog.") have the same states over their common beginning. The prompts
(each up to its pooled token) are laid out as a prefix tree: one row per tree node. Each prompt contributes the
nodes it adds to the tree as one segment of query rows; the segment's keys are the prompt's whole path from the
root (the shared nodes an earlier prompt computed, then its own), so causal attention aligned at the bottom
right (attention_varlen's convention) gives each query exactly its prompt's tokens up to it. Zero-shot prompts
(templates times labels) share most of their tokens: the work falls to the tokens that differ.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxkern import ops
from ctxkern.models._transformer import Attend


class PromptTree(NamedTuple):
    tokens: Tensor          # (N,) the token id of each node
    positions: Tensor       # (N,) its position in its prompts (the depth in the tree)
    cu_seqlens_q: Tensor    # int32 (G + 1,): the query segments, consecutive node rows
    kv_index: Tensor        # (K,) the node rows each segment attends to: its prompt's path from the root
    cu_seqlens_k: Tensor    # int32 (G + 1,)
    max_seqlen_q: int
    max_seqlen_k: int
    path_index: Tensor      # (sum of the prompt lengths,) every prompt's path, for its pooled query alone
    cu_paths: Tensor        # int32 (B + 1,)
    pooled: Tensor          # (B,) each prompt's last node (its pooled token)

    @property
    def shares(self) -> bool:
        """Whether any node serves more than one prompt (else a plain packing is the same layout)."""
        return len(self.tokens) < len(self.path_index)

    def with_rows(self, rows: int) -> "PromptTree":
        """The layout with node rows N: rows appended (zero rows a caller pads with, see pad_rows_for_onednn),
        each a one-row segment attending to itself alone."""
        extra = rows - len(self.tokens)
        if extra == 0:
            return self
        new = torch.arange(len(self.tokens), rows, device=self.kv_index.device)
        steps = torch.arange(1, extra + 1, dtype=torch.int32, device=self.kv_index.device)
        return self._replace(cu_seqlens_q=torch.cat([self.cu_seqlens_q, self.cu_seqlens_q[-1] + steps]),
                             kv_index=torch.cat([self.kv_index, new]),
                             cu_seqlens_k=torch.cat([self.cu_seqlens_k, self.cu_seqlens_k[-1] + steps]))

    def attend_segments(self, backend: str) -> Attend:
        """Causal attention of every node row (q, k, v: (rows, heads, head_dim)) over its prompt's path."""
        def attend(q, k, v):
            if self.shares:
                k, v = k.index_select(0, self.kv_index), v.index_select(0, self.kv_index)
            return ops.attention_varlen(q, k, v, self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q,
                                        self.max_seqlen_k, causal=True, backend=backend)
        return attend

    def attend_pooled(self, backend: str) -> Attend:
        """Attention of each prompt's pooled query alone (q: (B, heads, head_dim), k, v: node rows) over its
        path."""
        one_each = torch.arange(len(self.pooled) + 1, dtype=torch.int32, device=self.pooled.device)
        longest = int((self.cu_paths[1:] - self.cu_paths[:-1]).max())

        def attend(q, k, v):
            k, v = k.index_select(0, self.path_index), v.index_select(0, self.path_index)
            return ops.attention_varlen(q, k, v, one_each, self.cu_paths, 1, longest, causal=True,
                                        backend=backend)
        return attend


def prompt_tree(rows: list[list[int]], device: torch.device) -> PromptTree:
    """rows: each prompt's token ids up to and including its pooled token (none empty)."""
    children: dict[tuple[int, int], int] = {}          # (parent node or -1, token) -> node
    tokens: list[int] = []
    positions: list[int] = []
    paths: list[list[int]] = []
    added: list[int] = []                               # the nodes each prompt adds: always its path's last ones
    for row in rows:
        before, node, path = len(tokens), -1, []
        for position, token in enumerate(row):
            node = children.setdefault((node, token), len(tokens))
            if node == len(tokens):
                tokens.append(token)
                positions.append(position)
            path.append(node)
        paths.append(path)
        added.append(len(tokens) - before)
    segments = [(path, n) for path, n in zip(paths, added) if n]      # a prompt already in the tree adds none
    return PromptTree(
        tokens=torch.tensor(tokens, device=device), positions=torch.tensor(positions, device=device),
        cu_seqlens_q=_cumulative([n for _, n in segments], device),
        kv_index=_flat([path for path, _ in segments], device),
        cu_seqlens_k=_cumulative([len(path) for path, _ in segments], device),
        max_seqlen_q=max(n for _, n in segments), max_seqlen_k=max(len(path) for path, _ in segments),
        path_index=_flat(paths, device), cu_paths=_cumulative([len(path) for path in paths], device),
        pooled=torch.tensor([path[-1] for path in paths], device=device))


def _cumulative(lengths: list[int], device: torch.device) -> Tensor:
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)


def _flat(lists: list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor([n for nodes in lists for n in nodes], dtype=torch.long, device=device)
