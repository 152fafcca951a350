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
    max_path: int           # the longest prompt
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

        def attend(q, k, v):
            k, v = k.index_select(0, self.path_index), v.index_select(0, self.path_index)
            return ops.attention_varlen(q, k, v, one_each, self.cu_paths, 1, self.max_path, causal=True,
                                        backend=backend)
        return attend


def prompt_tree(input_ids: Tensor, lengths: Tensor) -> PromptTree:
    """input_ids (B, S), lengths (B,) >= 1: each prompt is its first lengths[b] ids (up to its pooled token).

    Vectorized over the (B, S) ids, with the prompts in lexicographic order: there each prompt's longest common
    beginning with any earlier one is the one with its predecessor (lcp), so it adds the nodes from position lcp
    on, and the node at a shared position p is the one the last prompt up to it with lcp <= p added."""
    device = input_ids.device
    ids, lengths = input_ids.cpu(), lengths.cpu().long()
    batch, width = ids.shape
    rows = [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
    order = torch.tensor(sorted(range(batch), key=rows.__getitem__), dtype=torch.long)
    ids, lengths = ids[order], lengths[order]
    position = torch.arange(width)
    valid = position < lengths[:, None]                                             # (B, S)
    same = (ids[1:] == ids[:-1]) & valid[1:] & valid[:-1]
    lcp = F.pad(same.long().cumprod(1).sum(1), (1, 0))                              # (B,) with the previous
    new = valid & (position >= lcp[:, None])                                        # the nodes each one adds
    new_id = new.flatten().cumsum(0).view(batch, width) - 1
    creator = torch.where(lcp[:, None] <= position, torch.arange(batch)[:, None], 0).cummax(0).values
    node = new_id[creator, position]                                                # (B, S) where valid
    added = new.sum(1)
    adds = added > 0                                                                # a duplicate adds none
    unsorted = order.argsort()                                                      # back to the batch order
    node_b, valid_b, lengths_b = node[unsorted], valid[unsorted], lengths[unsorted]

    def cumulative(counts: Tensor) -> Tensor:
        return F.pad(counts.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)

    return PromptTree(
        tokens=ids[new].to(device), positions=position.expand(batch, width)[new].to(device),
        cu_seqlens_q=cumulative(added[adds]), kv_index=node[adds][valid[adds]].to(device),
        cu_seqlens_k=cumulative(lengths[adds]), max_seqlen_q=int(added.max()),
        max_seqlen_k=int(lengths[adds].max()), path_index=node_b[valid_b].to(device),
        cu_paths=cumulative(lengths_b), max_path=int(lengths.max()),
        pooled=node_b[torch.arange(batch), lengths_b - 1].to(device))
