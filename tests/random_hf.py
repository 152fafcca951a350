"""Random Hugging Face BERT weights for parity tests (imported by test_bert.py and test_sentence_encoder.py)."""
import torch


def randomize(model):
    """Weights large enough that every part of the model shows in the output: at Hugging Face's initializer_range
    of 0.02 the sublayers barely move the residual stream, and exact GELU would pass for gelu_new. LayerNorm
    weights and all biases are random too, so a swapped weight and bias or a dropped bias shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("LayerNorm.weight") else 0.2 * torch.randn_like(p))
    return model
