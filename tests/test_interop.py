"""timm weights in and out, Hugging Face's in. The first tests need neither library (their
layouts are the documented key sets); those marked `interop` build real timm and transformers
models and run in a second environment (timm needs torchvision, which does not import beside the
CPU torch wheel of the main suite):

    pip install torch==2.14.1 torchvision==0.29.1 timm transformers -e . && python -m pytest -m interop
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cli_helpers as h
from vitlab.cli import main
from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop import (
    from_timm_state_dict,
    is_hf_layout,
    read_weight_file,
    resample_position_embedding,
    to_timm_state_dict,
)
from vitlab.model import ViT, preset

pytestmark = pytest.mark.usefixtures("one_thread")
# A small ViT with timm's layout, quick on a CPU (vit-tiny-16 is 5.7 M parameters at 224 px).
SMALL = dict(image_size=32, patch_size=8, width=48, depth=2, num_heads=3, mlp_dim=96)


def small(num_classes: int = 10, **changes) -> ViT:
    return ViT(preset("vit-tiny-16", num_classes, **{**SMALL, **changes}))


def test_timm_names_round_trip_and_the_layout():
    torch.manual_seed(0)
    model = small().eval()
    timm_state = to_timm_state_dict(model)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight",
            "head.bias"} <= set(timm_state)
    assert len(timm_state) == len(model.state_dict())
    again = small()
    again.load_state_dict(from_timm_state_dict(timm_state, again.config))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(images), model(images))


def test_position_embeddings_are_resampled_over_the_patch_grid():
    ramp = torch.arange(16.0).reshape(1, 16, 1).repeat(1, 1, 2)
    embedding = torch.cat([torch.full((1, 1, 2), -7.0), ramp], dim=1)  # CLS first
    assert resample_position_embedding(embedding, 4) is embedding
    bigger = resample_position_embedding(embedding, 8)
    assert bigger.shape == (1, 65, 2) and torch.equal(bigger[:, 0], embedding[:, 0])
    grid = bigger[0, 1:, 0].reshape(8, 8)
    assert (grid.diff(dim=1) >= -1e-5).all() and (grid.diff(dim=0) >= -1e-5).all()  # a ramp
    assert grid.min() > -1 and grid.max() < 16
    model = small(image_size=64)  # 8x8 patches from weights trained on 4x4
    state = from_timm_state_dict(to_timm_state_dict(small()), model.config)
    assert state["encoder.embedding.position_embedding"].shape == (1, 65, 48)


def test_wrong_timm_files_are_named_in_one_line():
    timm_state = to_timm_state_dict(small())
    config = small().config
    cases = [
        ({k: v for k, v in timm_state.items() if k != "blocks.1.norm2.bias"},
         "has no 'blocks.1.norm2.bias'"),
        ({**timm_state, "reg_token": torch.zeros(1, 4, 48)}, "has 'reg_token', which this"),
        ({**timm_state, "blocks.0.mlp.fc1.weight": torch.zeros(5, 48)}, "has shape [5, 48]"),
    ]
    for state, message in cases:
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[")) as info:
            from_timm_state_dict(state, config)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="pre-norm with a patch-projection bias"):
        to_timm_state_dict(ViT(preset("micro", 10)))
    for name in ("vitlab-mini-sl", "vitlab-mini-conv"):
        with pytest.raises(ConfigError, match="no shifted patch tokens, locality self-attention"):
            to_timm_state_dict(ViT(preset(name, 10)))
    assert "head.weight" not in from_timm_state_dict(
        {k: v for k, v in timm_state.items() if not k.startswith("head.")}, config, head=False)


def test_weight_files_nested_as_training_checkpoints_load_and_foreign_files_are_refused(
        tmp_path):
    state = to_timm_state_dict(small())
    for nest in ("state_dict", "model"):  # timm's and DeiT's training checkpoints
        path = tmp_path / f"{nest}.pth"
        torch.save({nest: state, "epoch": 3}, path)
        loaded = read_weight_file(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k])
                                                      for k in state)
    # timm's train.py: its arguments as an argparse.Namespace, and the optimizer's state.
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": state,
                "optimizer": optimizer.state_dict(), "version": 2,
                "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=0.1, smoothing=None,
                                           input_size=[3, 224, 224])},
               tmp_path / "checkpoint-3.pth.tar")
    assert read_weight_file(tmp_path / "checkpoint-3.pth.tar").keys() == state.keys()
    (tmp_path / "notes.pth").write_text("hello")
    torch.save({"weights": state, "recipe": _Pickled()}, tmp_path / "objects.pth")
    for name, why in (("notes.pth", "not a PyTorch file, or a torn one"),
                      ("objects.pth", "holds Python objects other than tensors")):
        with pytest.raises(CheckpointError, match="is not a PyTorch file of plain tensors") as e:
            read_weight_file(tmp_path / name)
        assert why in str(e.value) and "weights_only" not in str(e.value)  # never that advice


class _Pickled:
    """A Python object in a weight file: weights_only loading refuses it."""


def test_finetune_from_timm_weights_of_another_architecture_is_refused(tmp_path_factory, tmp_path, capfd):
    data = h.data_slices(tmp_path_factory)["cifar10"]
    torch.manual_seed(1)
    source = small(num_classes=1000)
    weights = tmp_path / "vit.safetensors"
    save_file(to_timm_state_dict(source), str(weights))
    # vit-tiny-16's architecture is 224 px / patch 16; these weights are the small variant, so
    # the wrong --model is named in one line ...
    capfd.readouterr()
    argv = ["finetune", "--from-timm", str(weights), "--data", str(data), "--epochs", "0",
            "--out", str(tmp_path / "fine"), "--no-download", "--no-progress"]
    assert main([*argv, "--model", "vit-tiny-16", "--image-size", "32"]) == 2
    line = h.assert_one_error_line(capfd.readouterr().err, "finetune")
    assert "the timm state dict has no 'blocks.10.attn.proj.bias' (and 119 more)" in line
    # ... as is a model without timm's layout (micro is post-norm), from Python too.
    from vitlab.runs import finetune

    with pytest.raises(ConfigError, match="pre-norm with a patch-projection bias"):
        finetune(from_timm=weights, data=data, out=tmp_path / "fine", model="micro",
                 no_download=True, quiet=True)


def test_from_timm_through_the_cli_with_a_custom_model_file(tmp_path_factory, tmp_path, capfd,
                                                            monkeypatch):
    """A preset with the small shape (registered for the test) fine-tunes from timm weights,
    resumes by the same command, and exports back to timm's names."""
    from vitlab import model as model_module

    monkeypatch.setitem(model_module.PRESETS, "tiny-test",
                        {**model_module.PRESETS["vit-tiny-16"], **SMALL})
    data = h.data_slices(tmp_path_factory)["cifar10"]
    torch.manual_seed(1)
    source = small(num_classes=1000)
    weights = tmp_path / "vit.safetensors"
    save_file(to_timm_state_dict(source), str(weights))
    out = tmp_path / "fine"
    argv = ["finetune", "--from-timm", str(weights), "--model", "tiny-test", "--data", str(data),
            "--epochs", "1", "--train-steps-per-epoch", "2", "--batch-size", "16", "--out",
            str(out), "--no-download", "--no-progress", "--log-steps", "0"]
    assert main([*argv[:7], "--epochs", "0", *argv[9:]]) == 0  # the initial weights
    start = load_file(str(out / "model.safetensors"))
    for key, tensor in source.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(start[key], tensor), key
    saved = json.loads((out / "config.json").read_text())
    assert saved["init"] == {"from": str(weights.resolve()), "weights": "timm", "encoder_tensors_"
                             "copied": len([k for k in start if k.startswith("encoder.")])}
    # timm's ViT weights (augreg) take inputs normalized by mean = std = 0.5 ...
    assert saved["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert main([*argv, "--overwrite"]) == 0
    capfd.readouterr()
    assert main([*argv, "--epochs", "2", "--resume", str(out)]) == 0, capfd.readouterr().err
    exported = tmp_path / "back.safetensors"
    assert main(["export", "--checkpoint", str(out), "--format", "timm", "--out",
                 str(exported)]) == 0
    back = load_file(str(exported))
    with safe_open(str(exported), "pt") as f:  # ... and the export says so
        assert json.loads(f.metadata()["vitlab.normalize_std"]) == [0.5] * 3
    trained = load_file(str(out / "model.safetensors"))
    assert torch.equal(back["pos_embed"], trained["encoder.embedding.position_embedding"])
    assert back["head.weight"].shape == (10, 48)


def _hf_names(timm_state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """timm's names as Hugging Face's ViTForImageClassification has them (transformers 4: the
    hub's files; 5: its state_dict()), written out here from transformers' modeling_vit, with a
    ViTModel pooler beside them."""
    hf = {}
    for name, tensor in timm_state.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            layer = f"vit.encoder.layer.{i}." if version == 4 else f"vit.layers.{i}."
            if rest.startswith("attn.qkv."):
                kind = parts[-1]
                names = (("attention.attention.query", "attention.attention.key",
                          "attention.attention.value") if version == 4 else
                         ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
                for part, piece in zip(names, tensor.chunk(3), strict=True):
                    hf[f"{layer}{part}.{kind}"] = piece
                continue
            renames = ({"norm1": "layernorm_before", "norm2": "layernorm_after",
                        "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                        "mlp.fc2": "output.dense"} if version == 4 else
                       {"norm1": "layernorm_before", "norm2": "layernorm_after",
                        "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
                        "mlp.fc2": "mlp.fc2"})
            module, kind = rest.rsplit(".", 1)
            hf[f"{layer}{renames[module]}.{kind}"] = tensor
        else:
            hf[{"cls_token": "vit.embeddings.cls_token",
                "pos_embed": "vit.embeddings.position_embeddings",
                "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
                "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
                "head.weight": "classifier.weight", "head.bias": "classifier.bias"}[name]] = tensor
    hf["vit.pooler.dense.weight"] = torch.zeros(2, 2)  # ViTModel's pooler: not a classifier's
    return hf


@pytest.mark.parametrize("version", [4, 5])
def test_hugging_face_vit_weights_load_by_their_names(version, tmp_path):
    """Hugging Face's ViT layout (transformers 4's hub files and 5's state_dict) converts to the
    same model: query, key and value stacked as timm's qkv; the pooler left out."""
    torch.manual_seed(0)
    model = small().eval()
    hf = _hf_names(to_timm_state_dict(model), version)
    assert is_hf_layout(hf) and not is_hf_layout(to_timm_state_dict(model))
    again = small()
    again.load_state_dict(from_timm_state_dict(hf, again.config))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(images), model(images))
    save_file(hf, str(tmp_path / "hf.safetensors"))  # through the file reader --from-timm uses
    assert from_timm_state_dict(read_weight_file(tmp_path / "hf.safetensors"), again.config,
                                head=False).keys() == {k for k in model.state_dict()
                                                       if not k.startswith("head.")}
    key = "attention.attention.key" if version == 4 else "attention.k_proj"
    layer = "vit.encoder.layer.1." if version == 4 else "vit.layers.1."
    without_key = {k: v for k, v in hf.items() if k != f"{layer}{key}.bias"}
    with pytest.raises(CheckpointError, match="block 1 has no k projection bias"):
        from_timm_state_dict(without_key, again.config)
    with pytest.raises(CheckpointError, match="'vit.layers.0.crossattention.weight', which"):
        from_timm_state_dict({**hf, "vit.layers.0.crossattention.weight": torch.zeros(1)},
                             again.config)
    with pytest.raises(CheckpointError, match="query, key and value bias tensors of shapes"):
        from_timm_state_dict({**hf, f"{layer}{key}.bias": torch.zeros(48, 7)}, again.config)
    for shape in ([37056], [1, 17, 48, 1], [2, 17, 48], [1, 1, 48]):
        with pytest.raises(CheckpointError, match="it needs \\[1, 1 \\+ patches, width\\]"):
            from_timm_state_dict({**hf, "vit.embeddings.position_embeddings":
                                  torch.zeros(shape)}, again.config)
    deit = {k.replace("vit.", "deit.", 1): v for k, v in hf.items()}
    with pytest.raises(CheckpointError, match="a 'deit' model's .* only Hugging Face's ViT"):
        from_timm_state_dict(deit, again.config)
    with pytest.raises(CheckpointError, match="distillation token"):
        from_timm_state_dict({**hf, "vit.embeddings.distillation_token": torch.zeros(1, 1, 48)},
                             again.config)


# --- against real timm (a second environment: pytest -m interop) ------------------------------

@pytest.mark.interop
def test_parity_with_timm_both_ways():
    timm = pytest.importorskip("timm", reason="the interop environment has timm")
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ours = ViT(preset("vit-tiny-16", 10)).eval()
    ours.load_state_dict(from_timm_state_dict(theirs.state_dict(), ours.config))
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=1e-5)
    # And back: vitlab's weights (trained a step, so they differ from timm's init) into timm.
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    ours.train()
    ours(images).square().mean().backward()
    optimizer.step()
    ours.eval()
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    fresh.load_state_dict(to_timm_state_dict(ours), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(images), ours(images), rtol=0, atol=1e-5)


@pytest.mark.interop
def test_position_embedding_resampling_matches_timm():
    pytest.importorskip("timm", reason="the interop environment has timm")
    from timm.layers import resample_abs_pos_embed

    embedding = torch.randn(1, 1 + 14 * 14, 192)
    for grid in (2, 7, 20):
        expected = resample_abs_pos_embed(embedding, (grid, grid), num_prefix_tokens=1)
        torch.testing.assert_close(resample_position_embedding(embedding, grid), expected,
                                   rtol=0, atol=1e-6)


def test_timm_weights_at_a_larger_input_with_batches_resized_on_the_device(
        tmp_path_factory, tmp_path, capfd, monkeypatch):
    """32 px CIFAR for a 64 px model: the stored images stay 32 px; each batch is resized on
    the device, in training, evaluation during training, and `vitlab evaluate` alike."""
    from vitlab import model as model_module
    from vitlab.data import SeedAugment
    from vitlab.data.augment import ResizeBatch

    monkeypatch.setitem(model_module.PRESETS, "tiny-test",
                        {**model_module.PRESETS["vit-tiny-16"], **SMALL})
    data = h.data_slices(tmp_path_factory)["cifar10"]
    weights = tmp_path / "vit.safetensors"
    save_file(to_timm_state_dict(small(num_classes=1000)), str(weights))
    out = tmp_path / "big"
    argv = ["finetune", "--from-timm", str(weights), "--model", "tiny-test", "--image-size",
            "64", "--resize-on-device", "--data", str(data), "--epochs", "1",
            "--train-steps-per-epoch", "2", "--batch-size", "16", "--eval-steps-per-epoch", "2",
            "--out", str(out), "--no-download", "--no-progress", "--log-steps", "0"]
    assert main(argv) == 0, capfd.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["image_size"] == 64 and config["options"]["resize_on_device"]
    (logged,) = [r for r in h.read_metrics(out) if r["event"] == "eval"]
    assert main(["evaluate", "--checkpoint", str(out), "--batch-size", "16", "--eval-steps", "2",
                 "--no-download"]) == 0
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["accuracy"] == logged["accuracy"] and report["num_samples"] == 32
    # The transform: the inner one's output, resized (bicubic, antialiased).
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(4)
    inputs, targets = ResizeBatch(SeedAugment(), 64)(images, labels, False, None)
    expected = torch.nn.functional.interpolate(SeedAugment().apply(images, False), size=(64, 64),
                                               mode="bicubic", antialias=True)
    assert torch.equal(inputs, expected) and torch.equal(targets, labels)


@pytest.mark.interop
def test_parity_with_hugging_face_transformers(tmp_path):
    """A ViTForImageClassification of transformers (whichever version the environment has, its
    state_dict's own names) loads into vitlab's timm-layout ViT with the same logits."""
    transformers = pytest.importorskip("transformers",
                                       reason="the interop environment has transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=96, image_size=32, patch_size=8,
                                    num_labels=10, layer_norm_eps=1e-6)
    theirs = transformers.ViTForImageClassification(config).eval()
    ours = small().eval()  # SMALL's shapes, LayerNorm eps 1e-6 (timm's; Hugging Face's 1e-12)
    ours.load_state_dict(from_timm_state_dict(theirs.state_dict(), ours.config))
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ours(images), theirs(pixel_values=images).logits, rtol=0,
                                   atol=1e-5)
    # The file users have: save_pretrained's model.safetensors (transformers 5 writes 4's names).
    theirs.save_pretrained(tmp_path / "hf")
    again = small().eval()
    again.load_state_dict(from_timm_state_dict(
        read_weight_file(tmp_path / "hf" / "model.safetensors"), again.config))
    with torch.inference_mode():
        torch.testing.assert_close(again(images), ours(images), rtol=0, atol=1e-6)
