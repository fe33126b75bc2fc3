"""The ViT matches the tutorial's ViTModel: parameter counts, outputs, gradients, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlab.errors import CheckpointError, ConfigError
from vitlab.model import (
    PRESETS,
    Attention,
    ViT,
    ViTConfig,
    _tutorial_key_map,
    load_tutorial_state_dict,
    preset,
)
from vitlab.tutorial import seed_mini_reference


def _randomised_pair(num_classes: int, drop: float = 0.1) -> tuple[torch.nn.Module, ViT]:
    """The tutorial's model with random (non-zero) weights, and vitlab's loaded from it."""
    torch.manual_seed(0)
    reference = seed_mini_reference(num_classes, drop=drop)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.05)  # the CLS token and positions start at zero: give them values
    model = ViT(preset("seed-mini", num_classes, dropout=drop))
    load_tutorial_state_dict(model, reference.state_dict())
    return reference, model


@pytest.mark.parametrize(("num_classes", "expected"), [(100, 3_218_020), (10, 3_194_890)])
def test_seed_mini_parameter_count(num_classes, expected):
    model = ViT(preset("seed-mini", num_classes))
    assert model.num_parameters() == expected
    assert sum(p.numel() for p in seed_mini_reference(num_classes).parameters()) == expected


@pytest.mark.parametrize("batch_size", [1, 3, 17])
def test_eval_outputs_match_tutorial(batch_size):
    reference, model = _randomised_pair(100)
    reference.eval()
    model.eval()
    images = torch.randn(batch_size, 3, 32, 32)
    with torch.no_grad():
        expected = reference(images)
        got = model(images)
    assert got.shape == (batch_size, 100)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_training_gradients_match_tutorial_without_dropout():
    reference, model = _randomised_pair(10, drop=0.0)
    reference.train()
    model.train()
    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    F.cross_entropy(reference(images), labels).backward()
    F.cross_entropy(model(images), labels).backward()
    reference_grads = {k: p.grad for k, p in reference.named_parameters()}
    ours = dict(model.named_parameters())
    for our_key, their_key in _tutorial_key_map(model.config.depth).items():
        torch.testing.assert_close(ours[our_key].grad, reference_grads[their_key],
                                   atol=1e-5, rtol=1e-4, msg=our_key)


def test_training_mode_dropout_is_active_and_seeded():
    _, model = _randomised_pair(10)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    first = model(images)
    torch.manual_seed(1)
    again = model(images)
    other = model(images)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)


def test_state_dict_loads_back_into_tutorial_model():
    # The mapping is a bijection: the reverse direction gives the same model.
    reference, model = _randomised_pair(10)
    mapping = _tutorial_key_map(model.config.depth)
    back = {mapping[k]: v for k, v in model.state_dict().items()}
    fresh = seed_mini_reference(10)
    fresh.load_state_dict(back)
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_tutorial_state_dict_errors_name_the_key():
    reference, model = _randomised_pair(10)
    state = reference.state_dict()
    missing = dict(state)
    del missing["vit_encoder.encoder.layers.3.linear1.bias"]
    with pytest.raises(CheckpointError, match=r"layers\.3\.linear1\.bias"):
        load_tutorial_state_dict(model, missing)
    extra = {**state, "vit_encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"vit_encoder\.extra\.weight"):
        load_tutorial_state_dict(model, extra)
    misshaped = {**state, "linear_classifier.weight": torch.zeros(100, 256)}
    with pytest.raises(CheckpointError, match=r"linear_classifier\.weight.*\[100, 256\]"):
        load_tutorial_state_dict(model, misshaped)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs(name):
    config = preset(name, num_classes=7)
    model = ViT(config).eval()
    images = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_presets_have_the_documented_shapes():
    mini = preset("seed-mini", 100)
    assert (mini.image_size, mini.patch_size, mini.depth, mini.width, mini.num_heads,
            mini.mlp_dim, mini.dropout, mini.norm_first) == (32, 4, 6, 256, 8, 512, 0.1, False)
    assert (mini.encoder_norm_eps, mini.final_norm_eps) == (1e-5, 1e-6)
    assert preset("seed-mini-prenorm", 100).norm_first is True
    base = preset("vit-base-16", 1000)
    assert (base.image_size, base.patch_size, base.depth, base.width, base.num_heads,
            base.mlp_dim) == (224, 16, 12, 768, 12, 3072)
    assert (preset("vit-tiny-16", 10).width, preset("vit-small-16", 10).width) == (192, 384)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="seed-mini.*vit-base-16"):
        preset("vit-huge-99", 10)


def test_encoder_and_head_are_separate_submodules():
    model = ViT(preset("seed-mini", 10))
    encoder_keys = set(model.encoder.state_dict())
    assert {"embedding.proj.weight", "embedding.cls_token", "embedding.position_embedding",
            "norm.weight"} <= encoder_keys
    assert set(model.head.state_dict()) == {"weight", "bias"}
    assert torch.count_nonzero(model.encoder.embedding.cls_token) == 0
    assert torch.count_nonzero(model.encoder.embedding.position_embedding) == 0
    assert model.encoder.embedding.proj.bias is None


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32), (2, 32, 32, 3)])
def test_wrong_input_size_raises_clear_error(shape):
    model = ViT(preset("seed-mini", 10))
    with pytest.raises(ConfigError, match=r"expects images of shape \[B, 3, 32, 32\]"):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"image_size": 30}, "multiple of patch size"), ({"num_heads": 7}, "divisible"),
     ({"depth": 0}, "positive integer"), ({"dropout": 1.0}, "dropout"),
     ({"shifted_patches": True, "patch_size": 1}, "patch size of at least 2"),
     ({"locality_attention": "yes"}, "locality_attention must be true or false"),
     ({"norm_first": 1}, "norm_first must be true or false")],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ViTConfig(**{**PRESETS["seed-mini"], "num_classes": 10, **overrides})


def test_config_round_trips_through_dict():
    config = preset("seed-mini-prenorm", 10)
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown ViTConfig fields: colour"):
        ViTConfig.from_dict({**config.to_dict(), "colour": "red"})


@pytest.mark.parametrize("name", ["seed-mini", "seed-mini-prenorm"])
def test_cls_only_last_block_equals_the_full_computation(name):
    torch.manual_seed(0)
    model = ViT(preset(name, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
        images = torch.randn(5, 3, 32, 32)
        full = model.encoder.norm(model.encoder.forward_tokens(images)[:, 0])
        torch.testing.assert_close(model.encoder(images), full, atol=1e-5, rtol=0)


def test_prenorm_matches_torch_prenorm_encoder_layer():
    # The same mapping holds for nn.TransformerEncoderLayer(norm_first=True).
    torch.manual_seed(0)
    reference = seed_mini_reference(10)
    for i, layer in enumerate(reference.vit_encoder.encoder.layers):
        fresh = torch.nn.TransformerEncoderLayer(256, 8, 512, dropout=0.1, activation="gelu",
                                                 norm_first=True)
        reference.vit_encoder.encoder.layers[i] = fresh
        del layer
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.05)
    model = ViT(preset("seed-mini-prenorm", 10))
    load_tutorial_state_dict(model, reference.state_dict())
    reference.eval()
    model.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_classes", [100, 10])
def test_initial_weights_equal_the_tutorials_for_the_same_seed(num_classes):
    torch.manual_seed(1234)
    reference = seed_mini_reference(num_classes)
    after_reference = torch.rand(3)
    torch.manual_seed(1234)
    model = ViT(preset("seed-mini", num_classes))
    after_model = torch.rand(3)
    theirs = reference.state_dict()
    for our_key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[_tutorial_key_map(6)[our_key]]), our_key
    # ...and both leave the generator in the same state, so what follows draws the same too.
    assert torch.equal(after_model, after_reference)


def test_independent_init_draws_each_block_separately():
    torch.manual_seed(0)
    model = ViT(preset("seed-mini", 10, init="independent"))
    first, second = model.encoder.blocks[0], model.encoder.blocks[1]
    assert not torch.equal(first.attn.qkv.weight, second.attn.qkv.weight)
    with pytest.raises(ConfigError, match="init must be"):
        preset("seed-mini", 10, init="random")


# --- Lee et al. 2021: shifted patch tokens, locality self-attention ------------------------------

def _random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)


@pytest.mark.parametrize("bias", [False, True])
def test_shifted_patch_tokens_equal_a_pixel_loop_reference(bias):
    config = ViTConfig(image_size=8, patch_size=4, width=6, depth=1, num_heads=2, mlp_dim=8,
                       num_classes=3, shifted_patches=True, patch_bias=bias)
    spt = ViT(config).encoder.embedding.proj
    _random_weights(spt)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    spt = spt.double()
    # The authors' order (their x_lu, x_ru, x_lb, x_rb: slices of the image padded by half a
    # patch): the image, then moved down-right, down-left, up-right, up-left by 2 px, uncovered
    # pixels zero; each patch flattened row, column, channel.
    offsets = [(0, 0), (2, 2), (2, -2), (-2, 2), (-2, -2)]  # (down, right)
    x = images.numpy()
    stacked = np.zeros((2, 15, 8, 8))
    for k, (dy, dx) in enumerate(offsets):
        for y in range(8):
            for xx in range(8):
                sy, sx = y - dy, xx - dx
                if 0 <= sy < 8 and 0 <= sx < 8:
                    stacked[:, 3 * k:3 * k + 3, y, xx] = x[:, :, sy, sx]
    rows = []
    for py in range(2):
        for px in range(2):
            patch = stacked[:, :, 4 * py:4 * py + 4, 4 * px:4 * px + 4]  # [B, 15, 4, 4]
            rows.append(patch.transpose(0, 2, 3, 1).reshape(2, -1))  # row, column, channel
    flat = torch.from_numpy(np.stack(rows, axis=1))  # [B, 4 patches, 240]
    normed = F.layer_norm(flat, (240,), spt.norm.weight, spt.norm.bias, eps=1e-5)
    expected = normed @ spt.linear.weight.T
    if bias:
        expected = expected + spt.linear.bias
    torch.testing.assert_close(spt(images), expected, rtol=0, atol=1e-12)


def test_locality_attention_never_attends_a_token_to_itself_and_learns_its_temperature():
    config = preset("vitlab-mini-sl", 10, depth=2)
    model = ViT(config)
    head_dim = config.width // config.num_heads
    assert model.encoder.blocks[0].attn.temperature.tolist() == [head_dim ** -0.5] * 12
    _random_weights(model)
    with torch.no_grad():  # temperatures of either side of the initial 0.25
        for block in model.encoder.blocks:
            block.attn.temperature.uniform_(0.1, 0.6)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, attentions = model(images, return_attention=True)
    tokens = config.num_patches + 1
    for weights in attentions:
        assert weights.shape == (3, 12, tokens, tokens)
        assert torch.count_nonzero(weights.diagonal(dim1=-2, dim2=-1)) == 0
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 12, tokens))
    # The fused kernel (SDPA with the mask) and the explicit softmax agree, for every token
    # and for the CLS token alone.
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits, rtol=0, atol=1e-5)
        full = model.encoder.norm(model.encoder.forward_tokens(images)[:, 0])
        torch.testing.assert_close(model.encoder(images), full, rtol=0, atol=1e-5)
    # Each head's temperature scales its scores: a gradient reaches it.
    model.train()
    F.cross_entropy(model(images), torch.tensor([0, 1, 2])).backward()
    grad = model.encoder.blocks[0].attn.temperature.grad
    assert grad is not None and torch.count_nonzero(grad) == 12


def test_locality_attention_matches_a_hand_written_masked_softmax():
    torch.manual_seed(0)
    attn = Attention(8, 2, 0.0, locality=True)
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.3, 1.7]))
    x = torch.randn(2, 5, 8)
    out, weights = attn(x, return_weights=True)
    q, k, v = (attn.qkv(x).view(2, 5, 3, 2, 4)[:, :, i].transpose(1, 2) for i in range(3))
    scores = (q @ k.transpose(-2, -1)) * torch.tensor([0.3, 1.7]).view(1, 2, 1, 1)
    scores = scores - torch.diag(torch.full((5,), float("inf")))
    expected = scores.softmax(-1)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    mixed = (expected @ v).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(out, attn.proj(mixed), rtol=0, atol=1e-6)
    torch.testing.assert_close(attn(x), out, rtol=0, atol=1e-6)  # through SDPA


def test_vitlab_mini_sl_fits_the_recipe_budget_and_leaves_vitlab_mini_alone():
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.model import forward_flops
    sl, plain = preset("vitlab-mini-sl", 100), preset("vitlab-mini", 100)
    assert (sl.shifted_patches, sl.locality_attention) == (True, True)
    assert (plain.shifted_patches, plain.locality_attention) == (False, False)
    assert ViT(sl).num_parameters() == 2_752_240 <= 3_300_000
    assert forward_flops(sl) <= 1.25 * forward_flops(preset("seed-mini", 100))
    # The formula's extra cost of the shifted patch tokens is what PyTorch counts running both
    # models (the rest of the two forward passes is the same).
    counted = []
    for config in (sl, plain):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ViT(config).eval()(torch.randn(1, 3, 32, 32))
        counted.append(counter.get_total_flops())
    assert counted[0] - counted[1] == forward_flops(sl) - forward_flops(plain) > 0


@pytest.mark.parametrize("name", ["seed-mini", "vitlab-mini", "vitlab-mini-sl", "vitlab-mini-conv",
                                  "micro"])
def test_forward_flops_are_the_matrix_products_each_model_runs(name):
    """forward_flops against PyTorch's own count of one forward pass. The tutorial's ViTModel
    (training mode: attention through counted matrix products) runs every token through every
    block. vitlab's ViT runs its last block for the CLS token alone; PyTorch does not count its
    SDPA kernel, so the attention's scores and mixing (the tutorial-checked term: 2 T^2 width a
    block, one row of it in the last) are added."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.bench import tutorial_model
    from vitlab.model import forward_flops

    def counted(model: torch.nn.Module) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        return counter.get_total_flops()

    config = preset(name, 100)
    tokens, width = config.num_patches + 1, config.width
    if not config.norm_first:  # the tutorial's architectures (dropout on: the counted path)
        assert counted(tutorial_model(config).train()) == forward_flops(config, False)
    attention = 2 * (2 * tokens ** 2 * width * (config.depth - 1) + 2 * tokens * width)
    assert counted(ViT(config).eval()) + attention == forward_flops(config)


