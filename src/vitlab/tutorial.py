"""The tutorial's ViT, as written in ../shared/seed (FastEstimator's ViT example): the reference of
the parity tests and the baseline of `vitlab bench`.

Kept verbatim in behaviour: sequence-first `nn.TransformerEncoder` with GELU, post-norm, dropout.
"""

import warnings

import torch
import torch.nn as nn
from torch.nn import TransformerEncoder, TransformerEncoderLayer


class ViTEmbeddings(nn.Module):
    def __init__(self, image_size=224, patch_size=16, num_channels=3, em_dim=768, drop=0.1) -> None:
        super().__init__()
        assert image_size % patch_size == 0, "image size must be an integer multiply of patch size"
        self.patch_embedding = nn.Conv2d(num_channels, em_dim, kernel_size=patch_size,
                                         stride=patch_size, bias=False)
        self.position_embedding = nn.Parameter(
            torch.zeros(1, (image_size // patch_size) ** 2 + 1, em_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, em_dim))
        self.dropout = nn.Dropout(drop)

    def forward(self, x):
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)
        x = x + self.position_embedding
        x = self.dropout(x)
        return x


class ViTEncoder(nn.Module):
    def __init__(self, num_layers, image_size, patch_size, num_channels, em_dim, drop, num_heads,
                 ff_dim):
        super().__init__()
        self.embedding = ViTEmbeddings(image_size, patch_size, num_channels, em_dim, drop)
        encoder_layer = TransformerEncoderLayer(em_dim, nhead=num_heads, dim_feedforward=ff_dim,
                                                activation="gelu", dropout=drop)
        with warnings.catch_warnings():  # the tutorial's layout has no nested-tensor fast path
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.encoder = TransformerEncoder(encoder_layer=encoder_layer, num_layers=num_layers)
        self.layernorm = nn.LayerNorm(em_dim, eps=1e-6)

    def forward(self, x):
        x = self.embedding(x)
        x = x.transpose(0, 1)
        x = self.encoder(x)
        x = self.layernorm(x[0])
        return x


class ViTModel(nn.Module):
    def __init__(self, num_classes, num_layers=12, image_size=224, patch_size=16, num_channels=3,
                 em_dim=768, drop=0.1, num_heads=12, ff_dim=3072):
        super().__init__()
        self.vit_encoder = ViTEncoder(num_layers=num_layers, image_size=image_size,
                                      patch_size=patch_size, num_channels=num_channels,
                                      em_dim=em_dim, drop=drop, num_heads=num_heads, ff_dim=ff_dim)
        self.linear_classifier = nn.Linear(em_dim, num_classes)

    def forward(self, x):
        x = self.vit_encoder(x)
        x = self.linear_classifier(x)
        return x


def seed_mini_reference(num_classes: int = 100, drop: float = 0.1) -> ViTModel:
    """The tutorial's pre-training model: 32/4, 6 layers, width 256, 8 heads, MLP 512."""
    return ViTModel(num_classes=num_classes, image_size=32, patch_size=4, num_layers=6,
                    num_channels=3, em_dim=256, num_heads=8, ff_dim=512, drop=drop)
