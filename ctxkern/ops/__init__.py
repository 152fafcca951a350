"""The public functional ops: argument checks, backend choice, fake and autograd registration."""
from ctxkern.ops.attention import attention, attention_varlen
from ctxkern.ops.layer_norm import layer_norm

__all__ = ["attention", "attention_varlen", "layer_norm"]
