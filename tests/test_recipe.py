"""The vitlab recipe's parts: Random Erasing, Mixup/CutMix (soft targets), stochastic depth,
weight decay groups, the cosine floor; and the `vitlab` recipe and preset themselves."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cli_helpers as h
from vitlab.cli import main
from vitlab.data import SeedAugment
from vitlab.data.augment import MixupCutmix, PolicyAugment, RandomErasing, VitlabAugment
from vitlab.data.autoaugment import TrivialAugmentWide
from vitlab.errors import ConfigError
from vitlab.model import EncoderBlock, ViT, ViTConfig, forward_flops, preset
from vitlab.train.recipe import build_optimizer, lr_factor, recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _box(changed: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The bounding box of a [H, W] bool mask, checked to be a filled rectangle."""
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    if len(rows) == 0:
        return None
    y0, y1, x0, x1 = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
    assert changed[y0:y1, x0:x1].all() and changed.sum() == (y1 - y0) * (x1 - x0)
    return y0, y1, x0, x1


@pytest.mark.parametrize("everywhere", [False, True], ids=["cpu-form", "sync-free-form"])
def test_random_erasing_draws_one_rectangle_of_noise_per_chosen_sample(everywhere):
    x = torch.full((4000, 3, 32, 32), 7.0)  # noise is never exactly 7
    g = torch.Generator().manual_seed(0)
    out = RandomErasing(p=0.25, noise_everywhere=everywhere)(x, g)
    changed = (out != 7.0).all(dim=1)  # all channels of an erased pixel
    assert torch.equal(changed, (out != 7.0).any(dim=1))
    boxes = [_box(changed[i]) for i in range(len(x))]
    erased = [b for b in boxes if b is not None]
    share = len(erased) / len(x)
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(x)), share
    areas = torch.tensor([(b[1] - b[0]) * (b[3] - b[2]) / 1024 for b in erased])
    assert areas.min() >= 0.01 and areas.max() <= 0.5  # scale (0.02, 1/3), rounded and clipped
    assert 0.13 < areas.mean() < 0.2  # uniform over (0.02, 0.333): mean 0.177
    noise = out[:, :, changed.any(0)]
    assert abs(noise[noise != 7.0].std().item() - 1.0) < 0.05
    assert torch.equal(RandomErasing(p=0.0)(x[:8], g), x[:8])  # p 0 is the identity


def test_random_erasing_forms_draw_the_same_boxes_and_may_work_in_place():
    x = torch.full((64, 3, 12, 20), 7.0)
    erased = {}
    for everywhere in (False, True):
        out = RandomErasing(p=0.5, noise_everywhere=everywhere)(x, torch.Generator().manual_seed(4))
        erased[everywhere] = (out != 7.0).all(dim=1)
    assert torch.equal(erased[False], erased[True]) and erased[False].any()
    assert (x == 7.0).all()  # the input is left alone unless inplace
    same = RandomErasing(p=0.5, inplace=True)
    assert same(x, torch.Generator().manual_seed(4)) is x
    assert torch.equal((x != 7.0).all(dim=1), erased[False])
    strided = torch.full((12, 20, 3, 64), 7.0).permute(3, 2, 0, 1)  # not contiguous: copied
    out = same(strided, torch.Generator().manual_seed(4))
    assert out is not strided and (strided == 7.0).all()
    assert torch.equal((out != 7.0).all(dim=1), erased[False])
    # A box may cover the whole image (scale 1, ratio 1): every pixel and channel is noise.
    for everywhere in (False, True):
        whole = RandomErasing(p=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                              noise_everywhere=everywhere)
        assert (whole(torch.full((3, 2, 5, 5), 7.0), torch.Generator()) != 7.0).all()
    with pytest.raises(ConfigError, match="CPU batches"):
        RandomErasing(noise_everywhere=False)(torch.zeros(2, 3, 4, 4, device="meta"))


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    plain = SeedAugment().apply(images, train=False)
    seen = {"mixup": 0, "cutmix": 0}
    lams = []
    for seed in range(200):
        mix = MixupCutmix(lambda i, y, t, g: (SeedAugment().apply(i, False), y), 10)
        x, targets = mix(images, labels, True, torch.Generator().manual_seed(seed))
        assert targets.shape == (16, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
        lam = targets[0, labels[0]].item()  # sample 0 is paired with 8 (another label)
        partner = plain.roll(8, 0)  # sample i's partner: (i + 8) mod 16
        one_hot = torch.eye(10)[labels]
        torch.testing.assert_close(targets, one_hot * lam + one_hot.roll(8, 0) * (1 - lam))
        if torch.allclose(x, plain * lam + partner * (1 - lam), atol=1e-5):
            seen["mixup"] += 1
            lams.append(lam)
            continue
        seen["cutmix"] += 1  # one box, the same for every sample, pasted from the partner
        changed = (x != plain).any(dim=1)
        y0, y1, x0, x1 = _box(changed[0])
        assert torch.equal(x[:, :, y0:y1, x0:x1], partner[:, :, y0:y1, x0:x1])
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(x[:, :, outside], plain[:, :, outside])
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)  # lam = 1 - box area
    assert 70 < seen["cutmix"] < 130 and 70 < seen["mixup"] < 130  # switch_prob 0.5
    # Mixup's lam ~ Beta(0.8, 0.8): mean 1/2, sd 0.31, so ~100 draws average 0.5 +- 0.12 (4 sd).
    # (CutMix's lam is biased up on purpose: a box clipped at the border pastes less.)
    assert 0.38 < sum(lams) / len(lams) < 0.62
    # Evaluation is untouched, with class indices.
    x, targets = MixupCutmix(lambda i, y, t, g: (SeedAugment().apply(i, False), y), 10)(
        images, labels, False, torch.Generator())
    assert torch.equal(x, plain) and torch.equal(targets, labels)


