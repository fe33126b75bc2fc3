"""Weights in other projects' layouts: timm's `VisionTransformer`, in and out.

timm's class-token ViTs without registers (the `vit_tiny/small/base_patch16_224` layout) name
their tensors `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm` and `head`. A pre-norm vitlab ViT with a patch bias
(`vit-tiny-16`, `vit-small-16`, or any config with `norm_first` and `patch_bias`, without shifted
patch tokens or locality self-attention) holds the same
tensors under `encoder.`-prefixed names, so the weights map one to one; the position embedding
is resampled (bicubic over the patch grid, the class token's kept) when the grids differ.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.errors import CheckpointError, ConfigError
from vitlab.model import ViT, ViTConfig

_RENAMES = {  # vitlab name -> timm name, for the tensors whose names differ beyond "encoder."
    "encoder.embedding.proj.weight": "patch_embed.proj.weight",
    "encoder.embedding.proj.bias": "patch_embed.proj.bias",
    "encoder.embedding.cls_token": "cls_token",
    "encoder.embedding.position_embedding": "pos_embed",
}


def _timm_name(ours: str) -> str:
    return _RENAMES.get(ours) or ours.removeprefix("encoder.")


def check_timm_layout(config: ViTConfig) -> None:
    if config.shifted_patches or config.locality_attention or config.conv_stem:
        raise ConfigError("timm's VisionTransformer has no shifted patch tokens, locality "
                          "self-attention or conv stem; use a model like vit-tiny-16 or "
                          "vit-small-16")
    if not (config.norm_first and config.patch_bias):
        raise ConfigError("timm's VisionTransformer is pre-norm with a patch-projection bias; "
                          "use a model like vit-tiny-16 or vit-small-16")


def to_timm_state_dict(model: ViT) -> dict[str, torch.Tensor]:
    """The model's weights under timm's names (load with timm's `model.load_state_dict`)."""
    check_timm_layout(model.config)
    return {_timm_name(k): v.detach().clone() for k, v in model.state_dict().items()}


def resample_position_embedding(embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: the patch positions resized bicubically as an
    image of the old grid, the class token's position kept as it is."""
    cls, patches = embedding[:, :1], embedding[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise CheckpointError(f"a position embedding of {patches.shape[1]} patches is not a "
                              "square grid")
    if old == grid:
        return embedding
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    # Antialiased bicubic, as timm's resample_abs_pos_embed does by default.
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False,
                          antialias=True)
    patches = image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(embedding.dtype)
    return torch.cat([cls, patches], dim=1)


def from_timm_state_dict(state_dict: dict[str, torch.Tensor], config: ViTConfig,
                         head: bool = True) -> dict[str, torch.Tensor]:
    """A timm ViT state dict as a vitlab state dict for `config` (position embedding resampled
    to its patch grid). `head=False` leaves the head out (fine-tuning starts a new one). Every
    missing, extra or mis-shaped tensor is named in one line."""
    check_timm_layout(config)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    with torch.device("meta"):  # names and shapes only: a meta-device model costs nothing
        target = ViT(config)
    shapes = {k: v.shape for k, v in target.state_dict().items()
              if head or not k.startswith("head.")}
    wanted = {_timm_name(k): k for k in shapes}
    ignored = {"head.weight", "head.bias"} if not head else set()
    missing = sorted(set(wanted) - set(state_dict))
    if missing:
        raise CheckpointError(f"the timm state dict has no {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; it is not a class-token ViT of this depth")
    extra = sorted(set(state_dict) - set(wanted) - ignored)
    if extra:
        raise CheckpointError(f"the timm state dict has {extra[0]!r}, which this model lacks"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; only class-token ViTs without registers or layer scale load")
    converted = {}
    for theirs, ours in wanted.items():
        tensor = state_dict[theirs]
        if ours == "encoder.embedding.position_embedding":
            tensor = resample_position_embedding(tensor, config.image_size // config.patch_size)
        if tuple(tensor.shape) != tuple(shapes[ours]):
            raise CheckpointError(f"timm tensor {theirs!r} has shape {list(tensor.shape)}; "
                                  f"{ours!r} needs {list(shapes[ours])} (another width, depth or "
                                  "patch size: choose the matching --model)")
        converted[ours] = tensor
    return converted


def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.bin/.pt file of plain tensors (loaded
    with weights_only=True: data, never code)."""
    from vitlab.train import checkpoint as ckpt

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give timm's weight file in it (.safetensors "
                              "or .pth)")
    if path.suffix == ".safetensors":
        return ckpt.load_weights(path)
    if not path.is_file():
        raise CheckpointError(f"no weight file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a foreign or torn file
        raise CheckpointError(f"{path} is not a PyTorch file of plain tensors "
                              f"({ckpt.load_failure(e)})") from None
    # Training checkpoints nest the weights: {"state_dict": ...} or {"model": ...} (DeiT, timm).
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state
