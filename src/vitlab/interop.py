"""Weights in other projects' layouts: timm's `VisionTransformer`, in and out; Hugging Face's
`ViTModel` / `ViTForImageClassification`, in (converted to timm's names first).

timm's class-token ViTs without registers (the `vit_tiny/small/base_patch16_224` layout) name
their tensors `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm` and `head`. A pre-norm vitlab ViT with a patch bias
(`vit-tiny-16`, `vit-small-16`, or any config with `norm_first` and `patch_bias`, without shifted
patch tokens or locality self-attention) holds the same
tensors under `encoder.`-prefixed names, so the weights map one to one; the position embedding
is resampled (bicubic over the patch grid, the class token's kept) when the grids differ.
"""

from __future__ import annotations

import argparse
import contextlib
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


# Hugging Face's ViT names -> timm's, for one block's tensors: transformers 4's (the layout of
# the checkpoints on its hub) and 5's (`state_dict()` of a model built by transformers 5).
_HF_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",  # transformers 4
    "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",  # 5
}
_HF_QKV = ({"attention.attention.query": "q", "attention.attention.key": "k",
            "attention.attention.value": "v"},  # transformers 4
           {"attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"})  # 5
_HF_OTHER = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
# Tensors of Hugging Face ViT models that a classifier does not use: ViTModel's pooler, and a
# mask token (a ViTModel built with use_mask_token).
_HF_UNUSED = ("pooler.", "embeddings.mask_token")
_HF_ONLY = "only Hugging Face's ViT weights (ViTModel, ViTForImageClassification) load"


def is_hf_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict names its tensors as Hugging Face's ViT does."""
    return any("embeddings.patch_embeddings." in k for k in state_dict)


def hf_to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ViT state dict under timm's names: each block's query, key and value
    stacked into timm's one qkv projection (in that order), the pooler and mask token left out.
    A tensor it cannot place is named in one line."""
    # The model family is the prefix of the embeddings' names: "vit." or none for ViT's.
    family = next(k.removeprefix("module.").split("embeddings.patch_embeddings.")[0]
                  for k in state_dict if "embeddings.patch_embeddings." in k)
    if family not in ("", "vit."):
        raise CheckpointError(f"the weights are a {family.rstrip('.')!r} model's (their names "
                              f"start {family!r}): {_HF_ONLY}")
    if any(k.endswith("embeddings.distillation_token") for k in state_dict):
        raise CheckpointError(f"the weights have a distillation token (DeiT's): {_HF_ONLY}")
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        key = name.removeprefix("module.").removeprefix("vit.")
        if key.startswith(_HF_UNUSED):
            continue
        if key in _HF_OTHER:
            converted[_HF_OTHER[key]] = tensor
            continue
        parts = key.split(".")
        layers = {"encoder.layer": 2, "layers": 1}  # transformers 4, 5: where the index is
        start = next((n for prefix, n in layers.items() if key.startswith(prefix + ".")), None)
        if start is None or not parts[start].isdigit():
            raise CheckpointError(f"the Hugging Face state dict has {name!r}, which a ViT "
                                  f"classifier lacks; {_HF_ONLY}")
        block, inner = int(parts[start]), ".".join(parts[start + 1:])
        module, _, kind = inner.rpartition(".")  # kind: weight or bias
        if module in _HF_BLOCK:
            converted[f"blocks.{block}.{_HF_BLOCK[module]}.{kind}"] = tensor
        elif any(module in names for names in _HF_QKV):
            which = next(names[module] for names in _HF_QKV if module in names)
            qkv.setdefault((block, kind), {})[which] = tensor
        else:
            raise CheckpointError(f"the Hugging Face state dict has {name!r}, which a ViT "
                                  f"block lacks (layer scale? Dinov2's has it); {_HF_ONLY}")
    for (block, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"the Hugging Face state dict's block {block} has no "
                                  f"{missing[0]} projection {kind}")
        shapes = {p: list(parts[p].shape) for p in "qkv"}
        if len({str(shape) for shape in shapes.values()}) > 1 or not shapes["q"]:
            raise CheckpointError(f"the Hugging Face state dict's block {block} has query, key "
                                  f"and value {kind} tensors of shapes {shapes['q']}, "
                                  f"{shapes['k']} and {shapes['v']}: they must be one shape")
        converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return converted


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
    if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[1] < 2:
        raise CheckpointError(f"a position embedding of shape {list(embedding.shape)}: it needs "
                              "[1, 1 + patches, width] (the class token's first)")
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
    """A timm ViT state dict (or a Hugging Face one, converted by `hf_to_timm_state_dict`) as a
    vitlab state dict for `config` (position embedding resampled to its patch grid).
    `head=False` leaves the head out (fine-tuning starts a new one). Every missing, extra or
    mis-shaped tensor is named in one line."""
    check_timm_layout(config)
    if is_hf_layout(state_dict):
        state_dict = hf_to_timm_state_dict(state_dict)
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
    # timm's train.py saves its arguments beside the weights as an argparse.Namespace: plain
    # attributes, allowed alone on top of weights_only's data types (torch >= 2.5 can).
    allowed = getattr(torch.serialization, "safe_globals", None)
    try:
        with allowed([argparse.Namespace]) if allowed else contextlib.nullcontext():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a foreign or torn file
        raise CheckpointError(f"{path} is not a PyTorch file of plain tensors "
                              f"({ckpt.load_failure(e)})") from None
    # Training checkpoints nest the weights: {"state_dict": ...} (timm's train.py, with "args",
    # "optimizer", ...) or {"model": ...} (DeiT).
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state