def _mixed(mix: MixupCutmix, images: torch.Tensor, seeds: range) -> list[tuple[str, float]]:
    """Each seed's batch: which mixing it got ("none", "mixup", "cutmix") and its lam."""
    labels = torch.arange(len(images))
    drawn = []
    for seed in seeds:
        x, targets = mix(images, labels, True, torch.Generator().manual_seed(seed))
        lam = targets[0, 0].item()
        changed = (x != images).any(dim=1)[0]
        kind = "none" if not changed.any() else "mixup" if changed.all() else "cutmix"
        drawn.append((kind, lam))
    return drawn


def test_mixing_draws_follow_the_recipes_settings():
    """The vitlab recipe's mixing (mix-prob 0.5, cutmix-prob 0.5, both alphas 1): about half
    the batches pass unmixed and the rest split evenly; Mixup's lam ~ Beta(1, 1) = U(0, 1)
    (mean 1/2, variance 1/12: Beta(0.8, 0.8)'s is 0.096); CutMix's pasted area has the mean
    that a box of area 1 - lam, lam ~ U(0, 1), centred on a uniform pixel and clipped to the
    image has (computed here exactly over the centres)."""
    keep = lambda i, y, t, g: (i.clone(), y)  # noqa: E731
    images = torch.randn(2, 1, 32, 32)
    settings = recipe("vitlab").augment_settings()
    kinds = [k for k, _ in _mixed(MixupCutmix(keep, 2, settings["mixup_alpha"],
                                              settings["cutmix_alpha"],
                                              settings["switch_prob"], settings["mix_prob"]),
                                  images, range(1200))]
    # Binomial counts: 600 +- 17 and 300 +- 15 (4 sd bounds). A near-empty CutMix box (lam
    # drawn above 1 - 1/256) pastes nothing and counts as "none": ~1 in the 1,200.
    assert 530 < kinds.count("none") < 670
    assert 240 < kinds.count("mixup") < 360 and 240 < kinds.count("cutmix") < 360
    alpha, beta = settings["mixup_alpha"], settings["cutmix_alpha"]
    assert alpha == beta == 1.0  # the bounds below are worked out for alpha 1
    lams = torch.tensor([lam for _, lam in _mixed(MixupCutmix(keep, 2, alpha, beta, 0.0, 1.0),
                                                  images, range(3000))], dtype=torch.float64)
    assert abs(lams.mean().item() - 0.5) < 0.022  # sd 0.0053
    assert abs(lams.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.006  # 1/12, sd 0.0014
    cut = [(k, lam) for k, lam in _mixed(MixupCutmix(keep, 2, alpha, beta, 1.0, 1.0), images,
                                         range(3000))]
    assert {k for k, _ in cut} <= {"cutmix", "none"}
    area = 1 - torch.tensor([lam for _, lam in cut], dtype=torch.float64).mean().item()
    side, grid = 32, (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # lam midpoints
    half = ((side * (1 - grid).sqrt()).floor() // 2).long()
    centre = torch.arange(side)
    extent = ((centre[None] + half[:, None]).clamp(max=side)
              - (centre[None] - half[:, None]).clamp(min=0)).double().mean(1)
    expected = (extent ** 2).mean().item() / side ** 2  # lam ~ U(0, 1): Beta(1, 1)
    assert 0.2 < expected < 0.4  # clipping pastes less than the 0.5 drawn on average
    assert abs(area - expected) < 0.015  # sd ~0.004


def test_mixup_pairs_odd_batches_by_rolling_half_a_batch():
    x = torch.randn(5, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3, 4])
    mix = MixupCutmix(lambda i, y, t, g: (i.clone(), y), 5, switch_prob=0.0)  # always Mixup
    out, targets = mix(x, labels, True, torch.Generator().manual_seed(0))
    lam = targets[0, 0].item()
    partner = torch.tensor([2, 3, 4, 0, 1])  # (i + 5 // 2) mod 5
    torch.testing.assert_close(out, x * lam + x[partner] * (1 - lam))
    torch.testing.assert_close(targets, torch.eye(5) * lam + torch.eye(5)[partner] * (1 - lam))
    # In place (the transform owns its batch) gives the same batches, CutMix and Mixup alike.
    for seed in range(6):
        results = [MixupCutmix(lambda i, y, t, g: (i.clone(), y), 5, inplace=inplace)(
            x, labels, True, torch.Generator().manual_seed(seed)) for inplace in (False, True)]
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1])


