"""The public functional ops: argument checks, backend choice, fake and autograd registration."""
from ctxkern.ops.layer_norm import layer_norm

__all__ = ["layer_norm"]
