"""The model zoo: pure-PyTorch models whose LayerNorm, attention, pooling and LSTM cells are ctxkern ops."""
from ctxkern.models._checkpoint import CheckpointError
from ctxkern.models.bert import Bert, BertConfig, BertOutput
from ctxkern.models.clip import Clip, ClipConfig, ClipOutput, ClipTextConfig, ClipVisionConfig
from ctxkern.models.elmo import Elmo, ElmoBiLm, ElmoEmbedder, batch_to_ids
from ctxkern.models.sentence_encoder import SentenceEncoder, bundled_model_path

__all__ = ["Bert", "BertConfig", "BertOutput", "CheckpointError", "Clip", "ClipConfig", "ClipOutput",
           "ClipTextConfig", "ClipVisionConfig", "Elmo", "ElmoBiLm", "ElmoEmbedder", "SentenceEncoder",
           "batch_to_ids", "bundled_model_path"]