def test_mixup_cutmix_of_a_chunk_mixes_each_batch_within_itself():
    """Batches transformed together (`batches`, the loader's --augment-chunk): one image pass,
    then each batch mixed with its own partners (rolled by half of itself) and scalars, each
    equal to what MixupCutmix does to that batch's transformed images alone."""
    x = torch.randn(15, 3, 8, 8)
    labels = torch.arange(15)
    sizes = [6, 6, 3]
    for seed in range(12):
        mix = MixupCutmix(lambda i, y, t, g: (i.clone(), y), 15)
        out = mix.batches(x, labels, sizes, True, torch.Generator().manual_seed(seed))
        for (xb, tb), idx in zip(out, torch.arange(15).split(sizes), strict=True):
            assert tb.shape == (len(idx), 15)
            assert set(tb.nonzero()[:, 1].tolist()) <= set(idx.tolist())  # its own labels only
            shift = len(idx) // 2
            lam = tb[0, idx[0]].item()
            one_hot = torch.eye(15)[idx]
            torch.testing.assert_close(tb, one_hot * lam + one_hot.roll(-shift, 0) * (1 - lam))
            mixed = torch.allclose(xb, x[idx] * lam + x[idx].roll(-shift, 0) * (1 - lam))
            changed = (xb != x[idx]).any(1)
            assert mixed or changed.any() or lam == 1.0  # Mixup, or CutMix's box (maybe empty)
    # One batch is one call: the same draws as __call__.
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    mix = MixupCutmix(lambda i, y, t, g: (i.clone(), y), 15)
    (xa, ta), = mix.batches(x, labels, [15], True, g[0])
    xb, tb = mix(x, labels, True, g[1])
    assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_stochastic_depth_drops_whole_samples_and_is_free_when_off():
    config = ViTConfig(image_size=32, patch_size=8, width=16, depth=5, num_heads=2, mlp_dim=32,
                       num_classes=3, drop_path=0.2)
    model = ViT(config)
    assert [round(b.drop_path, 3) for b in model.encoder.blocks] == [0, 0.05, 0.1, 0.15, 0.2]
    block = EncoderBlock(config, drop_path=0.3).train()
    x = torch.ones(20000, 1, 4)
    branch = block._branch(x)
    kept = branch[:, 0, 0] != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    assert torch.allclose(branch[kept], torch.full_like(branch[kept], 1 / 0.7))
    assert torch.equal(block.eval()._branch(x), x)
    # Rate 0 draws nothing: the same outputs and the same random stream as a model without it.
    images = torch.randn(4, 3, 32, 32)
    outputs = []
    for rate in (0.0, None):
        torch.manual_seed(0)
        fields = {} if rate is None else {"drop_path": rate}
        m = ViT(ViTConfig(image_size=32, patch_size=8, width=16, depth=2, num_heads=2,
                          mlp_dim=32, num_classes=3, **fields)).train()
        torch.manual_seed(1)
        outputs.append((m(images), torch.rand(1)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_weight_decay_groups_and_the_cosine_floor():
    model = ViT(preset("vitlab-mini", 10))
    plain = build_optimizer(recipe("seed"), model.named_parameters())
    assert len(plain.param_groups) == 1  # the tutorial: decay on everything
    exempt = build_optimizer(recipe("vitlab"), model.named_parameters())
    decay, no_decay = exempt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "encoder.embedding.position_embedding", "encoder.embedding.cls_token",
        "encoder.blocks.0.norm1.weight", "encoder.blocks.3.attn.qkv.bias", "head.bias"}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    # Lee et al.'s parts: the temperatures and the patch tokens' norm are scales, left undecayed.
    sl = ViT(preset("vitlab-mini-sl", 10))
    decay, no_decay = build_optimizer(recipe("vitlab"), sl.named_parameters()).param_groups
    names = {id(p): n for n, p in sl.named_parameters()}
    assert {"encoder.blocks.8.attn.temperature", "encoder.embedding.proj.norm.weight"} <= {
        names[id(p)] for p in no_decay["params"]}
    assert "encoder.embedding.proj.linear.weight" in {names[id(p)] for p in decay["params"]}
    r = recipe("vitlab")
    assert lr_factor(r, 10**6, 10**6, 100) == pytest.approx(0.01)
    assert lr_factor(r, 0, 10**4, 100) == pytest.approx(1 / 1000)  # 10 warm-up epochs


@pytest.mark.parametrize(("settings", "reference"), [
    ({"optimizer": "adamw", "lr": 1e-3, "beta2": 0.95},
     lambda params: torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)),
    ({"nesterov": True},
     lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4,
                                    nesterov=True)),
], ids=["adamw-beta2", "sgd-nesterov"])
def test_beta2_and_nesterov_step_as_torchs_optimizers_do(settings, reference):
    """--beta2 and --nesterov: three steps of vitlab's optimizer equal torch's own, built with
    those settings, bit for bit; and differ from the defaults' steps."""
    torch.manual_seed(0)
    start = ViT(preset("micro", 10, dropout=0.0))  # no random masks: steps compared bitwise
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def trained(make) -> dict[str, torch.Tensor]:
        model = ViT(preset("micro", 10, dropout=0.0))
        model.load_state_dict(start.state_dict())
        optimizer = make(model)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return model.state_dict()

    ours = trained(lambda m: build_optimizer(recipe("seed", **settings), m.parameters()))
    theirs = trained(lambda m: reference(m.parameters()))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    default = {k: v for k, v in settings.items() if k not in ("beta2", "nesterov")}
    plain = trained(lambda m: build_optimizer(recipe("seed", **default), m.parameters()))
    assert not all(torch.equal(ours[k], plain[k]) for k in ours)


