"""Error-std predictors against Monte-Carlo sums of products, and against a real layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, approximate_, calibrate
from appmult.methods.error_model import (error_map, measure_error, predict_global, predict_population, predict_sigma, record_operands)


def truncated_lut(width: int, cut: int) -> LutFile:
    a = np.arange(1 << width)
    prod = np.outer(a, a)
    return LutFile((prod >> cut) << cut, width_a=width, width_b=width, signed=False)


def test_global_matches_monte_carlo():
    rng = np.random.default_rng(0)
    e = rng.normal(3.0, 5.0, size=(16, 16)) + np.arange(16)[:, None] * 0.5
    px, pw = rng.random(16) ** 2, rng.random(16)
    k, trials = 40, 20000
    xs = rng.choice(16, size=(trials, k), p=px / px.sum())
    ws = rng.choice(16, size=(trials, k), p=pw / pw.sum())
    sums = e[xs, ws].sum(axis=1)
    pred = predict_global(e, px, pw, k)
    # std of a std estimate from n samples is about sigma / sqrt(2n): 0.5% here; 3% tolerance.
    assert pred.sigma == pytest.approx(sums.std(), rel=0.03)
    assert pred.bias == pytest.approx(sums.mean(), abs=3 * pred.sigma / np.sqrt(trials))


def test_population_matches_monte_carlo():
    rng = np.random.default_rng(1)
    e = rng.normal(0.0, 4.0, size=(8, 8)) + np.arange(8)[:, None] * 2.0  # error depends on x: fields differ
    j, k, c = 60, 12, 5
    # Fields with different activation distributions (some large, some small codes).
    fields = np.stack([rng.integers(0, 8 if i % 2 else 3, size=k) for i in range(j)])
    weights = rng.integers(0, 8, size=(c, k))
    pred = predict_population(e, fields, weights)
    trials = 800
    sums = []
    for f in fields:
        pairs = e[f[None, :], weights].reshape(-1)  # field j's C*K paired errors
        sums.append(rng.choice(pairs, size=(trials, k)).sum(axis=1))
    sums = np.concatenate(sums)
    assert pred.sigma == pytest.approx(sums.std(), rel=0.03)
    # The variance between fields matters here: the global model on the pooled pairs is lower.
    assert pred.sigma > 1.2 * np.sqrt(k) * pred.sigma_op


def test_predictors_wrong():
    e = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"Histogram p_x must have one entry per code \(4,\), not shape \(3,\)"):
        predict_global(e, np.ones(3), np.ones(4), 2)
    with pytest.raises(ValueError, match="Histogram p_w must be finite, non-negative and not all zeros"):
        predict_global(e, np.ones(4), np.zeros(4), 2)
    with pytest.raises(ValueError, match="Fan-in K must be a positive integer, not 0"):
        predict_global(e, np.ones(4), np.ones(4), 0)
    with pytest.raises(ValueError, match="must be non-empty with the same K"):
        predict_population(e, np.zeros((2, 3), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="Field codes must lie in 0..3"):
        predict_population(e, np.full((2, 2), 4), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="activation_operand must be 'a' or 'b', not 'c'"):
        error_map(truncated_lut(4, 2), "c")


def test_real_layer_prediction_close_to_measurement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 6))
    exact = LutFile(np.outer(np.arange(64), np.arange(64)), width_a=6, width_b=6, signed=False)
    approx = truncated_lut(6, 4)
    q = approximate_(model, ApproxConfig(exact))
    data = [torch.rand(32, 2, 6, 6) for _ in range(4)]
    calibrate(q, data)
    stats = record_operands(q, data, fields=256)
    assert list(stats) == ["0", "3"]
    assert stats["0"].fan_in == 18 and stats["3"].fan_in == 288
    assert stats["0"].hist_x.sum() == 4 * 32 * 36 * 18  # every product of every output counted
    assert stats["0"].ops == 8 * 36 * 18
    layers = dict(q.named_modules())
    for name, s in stats.items():
        m = measure_error(layers[name], s, approx)
        assert m.count > 0
        pop = predict_sigma(s, approx, "population")
        glob = predict_sigma(s, approx, "global")
        assert pop.sigma == pytest.approx(m.std, rel=0.5)  # a model, not an identity: loose bound
        assert glob.bias == pytest.approx(m.mean, rel=0.1)
    with pytest.raises(ValueError, match="Error model must be 'global' or 'population', not 'x'"):
        predict_sigma(stats["0"], approx, "x")
    with pytest.raises(ValueError, match="the model has no approximate layer"):
        record_operands(nn.Sequential(nn.Linear(2, 2)), data)
