"""ELMo benchmark: tokens/s of the whole biLM (characters -> every layer) and of its LSTM part.

Configurations: the released "small" (2x1024_128_2048cnn_1xhighway) and "original" (2x4096_512_2048cnn_2xhighway)
models' options, with random weights written in the real hdf5 layout and read by models.ElmoBiLm; batches of
B in {1, 32, 64} sentences of 20-30 words (T about 25, boundaries added), stateless so that runs repeat.
Candidates:
- "AllenNLP algorithm (eager)", the peer: AllenNLP's computation as AllenNLP runs it, ported here from its
  equations: the char-CNN with its per-sentence boundary loop, then per layer and direction
  LstmCellWithProjection's Python time loop (per step: clone the full-batch state, one Linear for the input and
  one for the state, the gates, the clips, the projection, write back into the full-batch state);
- ctxkern's ElmoBiLm per backend;
- for the LSTM part ("elmo_lstm", clipping off for all), torch.nn.LSTM with proj_size, the speed of light of the
  recurrence (its loop in C++, cuDNN on a GPU): per layer a forward and a backward module, the backward one fed
  each sequence reversed within its length, skip connections added as ELMo's.
Each candidate is checked first against the AllenNLP port run in float64.
tokens/s counts the real tokens (not the boundaries, not the padding).
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ctxkern.bench.case import Candidate, Case
from ctxkern.bench.peers import ctxkern_backends
from ctxkern.bench.sentences import WORDS

PEER = "AllenNLP algorithm (eager)"
FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]  # 2048 filters
CONFIGS = {"small": dict(dim=1024, projection_dim=128, n_highway=1, filters=FILTERS, char_dim=16),
           "original": dict(dim=4096, projection_dim=512, n_highway=2, filters=FILTERS, char_dim=16)}


def write_random_elmo(folder: Path, dim: int, projection_dim: int, n_highway: int, filters, char_dim: int,
                      seed: int = 0) -> tuple[Path, Path]:
    """options.json and weights.hdf5 of a random 2-layer biLM in the released files' layout."""
    import h5py

    options = {"lstm": {"cell_clip": 3, "use_skip_connections": True, "n_layers": 2, "proj_clip": 3,
                        "projection_dim": projection_dim, "dim": dim},
               "char_cnn": {"activation": "relu", "filters": filters, "n_highway": n_highway,
                            "embedding": {"dim": char_dim}, "n_characters": 262, "max_characters_per_token": 50}}
    (folder / "options.json").write_text(json.dumps(options))
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, fan_in):
        return (torch.randn(*shape, generator=g) / fan_in ** 0.5).numpy()

    n_filters, p = sum(n for _, n in filters), projection_dim
    with h5py.File(folder / "weights.hdf5", "w") as fout:
        fout["char_embed"] = rand(261, char_dim, fan_in=1)
        for i, (width, n) in enumerate(filters):
            fout[f"CNN/W_cnn_{i}"] = rand(1, width, char_dim, n, fan_in=width * char_dim)
            fout[f"CNN/b_cnn_{i}"] = rand(n, fan_in=n)
        for k in range(n_highway):
            for name in ("carry", "transform"):
                fout[f"CNN_high_{k}/W_{name}"] = rand(n_filters, n_filters, fan_in=n_filters)
                fout[f"CNN_high_{k}/b_{name}"] = rand(n_filters, fan_in=n_filters)
        fout["CNN_proj/W_proj"] = rand(n_filters, p, fan_in=n_filters)
        fout["CNN_proj/b_proj"] = rand(p, fan_in=p)
        for d in range(2):
            for layer in range(2):
                cell = f"RNN_{d}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
                fout[f"{cell}/W_0"] = rand(2 * p, 4 * dim, fan_in=2 * p)
                fout[f"{cell}/B"] = rand(4 * dim, fan_in=dim)
                fout[f"{cell}/W_P_0"] = rand(dim, p, fan_in=dim)
    return folder / "options.json", folder / "weights.hdf5"


# ----------------------------------------------------------------------------------------------- AllenNLP's algorithm

