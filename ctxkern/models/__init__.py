"""The model zoo: pure-PyTorch models whose LayerNorm, attention, pooling and LSTM cells are ctxkern ops."""
from ctxkern.models._checkpoint import CheckpointError
from ctxkern.models.bert import Bert, BertConfig, BertOutput
from ctxkern.models.sentence_encoder import SentenceEncoder, bundled_model_path

__all__ = ["Bert", "BertConfig", "BertOutput", "CheckpointError", "SentenceEncoder", "bundled_model_path"]
