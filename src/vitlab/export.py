"""Ship a trained model: ONNX (a dynamic batch axis) for runtimes without PyTorch, or a
safetensors file in timm's layout.

The exported graph takes normalized float images [batch, 3, H, W] ("images") and returns logits
[batch, num_classes] ("logits"), one per class name (a head made wider is cut to them, as
`predict` reads it). Its metadata holds what a user needs to feed it and read it:
the class names (JSON), the image size and the normalization mean/std.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitlab.data.augment import CIFAR_NORMALIZATION, Normalization
from vitlab.errors import ConfigError
from vitlab.io import atomic_write_bytes
from vitlab.model import ViT

FORMATS = ("onnx", "timm")
OPSET = 18


_SUFFIXES = {".onnx": "onnx", ".safetensors": "timm"}  # a file named for the other format


def _check_target(given: str | os.PathLike, suffix: str) -> Path:
    from vitlab.train.checkpoint import check_output_file

    path = Path(given)
    named_for = _SUFFIXES.get(path.suffix.lower())
    if named_for is not None and path.suffix.lower() != suffix:
        raise ConfigError(f"{path} is named like a --format {named_for} file; name it "
                          f"{path.with_suffix(suffix).name}")
    check_output_file(given, "--out", f"give the file's name, e.g. {path}/model{suffix}")
    if path.is_file() and path.suffix.lower() != suffix:  # a dataset's file, an image, ...
        raise ConfigError(f"--out {path} exists and is not a {suffix} file, which the export "
                          f"would replace; give a new name, or one ending in {suffix}")
    if path.is_file() and path.stat().st_size and not _exported_by_vitlab(path):
        raise ConfigError(f"--out {path} is a {suffix} file that vitlab did not export (it has "
                          "no vitlab.class_names in its metadata), which the export would "
                          "replace; give a new name")
    return path


def _exported_by_vitlab(path: Path) -> bool:
    """Whether `path` holds what export_onnx or export_timm writes (their metadata says so)."""
    try:
        if path.suffix.lower() == ".onnx":
            model = require_onnx().load(str(path), load_external_data=False)
            return any(p.key == "vitlab.class_names" for p in model.metadata_props)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return "vitlab.class_names" in (f.metadata() or {})
    except Exception:  # not a readable file of that format: not one of ours
        return False


def head_for(model: ViT, class_names: Sequence[str]) -> ViT:
    """`model` with one output per class name: a head made wider than the data's classes
    (`finetune --num-classes N`) has outputs that no name reads, which `predict` drops as well;
    an export drops them too, so its logits and its class names line up."""
    if model.config.num_classes == len(class_names):
        return model
    if model.config.num_classes < len(class_names):
        raise ConfigError(f"the model has {model.config.num_classes} outputs for "
                          f"{len(class_names)} class names")
    narrow = copy.deepcopy(model)
    narrow.config = dataclasses.replace(model.config, num_classes=len(class_names))
    narrow.head = nn.Linear(model.config.width, len(class_names),
                            device=model.head.weight.device, dtype=model.head.weight.dtype)
    with torch.no_grad():
        narrow.head.weight.copy_(model.head.weight[: len(class_names)])
        narrow.head.bias.copy_(model.head.bias[: len(class_names)])
    return narrow


def export_timm(model: ViT, path: str | os.PathLike, class_names: Sequence[str],
                normalization: Normalization = CIFAR_NORMALIZATION) -> Path:
    """The weights under timm's VisionTransformer names, as safetensors (class names and the
    input normalization in its metadata): `timm.create_model("vit_tiny_patch16_224",
    num_classes=N)` loads them; give timm's data config that mean and std."""
    from vitlab.interop import to_timm_state_dict
    from vitlab.train.checkpoint import save_weights

    path = _check_target(path, ".safetensors")
    model = head_for(model, class_names)
    save_weights(path, to_timm_state_dict(model), {
        "vitlab.class_names": json.dumps(list(class_names)), "format": "pt",
        **_normalization_metadata(normalization)})
    return path


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'vitlab[onnx]'"
                          ) from None
    return onnx


def _normalization_metadata(normalization: Normalization) -> dict[str, str]:
    return {"vitlab.normalize_mean": json.dumps(list(normalization.mean)),
            "vitlab.normalize_std": json.dumps(list(normalization.std))}


def export_onnx(model: ViT, path: str | os.PathLike, class_names: Sequence[str],
                opset: int = OPSET, normalization: Normalization = CIFAR_NORMALIZATION) -> Path:
    """Write `model` as an ONNX file at `path` (atomically), the inputs' `normalization` in its
    metadata; returns the path."""
    onnx = require_onnx()
    path = _check_target(path, ".onnx")
    # A copy: the caller's model keeps its mode and device.
    model = head_for(copy.deepcopy(model).eval().cpu(), class_names)
    config = model.config
    example = torch.zeros(2, config.num_channels, config.image_size, config.image_size)
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's notes on tracing are not the user's concern
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, input_names=["images"],
                          output_names=["logits"], opset_version=opset, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_model_from_string(buffer.getvalue())
    metadata = {"vitlab.class_names": json.dumps(list(class_names)),
                "vitlab.image_size": str(config.image_size),
                **_normalization_metadata(normalization),
                "vitlab.input": "float32 [batch, 3, H, W]: RGB / 255, minus mean, over std"}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
