"""Noise surrogate: noise only in training, std-relative scale, loss, sigmas learn, errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from appmult.methods.surrogate import (attach_noise_surrogate, detach_noise_surrogate, learned_sigmas, surrogate_loss, surrogate_loss_fn, train_surrogate)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


def test_noise_only_in_training_and_relative_to_std():
    m = model()
    x = torch.randn(64, 1, 6, 6)
    with torch.no_grad():
        clean = m(x)
    s = attach_noise_surrogate(m, init=0.3)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), clean)  # eval is deterministic and unchanged
    # Noise std / output std (bias removed) equals |sigma| for the last layer alone.
    s.sigma("0").data.fill_(0.0)
    s.sigma("3").data.fill_(-0.3)  # the sign does not matter
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        noisy = m(x)
    y = clean - m[3].bias
    ratio = float((noisy - clean).std() / y.detach().std())
    assert ratio == pytest.approx(0.3, rel=0.15)
    assert s.ops == {"0": 36 * 4 * 9, "3": 3 * 144}


def test_loss_and_sigmas():
    m = model()
    attach_noise_surrogate(m, init=0.2, lam=0.5, sigma_max=0.25)
    m(torch.randn(2, 1, 6, 6))
    s = m.noise_surrogate
    s.sigma("0").data.fill_(1.0)  # saturates at sigma_max
    ce = torch.tensor(2.0)
    total = 36 * 4 * 9 + 3 * 144
    expected = 2.0 - 0.5 * ((36 * 4 * 9) / total * 0.25 + (3 * 144) / total * 0.2)
    assert float(surrogate_loss(m, ce).detach()) == pytest.approx(expected)
    assert learned_sigmas(m) == pytest.approx({"0": 1.0, "3": 0.2})
    m.eval()
    assert float(surrogate_loss_fn(m)(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))) == \
        pytest.approx(float(nn.functional.cross_entropy(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))))
    assert not any("sigma" in k for k in m.state_dict())  # the model's own state is untouched
    assert detach_noise_surrogate(m) == pytest.approx({"0": 1.0, "3": 0.2})
    assert not hasattr(m, "noise_surrogate")
    m.train()
    x = torch.randn(4, 1, 6, 6)
    assert torch.equal(m(x), m(x))  # hooks gone


def test_train_surrogate_reward_raises_sigmas():
    # With no task signal worth protecting (random labels) the reward dominates: sigmas grow.
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(128, 1, 6, 6), torch.randint(0, 3, (128,)))
    loaders = (DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)), None)
    sigmas, hist = train_surrogate(model(), loaders, 3, lam=5.0, sigma_lr=0.05)
    assert len(hist) == 3 and set(sigmas) == {"0", "3"}
    assert all(v > 0.3 for v in sigmas.values())


def test_surrogate_wrong():
    m = model()
    with pytest.raises(ValueError, match=re.escape("This model has no noise surrogate; call "
                                                   "attach_noise_surrogate(model) first")):
        learned_sigmas(m)
    with pytest.raises(ValueError, match="Noise surrogate sigma_max must be a positive finite number, not 0"):
        attach_noise_surrogate(m, sigma_max=0)
    with pytest.raises(ValueError, match="Noise surrogate: no nn.Conv2d/nn.Linear layer named 'nope'"):
        attach_noise_surrogate(m, layers=["nope"])
    with pytest.raises(ValueError, match="Noise surrogate: the model has no nn.Conv2d or nn.Linear layer"):
        attach_noise_surrogate(nn.Sequential(nn.ReLU()))
    attach_noise_surrogate(m)
    with pytest.raises(ValueError, match="A noise surrogate is already attached"):
        attach_noise_surrogate(m)
    with pytest.raises(RuntimeError, match="run one forward pass before computing the loss"):
        surrogate_loss(m, torch.tensor(1.0))
