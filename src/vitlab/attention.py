"""What a ViT looks at: attention rollout and the last layer's CLS attention, as patch maps.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): each
layer's head-averaged attention, with the residual connection counted as an identity
(0.5 A + 0.5 I, rows renormalised), multiplied through the layers; the CLS token's row, over the
patches, says how much each patch flowed into the representation the head classifies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitlab.model import ViT


def attention_weights(model: ViT, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(logits, per-block attention [B, heads, T, T]) in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model(images, return_attention=True)
    finally:
        model.train(was_training)


def rollout(attentions: list[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout from the CLS token to every patch: [B, num_patches], rows sum to 1."""
    tokens = attentions[0].shape[-1]
    identity = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)
    flow = identity.expand(attentions[0].shape[0], tokens, tokens)
    for weights in attentions:
        layer = (1 - residual) * weights.mean(dim=1) + residual * identity
        layer = layer / layer.sum(dim=-1, keepdim=True)
        flow = layer @ flow
    cls_to_patches = flow[:, 0, 1:]
    return cls_to_patches / cls_to_patches.sum(dim=-1, keepdim=True)


def last_layer_cls(attentions: list[Tensor]) -> Tensor:
    """The last block's attention from CLS to every patch, per head: [B, heads, num_patches]."""
    return attentions[-1][:, :, 0, 1:]


def as_grid(patch_values: Tensor) -> Tensor:
    """[..., num_patches] -> [..., side, side] (the patches of a square image, row by row)."""
    side = int(round(patch_values.shape[-1] ** 0.5))
    if side * side != patch_values.shape[-1]:
        raise ValueError(f"{patch_values.shape[-1]} patches do not make a square grid")
    return patch_values.reshape(*patch_values.shape[:-1], side, side)