@pytest.mark.parametrize(("settings", "message"), [
    ({"beta2": 0.98}, "beta2 applies to --optimizer adamw"),
    ({"optimizer": "adamw", "beta2": 1.0}, "beta2 must be in \\[0, 1\\)"),
    ({"optimizer": "adamw", "nesterov": True}, "nesterov applies to --optimizer sgd"),
    ({"momentum": 0.0, "nesterov": True}, "with a --momentum above 0"),
])
def test_beta2_and_nesterov_outside_their_optimizer_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        recipe("seed", **settings)


@pytest.mark.parametrize("exempt", [False, True])
def test_layer_decay_gives_each_layer_its_lr(exempt):
    """timm's --layer-decay 0.5 on a 2-block model: head and final norm at the LR, block 1 at
    half, block 0 at a quarter, the embeddings at an eighth; weight decay as without it; every
    trainable parameter in one group."""
    model = ViT(preset("micro", 10))
    chosen = recipe("vitlab-finetune", lr=0.1, layer_decay=0.5, decay_exempt=exempt)
    optimizer = build_optimizer(chosen, model.named_parameters())
    expected = {"encoder.embedding": 0.0125, "encoder.blocks.0": 0.025,
                "encoder.blocks.1": 0.05, "encoder.norm": 0.1, "head": 0.1}
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = (group["lr"], group["weight_decay"])
    names = dict(model.named_parameters())
    assert sorted(seen) == sorted(id(p) for p in names.values())  # each parameter once
    for name, p in names.items():
        lr, decay = seen[id(p)]
        prefix = next(k for k in expected if name.startswith(k))
        assert lr == pytest.approx(expected[prefix]), name
        undecayed = exempt and (p.ndim <= 1 or "position_embedding" in name
                                or "cls_token" in name)
        assert decay == (0.0 if undecayed else chosen.weight_decay), name
    assert len(optimizer.param_groups) == 4 * (2 if exempt else 1)  # 4 LRs (x decay or not)


