"""Backend choice and degradation: DESIGN.md's dispatch rules."""
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ctxkern
from ctxkern import _dispatch, ops


def test_backends_reports_every_backend():
    status = ctxkern.backends()
    assert set(status) == {"torch", "cpu", "cuda", "triton"}
    assert status["torch"] == "available"
    for name, value in status.items():
        assert value == "available" or value.startswith("unavailable: "), (name, value)


def test_auto_picks_the_compiled_cpu_backend_for_cpu_tensors():
    if _dispatch.ENV_BACKEND != "auto":
        pytest.skip(f"CTXKERN_BACKEND={_dispatch.ENV_BACKEND} is set for this test run")
    assert _dispatch.resolve("auto", torch.device("cpu")) == "cpu"


def test_ctxkern_backend_overrides_auto():
    """The variable is read when ctxkern is imported (once: a lookup per call was a measurable share of a small
    op's time), so it is set before the import, in a child process."""
    proc = _run_python("""
        import torch
        from ctxkern import _dispatch, ops
        print(_dispatch.resolve("auto", torch.device("cpu")), _dispatch.resolve("cpu", torch.device("cpu")))
    """, CTXKERN_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch", "cpu"]  # an explicit choice wins over the variable
    proc = _run_python("""
        import torch
        from ctxkern import ops
        try:
            ops.layer_norm(torch.randn(2, 4))
        except ValueError as err:
            print(err)
        print(ops.layer_norm(torch.randn(2, 4), backend="torch").shape)  # only "auto" consults the variable
    """, CTXKERN_BACKEND="gpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("CTXKERN_BACKEND must be one of")
    assert proc.stdout.splitlines()[1] == "torch.Size([2, 4])"


def test_resolve_caches_answers_but_not_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve(["cpu"], torch.device("cpu"))  # unhashable: still the named error
    with pytest.raises(RuntimeError, match="cannot run on a tensor on meta"):
        _dispatch.resolve("cpu", torch.device("meta"))
    assert _dispatch.resolve("torch", torch.device("meta")) == "torch"


def test_backend_that_cannot_run_on_the_device_says_so():
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run on a tensor on meta"):
        _dispatch.resolve("cpu", torch.device("meta"))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


BLOCK_IMPORT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {blocked!r}:
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
"""


def test_import_without_the_extension_warns_once_and_torch_serves():
    proc = _run_python(BLOCK_IMPORT.format(blocked={"ctxkern._C"}) + """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ctxkern
    import ctxkern.ops, ctxkern.nn
from ctxkern import ops
print(len([w for w in caught if "ctxkern._C is not built" in str(w.message)]))
print(ctxkern.backends()["cpu"])
x = torch.randn(3, 8)
print(float((ops.layer_norm(x) - torch.nn.functional.layer_norm(x, (8,))).abs().max()))
try:
    ops.layer_norm(x, backend="cpu")
except RuntimeError as err:
    print(err)
""")
    assert proc.returncode == 0, proc.stderr
    count, cpu_status, err, refusal = proc.stdout.strip().splitlines()
    assert count == "1"
    assert cpu_status.startswith("unavailable: ctxkern._C is not built")
    assert float(err) < 1e-5
    assert refusal.startswith("backend 'cpu' unavailable: ctxkern._C is not built")


def test_import_without_triton_works():
    # triton is hidden as an absent module is (sys.modules[name] = None): a finder that raises would also break
    # torch 2.14's own `import torch`, which asks importlib.util.find_spec("triton").
    proc = _run_python("""
import sys
sys.modules["triton"] = None
import torch, ctxkern
from ctxkern import ops
print(ctxkern.backends()["triton"])
print(ops.layer_norm(torch.randn(3, 8)).shape)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["unavailable: triton is not installed", "torch.Size([3, 8])"]


def _env(**overrides) -> dict:
    env = dict(os.environ)
    env.update(overrides)
    return env


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 build exists on x86-64 only")
@pytest.mark.parametrize("test_file,selection", [
    ("test_layer_norm.py", "cpu-cpu or cpu_outputs or opcheck"),
    # the cell's inlined exp and reciprocal have an AVX2 form of their own
    ("test_lstm_cell.py", "cpu-cpu"),
])
def test_the_avx2_build_passes_the_cpu_tests_too(test_file, selection):
    """The widest build the CPU runs serves the other tests; this reruns the CPU-backend tests on the AVX2 one
    (on an AVX-512 machine both builds are then verified)."""
    env = _env(CTXKERN_CPU_CAPABILITY="avx2")
    probe = subprocess.run([sys.executable, "-c", "from ctxkern import _dispatch; print(_dispatch.CPU_KERNELS)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.stdout.strip() == "avx2", probe.stdout + probe.stderr
    tests = Path(__file__).parent / test_file
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
                           "-k", selection], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_a_bad_cpu_capability_override_is_refused_with_the_reason():
    code = "import warnings, ctxkern; print(ctxkern.backends()['cpu'])"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=_env(CTXKERN_CPU_CAPABILITY="sse9"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("unavailable: CTXKERN_CPU_CAPABILITY must be one of")
    assert "the pure-PyTorch backend serves CPU tensors" in proc.stderr
