"""vitlab's CPU dropout has nn.Dropout's contract: drop rate p, survivors scaled by 1/(1-p)."""

import pytest
import torch

from vitlab.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.randn(500_000)
    y = dropout(x, p, training=True)
    dropped = y == 0
    # 500k Bernoulli draws: the standard error of the rate is < 7.1e-4; allow 5 of them.
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p), atol=0, rtol=1e-6)


def test_mask_lanes_are_independent():
    # Neighbouring elements come from the two halves of one 64-bit word: they must not correlate.
    torch.manual_seed(0)
    mask = keep_mask((400_000,), 0.5, torch.device("cpu")).float()
    even, odd = mask[0::2], mask[1::2]
    both = (even * odd).mean().item()
    assert abs(both - 0.25) < 0.005


def test_backward_is_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(1000, 100, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    y.sum().backward()
    expected = (y != 0).float() / 0.9
    torch.testing.assert_close(x.grad, expected, atol=0, rtol=1e-6)


def test_eval_and_zero_p_are_identity_and_seeded_runs_repeat():
    x = torch.randn(64, 64)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    module = Dropout(0.2)
    torch.manual_seed(3)
    a = module(x)
    torch.manual_seed(3)
    assert torch.equal(module(x), a)
    module.eval()
    assert module(x) is x
    assert dropout(x, 1.0, training=True).count_nonzero() == 0
