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
# Attention kernels at the head dims the tile configs branch on, with every feature on (padding mask, causal,
# varlen) so that each branch is lowered.
ATTENTION_KERNELS = [(kernel, d) for kernel in ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                                                "_attention_bwd_delta_kernel", "_attention_bwd_dq_kernel")
                     for d in (64, 128)]
CASE_IDS = [f"{kernel}-{dtype}-N{n}-sm_{arch}" for kernel, n, _ in ROW_KERNELS for dtype in DTYPES for arch in ARCHS] + \
           [f"_layer_norm_bwd_dwdb_kernel-{dtype}-sm_{arch}" for dtype in DTYPES for arch in ARCHS] + \
           [f"{kernel}-{dtype}-D{d}-sm_{arch}" for kernel, d in ATTENTION_KERNELS for dtype in DTYPES for arch in ARCHS]
LSTM_KERNELS = [(name, bias) for name in ("_lstm_cell_fwd_kernel", "_lstm_cell_bwd_kernel") for bias in (True, False)]
CASE_IDS += [f"{kernel}-bias{bias}-{dtype}-sm_{arch}" for kernel, bias in LSTM_KERNELS for dtype in DTYPES for arch in ARCHS]
# Masked mean pooling: (kernel, D, PACKED) at MiniLM and BERT-base widths, dense and packed.
POOL_KERNELS = [(kernel, d, packed) for kernel in ("_masked_mean_pool_fwd_kernel", "_masked_mean_pool_bwd_rows_kernel",
                                                   "_masked_mean_pool_bwd_kernel")
                for d in (384, 768) for packed in (False, True)]
CASE_IDS += [f"{kernel}-{dtype}-D{d}-{'packed' if packed else 'dense'}-sm_{arch}" for kernel, d, packed in POOL_KERNELS
             for dtype in DTYPES for arch in ARCHS]
# Shared memory per block (bytes) the kernels may use: the sm_80 (A100) and sm_90 (H100) limits.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


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


def _pool_signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Masked mean pooling: the mask is bytes, cu_seqlens int32, Mean fp32, other capitalized pointers `dtype`;
    B, S, D and the lowercase sizes and strides i32."""
    pointers = {"Mask": "*u8", "CuSeqlens": "*i32", "Mean": "*fp32"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("B", "S", "D") or not name[0].isupper():
            sig[name] = "i32"
        else:
            sig[name] = pointers.get(name, f"*{dtype}")
    return sig


def _pool_jobs() -> list:
    """(case, kernel, signature, constexprs, options) for the masked mean pooling kernels."""
    from ctxkern.kernels import masked_mean_pool as mmp

    jobs = []
    for name, d, packed in POOL_KERNELS:
        block_s, block_d, num_warps = mmp._row_config(d)
        # A packed call passes no mask (None, a constexpr); a dense one no cu_seqlens.
        absent = {"Mask": None} if packed else {"CuSeqlens": None}
        if name == "_masked_mean_pool_bwd_kernel":
            bcast_d = min(block_d, mmp._BCAST_MAX_COLS)
            consts = dict(PACKED=packed, BLOCK_T=mmp._TILE_ELEMENTS // bcast_d, BLOCK_D=bcast_d, **absent)
            num_warps = 4
        else:
            count_block = mmp._COUNT_BLOCK if name == "_masked_mean_pool_bwd_rows_kernel" else block_s
            consts = dict(NORMALIZE=True, PACKED=packed, BLOCK_S=count_block, BLOCK_D=block_d, **absent)
        case = f"{name}-{{dtype}}-D{d}-{'packed' if packed else 'dense'}"
        kernel = getattr(mmp, name)
        jobs += [(case.format(dtype=dtype), kernel, _pool_signature(kernel, dtype, consts), consts,
                  {"num_warps": num_warps}) for dtype in DTYPES]
    return jobs


def _attention_signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Tensors (capitalized names) in `dtype`, except the fp32 statistics, the uint8 mask and the int32
    offsets; the scale fp32; head count, lengths, head dim and strides i32."""
    special = {"Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8", "KvEnd": "*i32", "CuQ": "*i32", "CuK": "*i32"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in special:
            sig[name] = special[name]
        elif name in ("qk_scale_log2", "scale"):
            sig[name] = "fp32"
        elif name in ("H", "Sq", "Sk", "D") or not name[0].isupper():
            sig[name] = "i32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def _attention_jobs() -> list:
    import torch

    from ctxkern.kernels import attention as attn

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    jobs = []
    for name, d in ATTENTION_KERNELS:
        for dtype in DTYPES:
            tiles = (attn._tile_config if name == "_attention_fwd_kernel" else attn._bwd_tile_config)(
                d, torch_dtypes[dtype], interpreted=False)
            options = {key: tiles.pop(key) for key in ("num_warps", "num_stages")}
            consts = dict(CAUSAL=True, HAS_MASK=True, IS_VARLEN=True, PRECISION=attn._precision(
                torch_dtypes[dtype], torch.device("cuda")), **tiles)
            kernel = getattr(attn, name)
            consts = {key: value for key, value in consts.items() if key in kernel.arg_names}
            jobs.append((f"{name}-{dtype}-D{d}", kernel, _attention_signature(kernel, dtype, consts), consts, options))
    return jobs


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
        consts["HAS_DSUM" if backward else "STORE_SUM"] = True  # the prenorm paths too
        jobs += [(f"{name}-{dtype}-N{n}", getattr(ln, name), dtype, consts, num_warps) for dtype in DTYPES]
    consts = dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_G=ln._DWDB_BLOCK_G, BLOCK_N=ln._DWDB_BLOCK_N)
    jobs += [(f"_layer_norm_bwd_dwdb_kernel-{dtype}", ln._layer_norm_bwd_dwdb_kernel, dtype, consts, 4)
             for dtype in DTYPES]
    for name, bias in LSTM_KERNELS:
        consts = dict(HAS_BIAS=bias, BLOCK_B=lstm_cell.BLOCK_B, BLOCK_H=lstm_cell.BLOCK_H)
        jobs += [(f"{name}-bias{bias}-{dtype}", getattr(lstm_cell, name), dtype, consts, lstm_cell.NUM_WARPS)
                 for dtype in DTYPES]
    jobs = [(case, kernel, _signature(kernel, dtype, consts), consts, {"num_warps": num_warps})
            for case, kernel, dtype, consts, num_warps in jobs] + _pool_jobs() + _attention_jobs()
    results = {}
    for case, kernel, signature, consts, options in jobs:
        for arch in ARCHS:
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                shared = compiled.metadata.shared
                results[f"{case}-sm_{arch}"] = (
                    "no cubin produced" if not compiled.asm.get("cubin") else
                    f"needs {shared} bytes of shared memory, more than sm_{arch} has" if shared > SHARED_LIMIT[arch]
                    else "ok")
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
