"""ctxkern.nn.LSTM against torch.nn.LSTM at issue 13's LSTM target shapes, inference and training step side by side.

Runs alternate (torch, ctxkern, torch, ...) and each side's fastest run is kept: on a shared machine the minimum
is the cost without interference. With THREADS=1 the clock is the process's CPU time, which other processes
do not inflate (the only steady figure on a loaded machine); with more threads it is wall time.
    THREADS=2 REPS=10 python benchmarks/lstm_ratios.py [shape names] [inf|train]
"""
import os
import sys
import time

import torch

from ctxkern import nn

SHAPES = {  # name -> (torch.nn.LSTM config, T, B)
    "proj": (dict(input_size=256, hidden_size=512, proj_size=128, num_layers=2, bidirectional=True), 40, 16),
    "I128xH512": (dict(input_size=128, hidden_size=512, num_layers=1), 100, 16),
    "I300xH256xL2xbi": (dict(input_size=300, hidden_size=256, num_layers=2, bidirectional=True), 50, 32),
    "I64xH128xB1": (dict(input_size=64, hidden_size=128, num_layers=1), 20, 1),
}
THREADS = int(os.environ.get("THREADS", "2"))
REPS = int(os.environ.get("REPS", "10"))
clock = time.process_time if THREADS == 1 else time.perf_counter


def fastest_of_each(f, g, reps):
    f(), g()  # warm-up
    best_f = best_g = float("inf")
    for _ in range(reps):
        t = clock()
        f()
        best_f = min(best_f, clock() - t)
        t = clock()
        g()
        best_g = min(best_g, clock() - t)
    return best_f, best_g


def inference(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def training(model, x):
    x = x.clone().requires_grad_()
    params = list(model.parameters())

    def run():
        out = model(x)[0]
        torch.autograd.grad(out.sum(), [x, *params])
    return run


def main(args):
    torch.set_num_threads(THREADS)
    modes = [a for a in args if a in ("inf", "train")] or ["inf", "train"]
    names = [a for a in args if a in SHAPES] or list(SHAPES)
    print(f"{THREADS} thread(s), {'CPU' if THREADS == 1 else 'wall'} time, fastest of {REPS}; ratio = torch / ctxkern")
    for name in names:
        config, steps, batch = SHAPES[name]
        torch.manual_seed(0)
        theirs = torch.nn.LSTM(**config)
        ours = nn.LSTM(**config, backend="cpu")
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(steps, batch, config["input_size"])
        line = [f"{name} T{steps} B{batch}"]
        for mode in modes:
            make = inference if mode == "inf" else training
            t_theirs, t_ours = fastest_of_each(make(theirs, x), make(ours, x), REPS if steps * batch > 100 else 4 * REPS)
            line.append(f"{mode} {t_theirs / t_ours:.2f}x (ctxkern {t_ours * 1e3:.2f} ms, torch {t_theirs * 1e3:.2f} ms)")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
