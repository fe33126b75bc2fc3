"""The Vision Transformer of the tutorial, batch-first, on `scaled_dot_product_attention`.

Architecture (An Image is Worth 16x16 Words, Dosovitskiy et al. 2020, as the tutorial builds it):
conv patch embedding without bias -> prepend a trainable CLS token -> add a trainable position
embedding -> dropout -> encoder blocks -> LayerNorm(eps 1e-6) of the CLS output -> linear head.

One `EncoderBlock` serves both orderings: post-norm (`norm_first=False`, what the tutorial's
`nn.TransformerEncoderLayer` does) and pre-norm (`norm_first=True`, the ViT paper's).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.dropout import Dropout, dropout
from vitlab.errors import CheckpointError, ConfigError, SettingError

__all__ = [
    "PRESETS",
    "EncoderBlock",
    "PatchEmbedding",
    "ShiftedPatchTokens",
    "ViT",
    "ViTConfig",
    "ViTEncoder",
    "load_tutorial_state_dict",
    "preset",
]


@dataclass
class ViTConfig:
    """Shape and regularisation of a ViT. Defaults are the tutorial's `ViTModel` defaults."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    num_classes: int = 1000
    norm_first: bool = False  # False: post-norm, as nn.TransformerEncoderLayer's default
    encoder_norm_eps: float = 1e-5  # PyTorch's LayerNorm default, used inside the blocks
    final_norm_eps: float = 1e-6  # the tutorial's LayerNorm on the CLS output
    patch_bias: bool = False  # a bias in the patch projection (timm's ViTs have one)
    # Stochastic depth: the chance a block's residual branches are dropped for a sample, rising
    # linearly from 0 at the first block to this at the last (timm's drop_path_rate).
    drop_path: float = 0.0
    # The two small-data changes of Lee et al. 2021 ("Vision Transformer for Small-Size
    # Datasets"): patches cut from the image and its four diagonal half-patch shifts (shifted
    # patch tokenization), and attention with a learned per-head temperature in which no token
    # attends to itself (locality self-attention).
    shifted_patches: bool = False
    locality_attention: bool = False
    # A small convolutional stem in the patch projection's place (ConvStem; after Xiao et al.
    # 2021, "Early Convolutions Help Transformers See Better"): tokens on the same patch grid.
    conv_stem: bool = False
    # "tutorial": the values the tutorial's ViTModel starts from for the same torch seed (xavier
    # QKV, zero attention biases, every block a copy of the first); "independent": each block
    # drawn by its own layers' PyTorch defaults.
    init: str = "tutorial"

    def __post_init__(self) -> None:
        positive = ("image_size", "patch_size", "num_channels", "width", "depth", "num_heads",
                    "mlp_dim", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.num_classes > 1_000_000 or self.image_size > 16_384:
            raise ConfigError(f"num_classes must be at most 1,000,000 and image_size at most "
                              f"16,384, got {self.num_classes} and {self.image_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image size {self.image_size} must be a multiple of patch size {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        for name in ("dropout", "drop_path"):  # named as the flags that set them
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, float | int) \
                    or not 0.0 <= value < 1.0:
                raise SettingError(name, f"must be a number in [0, 1), got {value!r}")
        for name in ("norm_first", "patch_bias", "shifted_patches", "locality_attention",
                     "conv_stem"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ViTConfig.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.shifted_patches and self.patch_size < 2:
            raise ConfigError("shifted patches need a patch size of at least 2 (the shift is "
                              "half a patch)")
        if self.conv_stem:
            p = self.patch_size
            if self.shifted_patches:
                raise ConfigError("a model has shifted patch tokens or a conv stem, not both")
            if p < 2 or p & (p - 1) or self.width % p or self.width // p < 8:
                # Its first conv has width/p channels, each pixel's norm over them: one channel
                # would normalize every image to the same constant.
                raise ConfigError(f"a conv stem needs a patch size that is a power of 2 (one "
                                  f"stride-2 conv per halving) with width / patch >= 8 (its "
                                  f"first conv's channels), got patch {p} and width "
                                  f"{self.width}")
        if self.init not in ("tutorial", "independent"):
            raise ConfigError(f"init must be 'tutorial' or 'independent', got {self.init!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ViTConfig fields: {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as e:  # e.g. a hand-edited config.json with a string for a number
            raise ConfigError(f"invalid ViTConfig values ({e})") from None


# timm's VisionTransformer: a patch-projection bias and LayerNorm eps 1e-6 everywhere, so its
# weights load into these presets exactly (vitlab.interop).
_TIMM_LAYOUT = dict(patch_bias=True, encoder_norm_eps=1e-6)

# The vitlab recipe's model: the plain ViT of Lee et al. 2021 ("Vision Transformer for Small-Size
# Datasets": depth 9, width 192, 12 heads, MLP 384, patch 4; 2.7 M parameters, 0.90x seed-mini's
# matrix-multiply FLOPs), pre-norm, stochastic depth 0.1, no dropout.
_VITLAB_MINI = dict(image_size=32, patch_size=4, width=192, depth=9, num_heads=12, mlp_dim=384,
                    dropout=0.0, drop_path=0.1, norm_first=True)

# Named architectures. "seed-mini" is the tutorial's CIFAR model and "vit-base-16" its ViTModel
# defaults (post-norm, dropout 0.1, as the tutorial builds them); "vit-tiny-16" and "vit-small-16"
# are the ViT-Ti/S shapes of the DeiT paper, pre-norm as in the ViT paper.
PRESETS: dict[str, dict] = {
    "seed-mini": dict(image_size=32, patch_size=4, width=256, depth=6, num_heads=8, mlp_dim=512,
                      dropout=0.1, norm_first=False),
    "seed-mini-prenorm": dict(image_size=32, patch_size=4, width=256, depth=6, num_heads=8,
                              mlp_dim=512, dropout=0.1, norm_first=True),
    "vit-base-16": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                        mlp_dim=3072, dropout=0.1, norm_first=False),
    "vit-tiny-16": dict(image_size=224, patch_size=16, width=192, depth=12, num_heads=3,
                        mlp_dim=768, dropout=0.0, norm_first=True, **_TIMM_LAYOUT),
    "vit-small-16": dict(image_size=224, patch_size=16, width=384, depth=12, num_heads=6,
                         mlp_dim=1536, dropout=0.0, norm_first=True, **_TIMM_LAYOUT),
    "vitlab-mini": _VITLAB_MINI,
    # vitlab-mini with Lee et al.'s shifted patch tokenization and locality self-attention (in
    # their paper, with their recipe: 76.9% on CIFAR-100 in 100 epochs, against 73.8% for their
    # plain ViT of vitlab-mini's shape); 2.75 M parameters, 0.91x seed-mini's FLOPs.
    "vitlab-mini-sl": dict(_VITLAB_MINI, shifted_patches=True, locality_attention=True),
    # vitlab-mini with a conv stem (3x3 convs 3 -> 48 -> 96 -> 192 channels, the last two of
    # stride 2, then a 1x1 conv to the tokens): 2.95 M parameters, 1.03x seed-mini's FLOPs.
    "vitlab-mini-conv": dict(_VITLAB_MINI, conv_stem=True),
    # A few-minutes-on-a-CPU model for smoke runs and tests; not for accuracy.
    "micro": dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128,
                  dropout=0.1, norm_first=False),
}


def preset(name: str, num_classes: int, **overrides) -> ViTConfig:
    """The `ViTConfig` of a named architecture with a head of `num_classes` outputs."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ViTConfig(**{**PRESETS[name], "num_classes": num_classes, **overrides})


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """[..., H, W] images moved down by dy and right by dx pixels (negative: up, left), the
    uncovered pixels zero: out[..., y, x] = images[..., y - dy, x - dx]."""
    h, w = images.shape[-2:]
    kept = images[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return F.pad(kept, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))


class ShiftedPatchTokens(nn.Module):
    """Shifted patch tokenization (Lee et al. 2021): the image and its four diagonal shifts by
    half a patch (down-right, down-left, up-right, up-left: the order of the authors' code),
    stacked on channels, cut into patches; each patch flattened (row, column, channel),
    layer-normed and projected: [B, C, H, W] -> [B, num_patches, width]. Each token then sees a
    little of its neighbours, which a plain patch projection cannot."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        dim = 5 * config.num_channels * config.patch_size ** 2
        self.norm = nn.LayerNorm(dim, eps=config.encoder_norm_eps)
        self.linear = nn.Linear(dim, config.width, bias=config.patch_bias)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.linear.reset_parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s, p = self.patch_size // 2, self.patch_size
        stacked = torch.cat([images, *(shift(images, dy, dx) for dy in (s, -s) for dx in (s, -s))],
                            dim=1)
        b, c, h, w = stacked.shape
        patches = stacked.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.linear(self.norm(patches.reshape(b, (h // p) * (w // p), p * p * c)))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a [B, C, H, W] map (ConvNeXt's
    channels-first LayerNorm): per sample and position, so no running statistics to sync across
    processes or to average in an EMA, and no pixel's value reaching another's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_stem_layers(config: ViTConfig) -> list[tuple[int, int, int]]:
    """The conv stem's 3x3 convs as (in channels, out channels, output side): width/p channels
    at full resolution, then one stride-2 conv per halving, each doubling them up to the width."""
    layers = [(config.num_channels, config.width // config.patch_size, config.image_size)]
    while layers[-1][1] < config.width:
        _, c, side = layers[-1]
        layers.append((c, 2 * c, side // 2))
    return layers


class ConvStem(nn.Module):
    """Convolutions instead of the patch projection: a 3x3 conv to width/p channels at full
    resolution, then log2(p) 3x3 convs of stride 2 each doubling the channels, each followed by
    a `ChannelNorm` and GELU; a 1x1 conv then gives the width: [B, C, H, W] ->
    [B, num_patches, width] on the patch grid. Each token then sees a little past its patch's
    borders, the locality a small dataset does not teach a ViT fast (Xiao et al. 2021)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out, _) in enumerate(conv_stem_layers(config)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1,
                                 bias=False),
                       ChannelNorm(c_out, eps=config.encoder_norm_eps), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(config.width, config.width, 1, bias=config.patch_bias)

    def reset_parameters(self) -> None:
        for module in (*self.convs, self.proj):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(images)).flatten(2).transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Image -> [B, 1 + num_patches, width] tokens: conv patches (or shifted patch tokens, or a
    conv stem), CLS token, positions, dropout."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        self.tokens_out = config.shifted_patches or config.conv_stem  # [B, T, width] already
        self.proj = (ShiftedPatchTokens(config) if config.shifted_patches else
                     ConvStem(config) if config.conv_stem else
                     nn.Conv2d(config.num_channels, config.width, kernel_size=config.patch_size,
                               stride=config.patch_size, bias=config.patch_bias))
        # Zero-initialised and trainable, as in the tutorial.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.width))
        self.dropout = Dropout(config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ConfigError(
                f"the model expects images of shape [B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}], got {list(images.shape)}"
            )
        x = self.proj(images)
        if not self.tokens_out:  # the conv's [B, width, h, w] -> [B, h*w, width]
            x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embedding)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, batch-first.

    `locality`: locality self-attention (Lee et al. 2021): the scores' scale is a learned
    temperature per head (from 1/sqrt(head dim)) instead of the constant, and no token attends to
    itself, which sharpens attention towards the other tokens."""

    def __init__(self, width: int, num_heads: int, dropout: float, locality: bool = False
                 ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = dropout
        self.scale = (width // num_heads) ** -0.5
        self.temperature = (nn.Parameter(torch.full((num_heads,), self.scale)) if locality
                            else None)

    def forward(self, x: torch.Tensor, queries: int | None = None,
                return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from the first `queries` tokens (all when None) to every token of `x`.

        With `return_weights`, also the attention weights [B, heads, queries, tokens]: the
        softmax(QK^T / sqrt(d)) the output is made of (with locality: the head's temperature for
        1 / sqrt(d), and 0 for each query's own token), computed explicitly, so it costs the
        fused kernel's speed; off, nothing changes.
        """
        batch, tokens, width = x.shape
        if queries is None:
            # [B, T, 3, H, D] -> three [B, H, T, D] views; SDPA accepts the strided layout.
            q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            queries = tokens
        else:
            # Only keys and values for the whole sequence; queries for the first tokens alone.
            q_weight, kv_weight = self.qkv.weight.split([width, 2 * width])
            q_bias, kv_bias = self.qkv.bias.split([width, 2 * width])
            q = F.linear(x[:, :queries], q_weight, q_bias)
            q = q.view(batch, queries, self.num_heads, -1).transpose(1, 2)
            k, v = F.linear(x, kv_weight, kv_bias).view(
                batch, tokens, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = mask = None
        scale = self.scale
        if self.temperature is not None:  # the learned scale, and query i never sees token i
            q, scale = q * self.temperature.view(-1, 1, 1).to(q.dtype), 1.0
            positions = torch.arange(tokens, device=x.device)
            mask = positions[:queries, None] != positions  # True: may attend
        if return_weights or (self.training and self.attn_dropout > 0
                              and x.device.type == "cpu"):
            # SDPA's CPU kernels have no dropout: it would fall back to the same math as here,
            # with PyTorch's slower mask.
            scores = (q * scale) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = dropout(weights, self.attn_dropout, self.training) @ v
        else:
            dropout_p = self.attn_dropout if self.training else 0.0
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                     dropout_p=dropout_p, scale=scale)
        out = self.proj(out.transpose(1, 2).reshape(batch, queries, width))
        return (out, weights) if return_weights else out


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class EncoderBlock(nn.Module):
    """Attention + MLP with residuals; LayerNorm after (post-norm) or before (pre-norm) each.

    Dropout sits where `nn.TransformerEncoderLayer` puts it: on the attention weights, after
    the attention output, between the MLP layers, and after the MLP output.
    """

    def __init__(self, config: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(config.width, eps=config.encoder_norm_eps)
        self.attn = Attention(config.width, config.num_heads, config.dropout,
                              locality=config.locality_attention)
        self.dropout1 = Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.width, eps=config.encoder_norm_eps)
        self.mlp = MLP(config.width, config.mlp_dim, config.dropout)
        self.dropout2 = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cls_only: bool = False, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, T, width] -> [B, T, width], or [B, 1, width] for the CLS token alone.

        `cls_only` is exact for the CLS output: that token attends to all tokens, and nothing
        after the attention mixes tokens, so the other tokens' outputs need not be computed.
        `return_attention` also returns the attention weights [B, heads, T or 1, T].
        """
        queries = 1 if cls_only else None
        attn_input = self.norm1(x) if self.norm_first else x
        # Sliced before the attention runs: autograd then sums the two gradients reaching x in
        # the order it always has, which keeps training bitwise what it was.
        residual = x[:, :1] if cls_only else x
        attended = self.attn(attn_input, queries, return_weights=return_attention)
        attended, weights = attended if return_attention else (attended, None)
        if self.norm_first:
            x = residual + self._branch(self.dropout1(attended))
            x = x + self._branch(self.dropout2(self.mlp(self.norm2(x))))
        else:
            x = self.norm1(residual + self._branch(self.dropout1(attended)))
            x = self.norm2(x + self._branch(self.dropout2(self.mlp(x))))
        return (x, weights) if return_attention else x

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """A residual branch, dropped for whole samples with probability drop_path (training),
        the kept ones scaled by 1 / (1 - drop_path). Off (rate 0), nothing is drawn."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep).div_(keep)
        return x * mask


class ViTEncoder(nn.Module):
    """Everything but the head: the part fine-tuning copies from a pre-trained model."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.embedding = PatchEmbedding(config)
        steps = max(config.depth - 1, 1)
        rates = [config.drop_path * i / steps for i in range(config.depth)]
        self.blocks = nn.ModuleList(EncoderBlock(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.width, eps=config.final_norm_eps)
        # Gradient checkpointing (timm's set_grad_checkpointing, Hugging Face's
        # gradient_checkpointing): in training, each block keeps only its input for the backward
        # pass and runs its forward again there. The recomputation draws the same dropout and
        # drop-path masks (the RNG state is restored), so the gradients are the same.
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The final-normed CLS features [B, width], what the head classifies.

        With `return_attention`, also every block's attention weights, [B, heads, T, T] each
        (the last block's for all tokens, so maps can be read from any layer).
        """
        x = self.embedding(images)
        if return_attention:
            attentions = []
            for block in self.blocks:
                x, weights = block(x, return_attention=True)
                attentions.append(weights)
            return self.norm(x[:, 0]), attentions
        *body, last = self.blocks
        for block in body:
            x = self._block(block, x)
        # Only the CLS token's output is used: the last block computes it alone (~1/8 less work).
        return self.norm(self._block(last, x, cls_only=True)[:, 0])

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every token's output of the last block [B, 1 + num_patches, width], before the norm."""
        x = self.embedding(images)
        for block in self.blocks:
            x = self._block(block, x)
        return x

    def _block(self, block: EncoderBlock, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        rng_at_start = torch.get_rng_state()
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config)
        self.head = nn.Linear(config.width, config.num_classes)
        if config.init == "tutorial":
            torch.set_rng_state(rng_at_start)
            self._init_like_tutorial()

    @torch.no_grad()
    def _init_like_tutorial(self) -> None:
        """Draw the weights in the order, and with the rules, of the tutorial's constructors.

        ViTEmbeddings' conv; then one nn.TransformerEncoderLayer: MultiheadAttention (out_proj
        as a Linear, then xavier-uniform in_proj and zero in_proj/out_proj biases), linear1,
        linear2; nn.TransformerEncoder deep-copies that layer into every block; then the head.
        From the same torch seed this gives the tutorial's initial weights bit for bit (a model
        with shifted patch tokens or a conv stem draws those in the patch conv's place; locality
        attention's temperatures are constants).
        """
        self.encoder.embedding.proj.reset_parameters()
        first = self.encoder.blocks[0]
        first.attn.proj.reset_parameters()
        nn.init.xavier_uniform_(first.attn.qkv.weight)
        nn.init.zeros_(first.attn.qkv.bias)
        nn.init.zeros_(first.attn.proj.bias)
        first.mlp.fc1.reset_parameters()
        first.mlp.fc2.reset_parameters()
        for block in self.encoder.blocks[1:]:
            block.load_state_dict(first.state_dict())
        self.head.reset_parameters()

    def forward(self, images: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, num_classes]; with `return_attention`, (logits, per-block attention
        weights [B, heads, T, T]), T = 1 + num_patches with the CLS token first."""
        if return_attention:
            features, attentions = self.encoder(images, return_attention=True)
            return self.head(features), attentions
        return self.head(self.encoder(images))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# Test-time augmentation at evaluation and prediction: `--tta none|flip`.
TTA_CHOICES = ("none", "flip")


def check_tta(tta: str) -> str:
    """`tta` if it is one of TTA_CHOICES; a one-line error otherwise."""
    if tta not in TTA_CHOICES:
        raise ConfigError(f"--tta takes {' or '.join(TTA_CHOICES)}, got {tta!r}")
    return tta


def tta_logits(model: nn.Module, inputs: torch.Tensor, tta: str = "none",
               outputs: int | None = None) -> torch.Tensor:
    """The model's logits for inputs [B,C,H,W] (its first `outputs` only, if given: the classes
    of a head wider than the data's); with `tta` "flip" (horizontal-flip test-time
    augmentation), the log of the mean of the class probabilities of the images and of their
    left-right mirrors (one forward pass of both), in float32: log-probabilities, which softmax,
    argmax, top-k and cross-entropy read as they read logits."""
    if check_tta(tta) == "none":
        return model(inputs)[:, :outputs]
    views = model(torch.cat([inputs, inputs.flip(3)]))[:, :outputs].float().log_softmax(1)
    image, mirror = views.chunk(2)
    return torch.logaddexp(image, mirror) - math.log(2)


def _tutorial_key_map(depth: int) -> dict[str, str]:
    """vitlab parameter name -> the name the tutorial's `ViTModel` gives the same tensor."""
    mapping = {
        "encoder.embedding.proj.weight": "vit_encoder.embedding.patch_embedding.weight",
        "encoder.embedding.cls_token": "vit_encoder.embedding.cls_token",
        "encoder.embedding.position_embedding": "vit_encoder.embedding.position_embedding",
        "encoder.norm.weight": "vit_encoder.layernorm.weight",
        "encoder.norm.bias": "vit_encoder.layernorm.bias",
        "head.weight": "linear_classifier.weight",
        "head.bias": "linear_classifier.bias",
    }
    per_block = {
        "attn.qkv.weight": "self_attn.in_proj_weight",
        "attn.qkv.bias": "self_attn.in_proj_bias",
        "attn.proj.weight": "self_attn.out_proj.weight",
        "attn.proj.bias": "self_attn.out_proj.bias",
        "mlp.fc1.weight": "linear1.weight",
        "mlp.fc1.bias": "linear1.bias",
        "mlp.fc2.weight": "linear2.weight",
        "mlp.fc2.bias": "linear2.bias",
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
    }
    for i in range(depth):
        for ours, theirs in per_block.items():
            mapping[f"encoder.blocks.{i}.{ours}"] = f"vit_encoder.encoder.layers.{i}.{theirs}"
    return mapping


def load_tutorial_state_dict(model: ViT, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights saved from the tutorial's `ViTModel` into a vitlab `ViT` of the same shape.

    The tutorial's fused `in_proj` holds Q, K and V stacked in that order, as does `attn.qkv`,
    so every tensor maps one to one. A missing, extra or mis-shaped key raises `CheckpointError`.
    """
    config = model.config
    if config.shifted_patches or config.locality_attention or config.conv_stem:
        raise ConfigError("the tutorial's ViTModel has no shifted patch tokens, locality "
                          "self-attention or conv stem; load its weights into a model without "
                          "them")
    mapping = _tutorial_key_map(model.config.depth)
    ours = model.state_dict()
    expected = set(mapping.values())
    missing = sorted(expected - set(state_dict))
    if missing:
        raise CheckpointError(f"tutorial state dict is missing key {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(state_dict) - expected)
    if extra:
        raise CheckpointError(f"tutorial state dict has unexpected key {extra[0]!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    converted = {}
    for our_key, their_key in mapping.items():
        tensor = state_dict[their_key]
        if tuple(tensor.shape) != tuple(ours[our_key].shape):
            raise CheckpointError(
                f"tutorial key {their_key!r} has shape {list(tensor.shape)}, the model expects "
                f"{list(ours[our_key].shape)} for {our_key!r}"
            )
        converted[our_key] = tensor
    model.load_state_dict(converted, strict=True)


def forward_flops(config: ViTConfig, cls_only_last_block: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image's forward pass through every matrix product:
    patch projection, QKV, attention scores and mixing, output projection, MLP, head.

    vitlab's ViT runs its last block for the CLS token alone (its query, attention row, output
    projection and MLP; the keys and values of every token); the tutorial's ViTModel
    (`cls_only_last_block=False`) runs every token through every block."""
    tokens, width, mlp = config.num_patches + 1, config.width, config.mlp_dim
    if config.conv_stem:  # its 3x3 convs, then the 1x1 projection
        patch = sum(side * side * 9 * c_in * c_out
                    for c_in, c_out, side in conv_stem_layers(config))
        patch += config.num_patches * width * width
    else:
        patch = config.num_patches * width * config.num_channels * config.patch_size ** 2
        patch *= 5 if config.shifted_patches else 1  # the image and its four shifts
    block = tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens ** 2 * width
    last = (tokens * 2 * width * width + 2 * width * width + 2 * tokens * width + 2 * width * mlp
            if cls_only_last_block else block)
    return 2 * (patch + (config.depth - 1) * block + last + width * config.num_classes)