def test_the_vitlab_recipe_and_preset(tmp_path_factory, tmp_path, capfd):
    config = preset("vitlab-mini", 100)
    assert ViT(config).num_parameters() <= 3_300_000
    assert forward_flops(config) <= 1.25 * forward_flops(preset("seed-mini", 100))
    assert main(["recipes", "vitlab"]) == 0
    assert "augment: vitlab" in capfd.readouterr().out
    data = h.data_slices(tmp_path_factory)
    out = tmp_path / "pipe"
    # The vitlab augmentation's strengths reach the stage that uses them: not vitlab-finetune's
    # seed augmentation.
    argv = ["run", "--recipe", "vitlab", "--pretrain-data", str(data["cifar100"]),
            "--finetune-data", str(data["cifar10"]), "--epochs", "1",
            "--train-steps-per-epoch", "2", "--batch-size", "32", "--out", str(out),
            "--no-download", "--no-progress", "--log-steps", "0", "--mix-prob", "0.25",
            "--erase-prob", "0"]
    assert main(argv) == 0
    pre = json.loads((out / "pretrain" / "config.json").read_text())
    fine = json.loads((out / "finetune" / "config.json").read_text())
    assert recipe("vitlab").mix_prob == 0.5 and recipe("vitlab").mixup_alpha == 1.0  # Lee et al.
    assert pre["model_preset"] == "vitlab-mini" and pre["recipe"]["name"] == "vitlab"
    assert pre["recipe"]["augment"] == "vitlab" and pre["model"]["drop_path"] == 0.1
    assert (pre["recipe"]["mix_prob"], pre["recipe"]["erase_prob"]) == (0.25, 0.0)
    assert fine["recipe"]["name"] == "vitlab-finetune" and fine["recipe"]["batch_size"] == 32
    assert (fine["recipe"]["mix_prob"], fine["recipe"]["erase_prob"]) == (1.0, 0.25)
    assert pre["options"]["augment_chunk"] == 1024
    # The same command again keeps both finished stages.
    log = (out / "pretrain" / "log.txt").read_text()
    assert main(argv) == 0
    assert (out / "pretrain" / "log.txt").read_text() == log
    # The seed recipe's augmentation has none of them: refused in one line, naming the flag.
    capfd.readouterr()
    assert main(["pretrain", "--data", str(data["cifar10"]), "--mix-prob", "0.5", "--out",
                 str(tmp_path / "seed"), "--no-download"]) == 2
    line = h.assert_one_error_line(capfd.readouterr().err, "pretrain")
    assert "--mix-prob applies to --augment vitlab" in line and not (tmp_path / "seed").exists()


def test_vitlab_augment_trains_on_soft_targets():
    augment = VitlabAugment(num_classes=10)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    x, targets = augment(images, torch.arange(8), True, torch.Generator().manual_seed(3))
    assert x.shape == (8, 3, 32, 32) and targets.shape == (8, 10)
    x, targets = augment(images, torch.arange(8), False, torch.Generator())
    assert torch.equal(x, SeedAugment().apply(images, False)) and targets.dtype == torch.int64


def test_the_vitlab_augmentation_defaults_are_the_recipes():
    """VitlabAugment built bare mixes as the recipe does."""
    augment = VitlabAugment(10)
    mix = augment.mix
    built = {"erase_p": augment.ops[-1].p, "mixup_alpha": mix.mixup_alpha,
             "cutmix_alpha": mix.cutmix_alpha, "mix_prob": mix.prob,
             "switch_prob": mix.switch_prob}
    assert built == recipe("vitlab").augment_settings()
    assert built == {"erase_p": 0.25, "mixup_alpha": 1.0, "cutmix_alpha": 1.0, "mix_prob": 0.5,
                     "switch_prob": 0.5}


