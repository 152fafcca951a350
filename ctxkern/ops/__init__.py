"""The public functional ops: argument checks, backend choice, fake and autograd registration."""
from ctxkern.ops.attention import attention, attention_varlen
from ctxkern.ops.layer_norm import layer_norm
from ctxkern.ops.lstm_cell import lstm_cell
from ctxkern.ops.masked_mean_pool import masked_mean_pool, masked_mean_pool_varlen

__all__ = ["attention", "attention_varlen", "layer_norm", "lstm_cell", "masked_mean_pool", "masked_mean_pool_varlen"]
