"""The CPU attention's two tile products side by side: the register-blocked microkernel against MKL's sgemm_
(CTXKERN_CPU_ATTENTION_GEMM=microkernel|blas), with SDPA on the same inputs (the same boolean mask when padded),
forward and backward, fp32, at BERT / MiniLM / CLIP head dims (D = 32, 64, 80, 128) and S from 8 to 4096.

Each candidate runs in alternating blocks of calls (>= ~30 ms each), so that all of them see the same
interference on a shared machine; a cell is the fastest block's time per call (the cost without interference),
and the spread is the median block over the fastest. CLOCK=cpu times the process's CPU time instead of the wall
clock: on a machine that other jobs load, a descheduled thread then costs nothing, which makes one-thread
comparisons (THREADS=1) steadier; with two threads it counts the spin of the thread that waits at the end.
    THREADS=2 ROUNDS=5 [CLOCK=wall|cpu] python benchmarks/cpu_attention_gemm.py [targets|sweep] [fwd|bwd]
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from ctxkern import ops

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
BLOCK_S = float(os.environ.get("BLOCK_S", "0.03"))
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}[os.environ.get("CLOCK", "wall")]
GEMMS = ("blas", "microkernel")


def sdpa(q, k, v, mask):
    """SDPA left to choose its backend (flash on the CPU), in its (B, H, S, D) layout on views of ours."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2)


def ours(gemm):
    def run(q, k, v, mask):
        os.environ["CTXKERN_CPU_ATTENTION_GEMM"] = gemm  # read by the kernel on each call
        return ops.attention(q, k, v, key_padding_mask=mask, backend="cpu")
    return run


def backward_of(fn, q, k, v, mask, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def run():
        out = fn(*leaves, mask)
        return torch.autograd.grad(out, leaves, dout)
    return run


def time_blocks(fns: dict) -> dict:
    """name -> (fastest block's ms per call, median block / fastest), the candidates' blocks interleaved."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = CLOCK()
        fn()
        calls[name] = max(1, int(BLOCK_S / max(CLOCK() - start, 1e-6)))
    blocks = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            start = CLOCK()
            for _ in range(calls[name]):
                fn()
            blocks[name].append((CLOCK() - start) / calls[name] * 1e3)
    out = {}
    for name, times in blocks.items():
        times.sort()
        out[name] = (times[0], times[len(times) // 2] / times[0])
    return out


def measure(b, s, h, d, padding, direction):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    mask = None
    if padding:  # lengths spread evenly around (1 - padding) * S, as ctxkern/bench/attention.py's
        lengths = [max(1, round(s * (1 - padding) * (0.5 + i / max(1, b - 1)))) for i in range(b)]
        lengths = [min(s, n) for n in lengths]
        mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    cands = {"sdpa": sdpa, **{g_: ours(g_) for g_ in GEMMS}}
    if direction == "fwd":
        fns = {name: (lambda fn=fn: fn(q, k, v, mask)) for name, fn in cands.items()}
    else:
        dout = torch.randn(b, s, h, d, generator=g)
        fns = {name: backward_of(fn, q, k, v, mask, dout) for name, fn in cands.items()}
    # The two tile products must give the same attention (to fp32 rounding) before they are timed.
    blas, micro = (fns[name]() for name in GEMMS)
    for a, c in zip(*(r if isinstance(r, tuple) else (r,) for r in (blas, micro)), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    real = 1.0 if mask is None else mask.float().mean().item()
    return real, time_blocks(fns)


# (B, S, H, D, padding): the targets, then the sweep with B*H chosen to keep a call near a millisecond
# or more (4 * D * S^2 flops a head), at least 2 heads so that both threads have work.
TARGETS = [(8, 128, 12, 64, 0.0), (8, 128, 12, 64, 0.3)]


def sweep():
    shapes = []
    for d in (32, 64, 80, 128):
        for s in (8, 32, 128, 512, 2048, 4096):
            heads = max(2, min(4096, round(4e8 / (4 * d * s * s))))
            h = 12 if heads >= 12 else heads
            shapes.append((max(1, heads // h), s, h, d, 0.0))
    return shapes


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "targets"
    directions = sys.argv[2:] or ["fwd", "bwd"]
    shapes = TARGETS if which == "targets" else sweep()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ROUNDS} rounds, fp32, "
          f"{os.environ.get('CLOCK', 'wall')} clock; "
          "ms = fastest block, (x) = median block / fastest")
    print("| dir | B | S | H | D | real | sdpa ms | blas ms | microkernel ms | micro vs blas | micro vs sdpa |"
          " blas vs sdpa |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for direction in directions:
        for b, s, h, d, padding in shapes:
            real, r = measure(b, s, h, d, padding, direction)
            cells = " | ".join(f"{r[n][0]:.3f} ({r[n][1]:.2f})" for n in ("sdpa", "blas", "microkernel"))
            print(f"| {direction} | {b} | {s} | {h} | {d} | {real:.0%} | {cells} | "
                  f"{r['blas'][0] / r['microkernel'][0]:.2f}x | {r['sdpa'][0] / r['microkernel'][0]:.2f}x | "
                  f"{r['sdpa'][0] / r['blas'][0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
