"""models/_prompt_tree.py: a batch of causal prompts laid out with each shared beginning once. The layout's
node rows and paths, and its attention against float64 causal attention of each prompt on its own."""
import pytest
import torch

from helpers import BACKEND_DEVICES, require_backend
from ctxkern.models._prompt_tree import prompt_tree

# Two alike beginnings, a duplicate, a prompt that is the beginning of another, and one sharing nothing.
ROWS = [[1, 5, 6, 7, 2], [1, 5, 6, 8, 9, 2], [1, 5, 6, 7, 2], [1, 5, 6], [3, 4]]


def tree_of(rows, device="cpu"):
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    return prompt_tree(ids, torch.tensor([len(r) for r in rows], device=device))


def test_layout_holds_each_shared_beginning_once():
    tree = tree_of(ROWS)
    # In lexicographic order: 1 5 6 | 7 2 (after it) | the duplicate adds none | 8 9 2 | 3 4.
    assert tree.tokens.tolist() == [1, 5, 6, 7, 2, 8, 9, 2, 3, 4]
    assert tree.positions.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0, 1]
    assert tree.cu_seqlens_q.tolist() == [0, 3, 5, 8, 10] and tree.cu_seqlens_k.tolist() == [0, 3, 8, 14, 16]
    assert tree.kv_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9]
    assert tree.pooled.tolist() == [4, 7, 4, 2, 9]
    assert tree.cu_paths.tolist() == [0, 5, 11, 16, 19, 21] and tree.shares
    for row, start, end in zip(ROWS, tree.cu_paths[:-1], tree.cu_paths[1:]):
        assert tree.tokens[tree.path_index[start:end]].tolist() == row       # each path spells its prompt


def test_prompts_sharing_nothing_need_no_gather():
    tree = tree_of([[1, 2, 3], [4, 5]])
    assert not tree.shares and tree.kv_index.tolist() == list(range(5))
    assert tree.cu_seqlens_q.tolist() == tree.cu_seqlens_k.tolist() == [0, 3, 5]


def causal_reference(q, k, v):
    """(n, heads, d) of one prompt, float64: each query over the keys up to it."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICES if p.values[1] == "cpu"])
@pytest.mark.parametrize("padding_rows", [0, 3])
def test_attention_equals_each_prompt_alone(backend, device, padding_rows):
    """Each node's attention output is its prompt's causal attention at that position, whichever prompt added
    the node; padding rows (as oneDNN's row count adds) leave the real rows alone."""
    require_backend(backend)
    tree = tree_of(ROWS, device)
    torch.manual_seed(0)
    rows = len(tree.tokens) + padding_rows
    # Per-node q, k, v as a function of the token and position (the same node gives the same vectors).
    table = torch.randn(10, 8, 3, 2, 16)
    q, k, v = table[torch.cat([tree.tokens, torch.zeros(padding_rows, dtype=torch.long)]),
                    torch.cat([tree.positions, torch.zeros(padding_rows, dtype=torch.long)])].unbind(1)
    out = tree.with_rows(rows).attend_segments(backend)(q, k, v)
    pooled = tree.attend_pooled(backend)(q[tree.pooled], k, v)
    assert out.shape == (rows, 2, 16) and pooled.shape == (len(ROWS), 2, 16)
    for i, row in enumerate(ROWS):
        path = tree.path_index[tree.cu_paths[i]:tree.cu_paths[i + 1]]
        ref = causal_reference(q[path], k[path], v[path])
        torch.testing.assert_close(out[path].double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[i].double(), ref[-1], rtol=1e-5, atol=1e-6)
    if padding_rows:                             # a padding row attends to itself alone: its own value
        torch.testing.assert_close(out[-padding_rows:], v[-padding_rows:], rtol=1e-5, atol=1e-6)


def test_random_batches_match_a_dict_trie():
    """Against the plain construction: a dict trie over the prompts in batch order (node count, paths spelling
    each prompt, shared positions mapped to one node), on batches with many shared beginnings."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = [torch.randint(1, 4, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                for _ in range(int(torch.randint(1, 12, (1,), generator=g)))]
        tree = tree_of(rows)
        prefixes = {tuple(r[:p + 1]) for r in rows for p in range(len(r))}
        assert len(tree.tokens) == len(prefixes)
        node_of = {}
        for i, row in enumerate(rows):
            path = tree.path_index[tree.cu_paths[i]:tree.cu_paths[i + 1]].tolist()
            assert tree.tokens[path].tolist() == row and tree.positions[path].tolist() == list(range(len(row)))
            for p, n in enumerate(path):
                assert node_of.setdefault(tuple(row[:p + 1]), n) == n
            assert tree.pooled[i] == path[-1]
        segments = tree.cu_seqlens_q.diff().tolist()
        assert sum(segments) == len(tree.tokens) and all(n > 0 for n in segments)
        q, k, v = torch.randn(3, len(tree.tokens), 1, 8, generator=g).unbind(0)
        out = tree.attend_segments("torch")(q, k, v)
        for i, row in enumerate(rows):
            path = tree.path_index[tree.cu_paths[i]:tree.cu_paths[i + 1]]
            torch.testing.assert_close(out[path].double(), causal_reference(q[path], k[path], v[path]),
                                       rtol=1e-5, atol=1e-6)
