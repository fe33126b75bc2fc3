"""Fine-tuning's starting point: a fresh model whose encoder is a pre-trained one's."""

from __future__ import annotations

import torch

from vitlab.errors import CheckpointError
from vitlab.model import ViT

ENCODER_PREFIX = "encoder."


def encoder_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a full ViT state dict, keyed without the `encoder.` prefix."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items()
            if k.startswith(ENCODER_PREFIX)}


def load_encoder_weights(model: ViT, pretrained: dict[str, torch.Tensor]) -> int:
    """Copy every encoder tensor (patch and position embeddings, CLS token, blocks, final norm)
    of a pre-trained ViT state dict into `model`; its head stays freshly initialised.

    Returns the number of tensors copied. Raises `CheckpointError` naming the first tensor that is
    missing or does not fit.
    """
    source = encoder_state(pretrained)
    target = model.encoder.state_dict()
    missing = sorted(set(target) - set(source))
    if missing:
        raise CheckpointError(f"the pre-trained weights have no encoder tensor {missing[0]!r}; "
                              "they come from another architecture or are not a vitlab ViT's")
    extra = sorted(set(source) - set(target))
    if extra:
        raise CheckpointError(f"the pre-trained encoder has a tensor {extra[0]!r} this model "
                              "lacks; use the same --model as the pre-training run")
    for key, tensor in source.items():
        if tensor.shape != target[key].shape:
            raise CheckpointError(
                f"pre-trained encoder tensor {key!r} has shape {list(tensor.shape)}, this model "
                f"needs {list(target[key].shape)}; fine-tune the architecture you pre-trained")
    model.encoder.load_state_dict(source, strict=True)
    return len(source)
