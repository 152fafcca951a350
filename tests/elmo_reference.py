"""A float64 ELMo biLM written from bilm-tf's equations, reading the hdf5 file's raw TensorFlow layouts directly
(none of ctxkern's conversions), one sentence at a time, with explicit loops: the oracle for tests/test_elmo.py.

Char-CNN: for each filter, conv[j, n] = sum_{w, d} E[chars[j + w], d] W_cnn[0, w, d, n] + b[n], the max over the
positions j, then the activation. Highway (TensorFlow's): t = sigmoid(x W_carry + b_carry),
x = (1 - t) x + t relu(x W_transform + b_transform). Projection x W_proj + b_proj.
LSTM cell (TensorFlow's LSTMCell with projection): [i, j, f, o] = [x, h] W_0 + B; c = sigmoid(f + 1) c +
sigmoid(i) tanh(j), clipped to +-cell_clip; h = (sigmoid(o) tanh(c)) W_P_0, clipped to +-proj_clip.
"""
from __future__ import annotations

import json

import h5py
import torch

# <S> and </S> as AllenNLP's ELMoCharacterMapper spells them: begin-of-word 258, begin / end-of-sentence 256 / 257,
# end-of-word 259, padding 260, every id + 1.
BOS = [259, 257, 260] + [261] * 47
EOS = [259, 258, 260] + [261] * 47


class ReferenceBiLm:
    def __init__(self, options_file, weight_file, requires_grad: bool = False):
        self.options = json.load(open(options_file))
        with h5py.File(weight_file, "r") as fin:
            self.w = {}
            fin.visititems(lambda name, obj: self.w.__setitem__(name, torch.from_numpy(obj[...]).double())
                           if isinstance(obj, h5py.Dataset) else None)
        if requires_grad:
            self.w["char_embed"].requires_grad_()

    # -------------------------------------------------------------------------------- token embedding

    def embed_token(self, char_ids: list[int]) -> torch.Tensor:
        """char_ids: 50 ids as batch_to_ids makes them (shifted by 1; 0 = the zero padding row)."""
        cnn = self.options["char_cnn"]
        table = torch.cat((torch.zeros(1, cnn["embedding"]["dim"], dtype=torch.float64), self.w["char_embed"]))
        e = table[torch.tensor(char_ids)]  # (50, char_dim)
        act = torch.relu if cnn["activation"] == "relu" else torch.tanh
        pooled = []
        for k, (width, n) in enumerate(cnn["filters"]):
            weight, bias = self.w[f"CNN/W_cnn_{k}"][0], self.w[f"CNN/b_cnn_{k}"]  # (width, dim, n)
            windows = e.unfold(0, width, 1)  # (positions, dim, width): windows[j, d, w] = e[j + w, d]
            conv = torch.einsum("jdw,wdn->jn", windows, weight) + bias  # (positions, n)
            pooled.append(act(conv.max(0).values))
        x = torch.cat(pooled)
        for k in range(cnn["n_highway"]):
            g = f"CNN_high_{k}/"
            t = torch.sigmoid(x @ self.w[g + "W_carry"] + self.w[g + "b_carry"])
            x = (1 - t) * x + t * torch.relu(x @ self.w[g + "W_transform"] + self.w[g + "b_transform"])
        return x @ self.w["CNN_proj/W_proj"] + self.w["CNN_proj/b_proj"]

    # -------------------------------------------------------------------------------- the LSTM

    def cell(self, direction: int, layer: int, x, h, c):
        o = self.options["lstm"]
        prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell/"
        i, j, f, out = (torch.cat((x, h)) @ self.w[prefix + "W_0"] + self.w[prefix + "B"]).chunk(4)
        c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(j)
        if o.get("cell_clip"):
            c = c.clamp(-o["cell_clip"], o["cell_clip"])
        h = (torch.sigmoid(out) * torch.tanh(c)) @ self.w[prefix + "W_P_0"]
        if o.get("proj_clip"):
            h = h.clamp(-o["proj_clip"], o["proj_clip"])
        return h, c

    def zero_state(self):
        o = self.options["lstm"]
        n, p, d = o["n_layers"], o["projection_dim"], o["dim"]
        return [[(torch.zeros(p, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)) for _ in range(n)]
                for _ in range(2)]

    def sentence(self, char_ids: list[list[int]], state=None):
        """One sentence's token char ids (without boundaries) -> (layers: list of (T + 2, 2P), final state);
        state[direction][layer] = (h, c) to start from (zeros when None)."""
        o = self.options["lstm"]
        tokens = torch.stack([self.embed_token(ids) for ids in [BOS, *char_ids, EOS]])  # (T + 2, P)
        state = state or self.zero_state()
        final = [[None] * o["n_layers"] for _ in range(2)]
        layers = [torch.cat((tokens, tokens), -1)]
        inputs = [tokens, tokens]
        steps = tokens.shape[0]
        for layer in range(o["n_layers"]):
            outs = []
            for direction in range(2):
                h, c = state[direction][layer]
                seq = [None] * steps
                for t in (range(steps) if direction == 0 else reversed(range(steps))):
                    h, c = self.cell(direction, layer, inputs[direction][t], h, c)
                    seq[t] = h
                final[direction][layer] = (h, c)
                y = torch.stack(seq)
                if o.get("use_skip_connections") and layer > 0:
                    y = y + inputs[direction]
                outs.append(y)
            inputs = outs
            layers.append(torch.cat(outs, -1))
        return layers, final