def allennlp_cell_loop(x: Tensor, lengths: list[int], w_ih, w_hh, b, w_hr, cell_clip, proj_clip, go_forward, h0=None,
                       c0=None) -> Tensor:
    """LstmCellWithProjection.forward: x (B, T, I) sorted by decreasing lengths -> (B, T, P), zeros past ends."""
    batch, total, _ = x.shape
    cell_size = w_hh.shape[0] // 4
    out = x.new_zeros(batch, total, w_hr.shape[0])
    memory = x.new_zeros(batch, cell_size) if c0 is None else c0
    state = x.new_zeros(batch, w_hr.shape[0]) if h0 is None else h0
    current = batch - 1 if go_forward else 0
    for step in range(total):
        index = step if go_forward else total - step - 1
        if go_forward:
            while lengths[current] <= index:
                current -= 1
        else:
            while current < len(lengths) - 1 and lengths[current + 1] > index:
                current += 1
        previous_memory = memory[:current + 1].clone()
        previous_state = state[:current + 1].clone()
        projected_input = F.linear(x[:current + 1, index], w_ih)
        projected_state = F.linear(previous_state, w_hh, b)
        gates = projected_input + projected_state
        i = torch.sigmoid(gates[:, :cell_size])
        f = torch.sigmoid(gates[:, cell_size:2 * cell_size])
        g = torch.tanh(gates[:, 2 * cell_size:3 * cell_size])
        o = torch.sigmoid(gates[:, 3 * cell_size:])
        new_memory = i * g + f * previous_memory
        if cell_clip:
            new_memory = torch.clamp(new_memory, -cell_clip, cell_clip)
        output = F.linear(o * torch.tanh(new_memory), w_hr)
        if proj_clip:
            output = torch.clamp(output, -proj_clip, proj_clip)
        memory, state = memory.clone(), state.clone()
        memory[:current + 1] = new_memory
        state[:current + 1] = output
        out[:current + 1, index] = output
    return out


def allennlp_lstm(x: Tensor, mask: Tensor, layers: list[dict], cell_clip, proj_clip) -> Tensor:
    """ElmoLstm: sort by length, forward and backward stacks with skip connections -> (L, B, T, 2P)."""
    lengths = mask.sum(1)
    sorted_lengths, order = lengths.sort(descending=True)
    restore = order.argsort()
    fwd = bwd = x.index_select(0, order)
    lens = sorted_lengths.tolist()
    outputs = []
    for k, layer in enumerate(layers):
        new_fwd = allennlp_cell_loop(fwd, lens, *layer["forward"], cell_clip, proj_clip, True)
        new_bwd = allennlp_cell_loop(bwd, lens, *layer["backward"], cell_clip, proj_clip, False)
        if k != 0:
            new_fwd, new_bwd = new_fwd + fwd, new_bwd + bwd
        fwd, bwd = new_fwd, new_bwd
        outputs.append(torch.cat((fwd, bwd), -1))
    return torch.stack(outputs).index_select(1, restore)


def allennlp_char_cnn(character_ids: Tensor, weights: dict, n_filters: int, n_highway: int) -> tuple[Tensor, Tensor]:
    """_ElmoCharacterEncoder.forward, with add_sentence_boundary_token_ids' loop over the sentences."""
    mask = (character_ids > 0).sum(-1) > 0
    lengths = mask.sum(1).tolist()
    batch, steps, chars = character_ids.shape
    ids = character_ids.new_zeros(batch, steps + 2, chars)
    ids[:, 1:-1] = character_ids
    for i, j in enumerate(lengths):
        ids[i, 0] = weights["bos"]
        ids[i, j + 1] = weights["eos"]
    new_mask = (ids > 0).sum(-1) > 0
    x = F.embedding(ids.view(-1, chars), weights["char_embed"]).transpose(1, 2)
    convs = [F.relu(torch.max(F.conv1d(x, w, b), dim=-1)[0]) for w, b in weights["convs"]]
    x = torch.cat(convs, dim=-1)
    for w, b in weights["highways"]:
        projected = F.linear(x, w, b)
        nonlinear, gate = projected[:, :n_filters], projected[:, n_filters:]
        gate = torch.sigmoid(gate)
        x = gate * x + (1 - gate) * F.relu(nonlinear)
    x = F.linear(x, *weights["projection"])
    return x.view(batch, steps + 2, -1), new_mask


