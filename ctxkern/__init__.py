"""ctxkern: hand-written fused kernels (CUDA, Triton, C++) for contextual-embedding models."""
from ctxkern._dispatch import backends, warn_if_degraded

warn_if_degraded()

from ctxkern import nn, ops  # noqa: E402  (ops register against the extension loaded above)

__version__ = "0.1.0"
__all__ = ["backends", "nn", "ops", "__version__"]
