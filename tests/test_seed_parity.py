"""The seed recipe's update is the tutorial's: same loss, same SGD, same weights after steps."""

import torch
import torch.nn.functional as F

from vitlab.model import ViT, _tutorial_key_map, load_tutorial_state_dict, preset
from vitlab.train import recipe
from vitlab.train.recipe import build_optimizer
from vitlab.tutorial import seed_mini_reference


def test_three_seed_recipe_steps_match_the_tutorial_sgd():
    torch.manual_seed(0)
    reference = seed_mini_reference(100, drop=0.0)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.05)
    model = ViT(preset("seed-mini", 100, dropout=0.0))
    load_tutorial_state_dict(model, reference.state_dict())
    seed = recipe("seed")
    assert (seed.lr, seed.momentum, seed.weight_decay, seed.batch_size) == (0.01, 0.9, 1e-4, 128)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    ours = build_optimizer(seed, model.parameters())
    for _ in range(3):
        images = torch.randn(16, 3, 32, 32)
        labels = torch.randint(0, 100, (16,))
        for net, opt in ((reference, theirs), (model, ours)):
            opt.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            opt.step()
    reference_params = dict(reference.named_parameters())
    for our_key, their_key in _tutorial_key_map(6).items():
        torch.testing.assert_close(dict(model.named_parameters())[our_key],
                                   reference_params[their_key], atol=1e-5, rtol=1e-4,
                                   msg=our_key)
