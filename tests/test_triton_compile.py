"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (to PTX and, through Triton's bundled ptxas,
to a cubin), so a machine without a GPU still catches what the interpreter lets through: unsupported
operations, type errors in the lowering, register-file overflows.

The compiling runs in a child process: under TRITON_INTERPRET=1 (how the other tests run Triton on CPU
machines) Triton's own library functions are interpreted ones, which its compiler cannot lower.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
# (kernel, N, backward tile config) for the row kernels; the dweight/dbias reduction has no N in its config.
ROW_KERNELS = [("_layer_norm_fwd_kernel", n, False) for n in (768, 4096)] + \
              [("_layer_norm_bwd_kernel", n, True) for n in (768, 4096)]
LSTM_KERNELS = [(name, bias) for name in ("_lstm_cell_fwd_kernel", "_lstm_cell_bwd_kernel") for bias in (True, False)]
CASE_IDS = [f"{kernel}-{dtype}-N{n}-sm_{arch}" for kernel, n, _ in ROW_KERNELS for dtype in DTYPES for arch in ARCHS] + \
           [f"_layer_norm_bwd_dwdb_kernel-{dtype}-sm_{arch}" for dtype in DTYPES for arch in ARCHS] + \
           [f"{kernel}-bias{bias}-{dtype}-sm_{arch}" for kernel, bias in LSTM_KERNELS for dtype in DTYPES for arch in ARCHS]


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Storage pointers (capitalized names) get `dtype`, statistics and workspaces fp32; sizes and strides i32,
    eps and clip fp32."""
    fp32_pointers, sizes = {"Mean", "Rstd", "DW_partial", "DB_partial"}, {"M", "N", "G"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in sizes or not name[0].isupper():
            sig[name] = "fp32" if name in ("eps", "clip") else "i32"
        else:
            sig[name] = "*fp32" if name in fp32_pointers else f"*{dtype}"
    return sig


def compile_all() -> dict[str, str]:
    """{case id: "ok" or the compiler's error}; run with TRITON_INTERPRET unset."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ctxkern.kernels import layer_norm as ln
    from ctxkern.kernels import lstm_cell

    jobs = []
    for name, n, backward in ROW_KERNELS:
        block_m, block_n, num_warps = ln._tile_config(8192, n, backward=backward)
        consts = dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n)
        jobs += [(f"{name}-{dtype}-N{n}", getattr(ln, name), dtype, consts, num_warps) for dtype in DTYPES]
    consts = dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_G=ln._DWDB_BLOCK_G, BLOCK_N=ln._DWDB_BLOCK_N)
    jobs += [(f"_layer_norm_bwd_dwdb_kernel-{dtype}", ln._layer_norm_bwd_dwdb_kernel, dtype, consts, 4)
             for dtype in DTYPES]
    for name, bias in LSTM_KERNELS:
        consts = dict(HAS_BIAS=bias, BLOCK_B=lstm_cell.BLOCK_B, BLOCK_H=lstm_cell.BLOCK_H)
        jobs += [(f"{name}-bias{bias}-{dtype}", getattr(lstm_cell, name), dtype, consts, lstm_cell.NUM_WARPS)
                 for dtype in DTYPES]
    results = {}
    for case, kernel, dtype, consts, num_warps in jobs:
        for arch in ARCHS:
            try:
                source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, consts), constexprs=consts)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                results[f"{case}-sm_{arch}"] = "ok" if compiled.asm.get("cubin") else "no cubin produced"
            except Exception as err:  # reported per case by the tests below
                results[f"{case}-sm_{arch}"] = f"{type(err).__name__}: {err}"
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASE_IDS)
def test_triton_kernel_compiles(compiled, case):
    assert compiled.get(case) == "ok", compiled.get(case, "case not compiled")


if __name__ == "__main__":
    print(json.dumps(compile_all()))