def test_tutorial_weights_do_not_load_into_the_small_data_options():
    reference = seed_mini_reference(10)
    for option in ("shifted_patches", "locality_attention", "conv_stem"):
        model = ViT(preset("seed-mini", 10, **{option: True}))
        with pytest.raises(ConfigError, match="no shifted patch tokens, locality"):
            load_tutorial_state_dict(model, reference.state_dict())


def test_a_compiled_locality_model_equals_the_eager_one():
    # The masked SDPA call and the shifted tokens through torch.compile: the same logits and
    # gradients (dynamo reset first, so that earlier tests' compilations cannot leave it eager).
    torch._dynamo.reset()
    model = ViT(preset("vitlab-mini-sl", 10, depth=2))
    _random_weights(model)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    results = []
    for runnable in (model, torch.compile(model)):
        model.zero_grad()
        loss = F.cross_entropy(runnable(images), labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    for compiled, eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


# --- conv stem -------------------------------------------------------------------------------

def test_conv_stem_is_its_convolutions_on_the_patch_grid():
    """vitlab-mini-conv's stem against the same weights through torch's functional ops: 3x3 convs
    3 -> 48 (stride 1) -> 96 -> 192 (stride 2), each a LayerNorm over each pixel's channels +
    GELU, then the 1x1 conv; its tokens row by row on the 8x8 patch grid."""
    from vitlab.model import ConvStem, forward_flops

    assert ViT(preset("vitlab-mini-conv", 100)).num_parameters() == 2_951_764 <= 3_300_000
    config = preset("vitlab-mini-conv", 10)
    assert forward_flops(config) <= 1.25 * forward_flops(preset("seed-mini", 10))
    stem = ConvStem(config)
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == \
        [(3, 48, 1), (48, 96, 2), (96, 192, 2)]
    with torch.no_grad():
        for p in stem.parameters():
            p.normal_(0.0, 0.2)
        images = torch.randn(2, 3, 32, 32)
        x = images
        norms = [m for m in stem.convs if isinstance(m, torch.nn.LayerNorm)]
        for conv, norm in zip(convs, norms, strict=True):
            x = F.conv2d(x, conv.weight, stride=conv.stride, padding=1)
            mean = x.mean(1, keepdim=True)
            var = x.var(1, keepdim=True, unbiased=False)
            x = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(-1, 1, 1) \
                + norm.bias.view(-1, 1, 1)
            x = F.gelu(x)
        x = F.conv2d(x, stem.proj.weight)  # [2, 192, 8, 8]
        tokens = stem(images)
    assert tokens.shape == (2, 64, 192)
    torch.testing.assert_close(tokens, x.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    # A pixel reaches past its own patch (4x4) to the neighbouring tokens, and no further: the
    # receptive field of the 3x3 convs (stride 1, 2, 2) around pixel (3, 3).
    model = ViT(config).eval()
    with torch.no_grad():
        base = model.encoder.embedding.proj(images)
        nudged = images.clone()
        nudged[:, :, 3, 3] += 1.0  # the last pixel of patch (0, 0)
        changed = (model.encoder.embedding.proj(nudged) - base).abs().sum((0, 2)) > 0
    grid = changed.view(8, 8)
    assert grid[:2, :2].all() and not grid[2:].any() and not grid[:, 2:].any()


@pytest.mark.parametrize("overrides, message", [
    ({"patch_size": 8, "width": 12, "num_heads": 2}, "power of 2"),
    ({"patch_size": 1}, "power of 2"),
    ({"patch_size": 16, "width": 64, "num_heads": 4}, r"width / patch >= 8"),  # 4 channels
    ({"shifted_patches": True}, "not both"),
])
def test_conv_stem_refuses_what_it_cannot_build(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preset("vitlab-mini-conv", 10, **overrides)


def test_grad_checkpointing_keeps_block_inputs_only_and_the_same_gradients():
    """In training each block saves its input alone for the backward pass and runs again
    there, drawing the same dropout and drop-path masks: the gradients are bitwise those
    without it, for a fraction of the saved activations; evaluation is untouched."""
    import copy

    torch.manual_seed(0)
    plain = ViT(preset("seed-mini", num_classes=10, dropout=0.1, drop_path=0.1))
    checkpointed = copy.deepcopy(plain)
    checkpointed.encoder.grad_checkpointing = True
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    calls = []
    for block in checkpointed.encoder.blocks:
        block.register_forward_pre_hook(lambda *args: calls.append(1))

    def step(model: ViT) -> tuple[int, dict]:
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        return sum(saved), {n: p.grad for n, p in model.named_parameters()}

    (plain_bytes, plain_grads), (bytes_, grads) = step(plain), step(checkpointed)
    assert len(calls) == 2 * 6  # each block's forward, and again in the backward pass
    assert all(torch.equal(grads[k], plain_grads[k]) for k in plain_grads)
    assert bytes_ * 10 < plain_bytes
    calls.clear()
    with torch.no_grad():
        checkpointed.eval()
        plain.eval()
        assert torch.equal(checkpointed(images), plain(images)) and len(calls) == 6