class AllenNlpPort:
    """The AllenNLP port over an ElmoBiLm's weights (cast to dtype): __call__(character_ids) -> the layers,
    lstm(tokens (B, T + 2, P), mask) -> the LSTM layers; clip=False drops the clips (AllenNLP's 0)."""

    def __init__(self, bilm, dtype: torch.dtype, clip: bool = True) -> None:
        enc, o = bilm._token_embedder, bilm.options

        def t(p):
            return p.detach().to(dtype)

        self.options = o
        self.weights = {"char_embed": t(enc._char_embedding_weights), "bos": enc._beginning_of_sentence_characters,
                        "eos": enc._end_of_sentence_characters,
                        "convs": [(t(getattr(enc, f"char_conv_{i}").weight), t(getattr(enc, f"char_conv_{i}").bias))
                                  for i in range(len(o.filters))],
                        "highways": [(t(m.weight), t(m.bias)) for m in enc._highways._layers],
                        "projection": (t(enc._projection.weight), t(enc._projection.bias))}
        self.layers = lstm_weights(bilm._elmo_lstm, dtype)
        self.clips = (o.cell_clip, o.proj_clip) if clip else (0, 0)

    def lstm(self, tokens: Tensor, mask: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return list(allennlp_lstm(tokens, mask, self.layers, *self.clips).unbind(0))

    def __call__(self, character_ids: Tensor) -> list[Tensor]:
        with torch.no_grad():
            tokens, mask = allennlp_char_cnn(character_ids, self.weights, self.options.n_filters,
                                             self.options.n_highway)
            return [torch.cat((tokens, tokens), -1) * mask.unsqueeze(-1), *self.lstm(tokens, mask)]


def lstm_weights(lstm, dtype) -> list[dict]:
    """Per layer, per direction (W_ih, W_hh, b, W_hr) of an ElmoBiLm's LSTM (b = bias_ih + bias_hh)."""
    def of(m):
        return tuple(p.detach().to(dtype) for p in (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0 + m.bias_hh_l0,
                                                    m.weight_hr_l0))
    return [{d: of(getattr(lstm, f"{d}_layer_{k}")) for d in ("forward", "backward")} for k in range(lstm.num_layers)]


# ----------------------------------------------------------------------------------------------- torch.nn.LSTM

def torch_lstm(lstm, device) -> Callable[[Tensor, Tensor], Tensor]:
    """torch.nn.LSTM(proj_size) modules with the biLM's weights, no clipping: ELMo's stacks on cuDNN / torch's
    C++ loop. The backward stack runs forward over each sequence reversed within its own length."""
    modules = []
    for k in range(lstm.num_layers):
        pair = []
        for d in ("forward", "backward"):
            ours = getattr(lstm, f"{d}_layer_{k}")
            m = torch.nn.LSTM(ours.input_size, ours.hidden_size, proj_size=ours.proj_size, batch_first=True,
                              device=device)
            m.load_state_dict(ours.state_dict())
            pair.append(m)
        modules.append(pair)

    def run(x: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            lengths = mask.sum(1)
            steps = torch.arange(x.shape[1], device=x.device)
            # index of each step in the reversed sequence: l - 1 - t within the length, t beyond it
            rev = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)  # (B, T)

            def flip(y):
                return y.gather(1, rev.unsqueeze(-1).expand_as(y))

            lens = lengths.cpu()
            fwd, bwd = x, flip(x)
            outs = []
            for k, (mf, mb) in enumerate(modules):
                nf = pad_packed_sequence(mf(pack_padded_sequence(fwd, lens, batch_first=True,
                                                                 enforce_sorted=False))[0], batch_first=True,
                                         total_length=x.shape[1])[0]
                nb = pad_packed_sequence(mb(pack_padded_sequence(bwd, lens, batch_first=True,
                                                                 enforce_sorted=False))[0], batch_first=True,
                                         total_length=x.shape[1])[0]
                if k:
                    nf, nb = nf + fwd, nb + bwd
                fwd, bwd = nf, nb
                outs.append(torch.cat((fwd, flip(bwd)), -1))
            return torch.stack(outs)

    return run


# ----------------------------------------------------------------------------------------------- cases

def _sentences(batch: int, lengths: tuple[int, int], seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = [w.strip(".,;:'\"!?()") or w for w in WORDS]
    return [rng.choices(words, k=rng.randint(*lengths)) for _ in range(batch)]


def _bilm_cases(name: str, folder: Path, device: str, batches, lengths, rounds) -> list[Case]:
    from ctxkern.models import ElmoBiLm, batch_to_ids

    options, weights = write_random_elmo(folder, **CONFIGS[name])
    backends = ctxkern_backends(device)
    bilms = {b: ElmoBiLm(options, weights, stateful=False, device=device, backend=b).eval() for b in backends}
    ref_bilm = ElmoBiLm(options, weights, stateful=False, device=device, dtype=torch.float64, backend="torch")
    # the LSTM part without clipping, so that torch.nn.LSTM computes the same function
    noclip = json.loads(Path(options).read_text())
    noclip["lstm"]["cell_clip"] = noclip["lstm"]["proj_clip"] = 0
    (folder / "noclip.json").write_text(json.dumps(noclip))
    noclip_lstms = {b: ElmoBiLm(folder / "noclip.json", weights, stateful=False, device=device,
                                backend=b)._elmo_lstm.eval() for b in backends}
    eager, eager64 = AllenNlpPort(bilms[backends[0]], torch.float32), AllenNlpPort(ref_bilm, torch.float64)
    eager_noclip = AllenNlpPort(bilms[backends[0]], torch.float32, clip=False)
    eager64_noclip = AllenNlpPort(ref_bilm, torch.float64, clip=False)
    reference_torch = torch_lstm(noclip_lstms[backends[0]], device)
    cases = []
    o = CONFIGS[name]
    for batch in batches:
        sentences = _sentences(batch, lengths, seed=batch)
        ids = batch_to_ids(sentences).to(device)
        tokens = sum(len(s) for s in sentences)
        shape = f"{name} B={batch} T={ids.shape[1]} tokens={tokens}"
        whole = Case(op="elmo_bilm", shape=shape, dtype=torch.float32, bytes_moved=None, flops=None,
                     reference=lambda ids=ids: tuple(eager64(ids)), items=tokens, peer=PEER,
                     cpu_rounds=rounds, cpu_warmup=1,
                     candidates=[Candidate(PEER, lambda ids=ids: tuple(eager(ids)), baseline=True)])
        for b, bilm in bilms.items():
            def run(bilm=bilm, ids=ids):
                with torch.no_grad():
                    return tuple(bilm(ids)["activations"])
            whole.candidates.append(Candidate(f"ctxkern.{b} ElmoBiLm", run, baseline=False))
        cases.append(whole)

        with torch.no_grad():
            x, mask = bilms[backends[0]]._token_embedder(ids)  # the LSTM part's input (B, T + 2, P)
        x64 = x.double()
        part = Case(op="elmo_lstm", shape=shape + f" H={o['dim']} P={o['projection_dim']} no clip",
                    dtype=torch.float32, bytes_moved=None, flops=_lstm_flops(mask, o["dim"], o["projection_dim"]),
                    reference=lambda x64=x64, mask=mask: tuple(eager64_noclip.lstm(x64, mask)),
                    items=tokens, peer="torch.nn.LSTM (proj_size)", cpu_rounds=rounds, cpu_warmup=1,
                    candidates=[Candidate("torch.nn.LSTM (proj_size)",
                                          lambda x=x, mask=mask: tuple(reference_torch(x, mask)), baseline=True),
                                Candidate(PEER, lambda x=x, mask=mask: tuple(eager_noclip.lstm(x, mask)),
                                          baseline=True)])
        for b, lstm in noclip_lstms.items():
            def run_lstm(lstm=lstm, x=x, mask=mask):
                with torch.no_grad():
                    return tuple(lstm(x, mask))
            part.candidates.append(Candidate(f"ctxkern.{b}", run_lstm, baseline=False))
        cases.append(part)
    return cases


def _lstm_flops(mask: Tensor, h: int, p: int) -> float:
    """Matmul flops of the 2-layer biLSTM over the real steps (boundaries included): per step, layer and
    direction 2 * 4H * (P + P) for the gates and 2 * H * P for the projection."""
    steps = int(mask.sum())
    return 2 * 2 * steps * (2 * 4 * h * 2 * p + 2 * h * p)


def cases(device: str, quick: bool, with_compile: bool) -> list[Case]:
    with tempfile.TemporaryDirectory(prefix="ctxkern-bench-elmo-") as tmp:
        folder = Path(tmp)
        if quick:
            return _bilm_cases("small", folder, device, [4], (6, 10), rounds=2)
        out = []
        for name in CONFIGS:
            sub = folder / name
            sub.mkdir()
            out += _bilm_cases(name, sub, device, [1, 32, 64], (20, 30), rounds=5 if name == "small" else 3)
        return out
