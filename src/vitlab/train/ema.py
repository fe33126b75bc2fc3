"""An exponential moving average of a model's weights (Polyak averaging, as timm's ModelEma).

After optimizer step t (counted from 1) every floating-point parameter and buffer moves toward
the model's: ema += (1 - d_t) * (w - ema), with d_t = min(decay, (1 + t) / (10 + t)); the
warm-up keeps early averages from being dominated by the random initial weights. Integer buffers
are copied. The average lives in a second model, evaluated like the first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitlab.errors import ConfigError


class WeightEMA:
    """The EMA of `model`'s weights, held in `self.model` (same device, eval mode, no grads)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay {decay} must be between 0 and 1 (exclusive)")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs: tuple[nn.Module, list, list, list] | None = None  # see _split

    def decay_at(self, step: int) -> float:
        """d_t for the update after optimizer step `step` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        averaged, current, copied = self._split(model)
        for ema, live in copied:
            ema.copy_(live)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(step))

    def _split(self, model: nn.Module) -> tuple[list, list, list]:
        """The EMA's float tensors, the live model's matching ones, and (ema, live) integer
        pairs; made once per live model, not every step (parameters and buffers are updated in
        place, so the lists stay valid)."""
        if self._pairs is None or self._pairs[0] is not model:
            averaged, current, copied = [], [], []
            for ema, live in zip(self._tensors(self.model), self._tensors(model), strict=True):
                if ema.is_floating_point():
                    averaged.append(ema)
                    current.append(live.detach())
                else:
                    copied.append((ema, live))
            self._pairs = (model, averaged, current, copied)
        return self._pairs[1:]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
