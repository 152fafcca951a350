"""AllenNLP's LSTM with projection and clipping (LstmCellWithProjection's equations) as a plain float64 loop,
one sequence at a time, with torch's gate order and parameter names: the reference of ctxkern.nn.LSTM's
cell_clip and proj_clip, forward and (through autograd) backward."""
from typing import Optional

import torch


def allennlp_reference(lstm, x, lengths, cell_clip, proj_clip, params: Optional[dict] = None, h0=None, c0=None):
    """Per layer and direction, the memory cell is clamped to +-cell_clip before its tanh and the projected
    state to +-proj_clip. x: (T, B, I) padded; params: float64 tensors by state_dict name (default: lstm's,
    detached), pass leaves that require grad to differentiate; h0 (L * D, B, P) / c0 (L * D, B, H): the initial
    state (default zeros). -> outputs (T, B, D * P) (zeros past each length), h_n, c_n."""
    if params is None:
        params = {k: v.detach().double() for k, v in lstm.state_dict().items()}
    ndir = 2 if lstm.bidirectional else 1
    outputs = [[None] * x.shape[1] for _ in range(x.shape[0])]
    h_n = [[None] * x.shape[1] for _ in range(lstm.num_layers * ndir)]
    c_n = [[None] * x.shape[1] for _ in range(lstm.num_layers * ndir)]
    for b, length in enumerate(lengths):
        layer_input = x[:length, b].double()
        for layer in range(lstm.num_layers):
            per_direction = []
            for d in range(ndir):
                k, sfx = layer * ndir + d, f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh, w_hr = params["weight_ih" + sfx], params["weight_hh" + sfx], params["weight_hr" + sfx]
                bias = params["bias_ih" + sfx] + params["bias_hh" + sfx]
                h = torch.zeros(lstm.proj_size, dtype=torch.float64) if h0 is None else h0[k, b]
                c = torch.zeros(lstm.hidden_size, dtype=torch.float64) if c0 is None else c0[k, b]
                out = [None] * length
                for t in (reversed(range(length)) if d else range(length)):
                    i, f, g, o = (w_ih @ layer_input[t] + w_hh @ h + bias).chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    c = c.clamp(-cell_clip, cell_clip)
                    h = (w_hr @ (torch.sigmoid(o) * torch.tanh(c))).clamp(-proj_clip, proj_clip)
                    out[t] = h
                h_n[k][b], c_n[k][b] = h, c
                per_direction.append(torch.stack(out))
            layer_input = torch.cat(per_direction, dim=1)
        for t in range(x.shape[0]):
            outputs[t][b] = layer_input[t] if t < length else layer_input.new_zeros(layer_input.shape[1])
    stack2 = lambda rows: torch.stack([torch.stack(r) for r in rows])  # noqa: E731
    return stack2(outputs), stack2(h_n), stack2(c_n)
