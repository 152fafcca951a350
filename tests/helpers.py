"""What the tests share besides fixtures: backend parameters, the bundled model, tolerances. Imported as
`from helpers import ...` (tests/ is on sys.path, as for conftest.py, which sets up the environment first)."""
import pytest
import torch

import ctxkern

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch sees no CUDA device)")


# (backend, device) pairs every op is tested on. CUDA ones are skipped without a GPU; the others must run:
# a backend that should be available here and is not fails the test rather than skipping it.
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("triton", "cpu", id="triton-interpreted"),
    pytest.param("torch", "cuda", id="torch-cuda", marks=[pytest.mark.cuda, cuda_only]),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=[pytest.mark.cuda, cuda_only]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.cuda, cuda_only]),
]

# The kernel backends (not the torch reference) on each device: opcheck and torch.compile check each
# operator's fake against its kernel, on the CPU and, where there is a GPU, on CUDA.
KERNEL_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "torch"]


def bundled_model_folder():
    """The bundled all-MiniLM-L6-v2 folder. Every CPU machine has it (requirements.txt), and a test there fails
    without it; the GPU machine cannot take its 83 MB, so there the tests that need it skip."""
    from ctxkern.models import bundled_model_path

    try:
        return bundled_model_path()
    except RuntimeError as err:
        if HAS_CUDA:
            pytest.skip(f"{err} (the GPU machine gets no bundled model)")
        raise


def require_backend(backend: str) -> None:
    status = ctxkern.backends()[backend]
    assert status == "available", f"backend {backend!r} should run in this test run: {status}"


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), "output holds NaN (an element was not written?)"
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 against a float64 reference: about 1e-5 relative to the reference's scale."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = max_err(out, ref)
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def assert_low_precision_close(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor,
                               atol: float = 1e-5) -> None:
    """fp16/bf16: at most twice the error of PyTorch's own low-precision computation, plus a tiny atol."""
    err, torch_err = max_err(out, ref), max_err(torch_out, ref)
    assert err <= 2 * torch_err + atol, f"max error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol:g}"


def assert_close_for_dtype(out, ref, torch_out) -> None:
    if out.dtype == torch.float32:
        assert_fp32_close(out, ref)
    else:
        assert_low_precision_close(out, ref, torch_out)