def test_vitlab_augment_strengths():
    """erase-prob, mix-prob, the alphas and cutmix-prob: 0 turns each part off; without erasing
    and mixing the vitlab augmentation is pad-crop-flip + TrivialAugment-Wide + normalize."""
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    plain = PolicyAugment(TrivialAugmentWide())
    off = VitlabAugment(10, erase_p=0.0, mix_prob=0.0)
    for seed in range(4):
        x, targets = off(images, labels, True, torch.Generator().manual_seed(seed))
        expected, _ = plain(images, labels, True, torch.Generator().manual_seed(seed))
        assert torch.equal(x, expected) and torch.equal(targets, torch.eye(10)[labels])

    def kinds(**strengths) -> set[str]:
        seen = set()
        for seed in range(40):
            mix = MixupCutmix(lambda i, y, t, g: (SeedAugment().apply(i, False), y), 10,
                              **strengths)
            x, targets = mix(images, labels, True, torch.Generator().manual_seed(seed))
            base = SeedAugment().apply(images, False)
            partner = base.roll(-8, 0)  # sample i's partner: (i + 8) mod 16
            if torch.equal(x, base):
                seen.add("none")
            elif torch.equal(x, torch.where(x == partner, partner, base)):
                seen.add("cutmix")  # each pixel its own or its partner's: a pasted box
            else:
                seen.add("mixup")
        return seen

    assert kinds() == {"mixup", "cutmix"}
    assert kinds(mixup_alpha=0.0) <= {"cutmix", "none"} and "cutmix" in kinds(mixup_alpha=0.0)
    assert kinds(cutmix_alpha=0.0) == {"mixup"}
    assert kinds(switch_prob=1.0) <= {"cutmix", "none"}
    assert kinds(mixup_alpha=0.0, cutmix_alpha=0.0) == {"none"}
    assert kinds(prob=0.0) == {"none"}
    half = sum(MixupCutmix(lambda i, y, t, g: (SeedAugment().apply(i, False), y), 10,
                           prob=0.5)(images, labels, True, torch.Generator().manual_seed(seed)
                                     )[1].max() < 1 for seed in range(400))
    assert 170 < half < 230  # half the batches mixed (3 sd; a mixed batch has no one-hot row)
    # Recipe checks: ranges, and only the vitlab augmentation takes them.
    assert recipe("vitlab", mix_prob=0.25).augment_settings()["mix_prob"] == 0.25
    # The vitlab recipe's own mixing does not follow it to another augmentation; a changed
    # value is still refused there.
    other = recipe("vitlab", augment="seed")
    assert (other.mix_prob, other.mixup_alpha, other.augment_settings()) == (1.0, 0.8, {})
    with pytest.raises(ConfigError, match="--mix-prob applies to --augment vitlab"):
        recipe("vitlab", augment="trivialaugment", mix_prob=0.25)
    assert recipe("seed").augment_settings() == {}
    for bad in ({"mix_prob": 1.5}, {"erase_prob": -0.1}, {"mixup_alpha": -1.0},
                {"cutmix_prob": 2.0}, {"cutmix_alpha": float("inf")}):
        with pytest.raises(ConfigError):
            recipe("vitlab", **bad)
    with pytest.raises(ConfigError, match="--erase-prob applies to --augment vitlab"):
        recipe("seed", erase_prob=0.0)
    assert recipe("seed", erase_prob=0.25).augment == "seed"  # its default: no change


def test_help_gives_each_recipe_settings_default_and_whose_it_is():
    from vitlab.cli import build_parser

    text = " ".join(build_parser().command_parsers["pretrain"].format_help().split())
    assert "(default: 0.01, the seed recipe's)" in text  # --lr
    # The vitlab augmentation's settings: the vitlab recipe's own where it differs.
    assert "(default: 0.5 with the vitlab recipe, 1.0 with another)" in text  # --mix-prob
    assert "(default: 1.0 with the vitlab recipe, 0.8 with another)" in text  # --mixup-alpha
    assert "(default: 0.25, the vitlab recipe's)" in text  # --erase-prob: the same for all
