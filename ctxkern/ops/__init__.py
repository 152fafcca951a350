"""The public functional ops: argument checks, backend choice, fake and autograd registration."""
from ctxkern.ops.layer_norm import layer_norm
from ctxkern.ops.lstm_cell import lstm_cell

__all__ = ["layer_norm", "lstm_cell"]
