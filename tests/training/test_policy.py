"""The strategy network: REINFORCE moves probability towards rewarded k; the reward's utility term."""
from __future__ import annotations

import pytest
import torch

from training.config import DEFAULTS
from training.policy import STATE_DIM, Policy, band_energies


def _policy(mode="batch", **over):
    cfg = {**DEFAULTS["policy"], "mode": mode, "entropy": 0.0, **over}
    return Policy(cfg, [2, 3, 4, 5, 6], num_classes=10, color="none", seed=0, device="cpu")


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_reward_favouring_k6_moves_probability_to_k6(mode):
    pol = _policy(mode)
    opt = torch.optim.SGD(pol.net.parameters(), lr=0.5)
    s = torch.rand(16, STATE_DIM, generator=torch.Generator().manual_seed(0))
    p0 = pol.probs(s).mean(0)
    assert torch.allclose(p0, torch.full((5,), 0.2)), "starts uniform"
    for _ in range(3):
        k, a = pol.act(s, 16)
        pol.record(s, a, (k[: len(a)] == 6).float() if mode == "sample" else (pol.k_values[a] == 6).float())
        pol.update(opt)
    p1 = pol.probs(s).mean(0)
    assert p1[-1] > p0[-1] + 0.05, (p0, p1)


def test_single_update_gradient_sign():
    # one REINFORCE step with a fixed baseline: actions with positive advantage gain probability
    pol = _policy("sample")
    pol.baseline.fill_(0.5)
    pol.updates.fill_(1)
    opt = torch.optim.SGD(pol.net.parameters(), lr=0.1)
    s = torch.zeros(10, STATE_DIM)
    a = torch.tensor([4] * 5 + [0] * 5)  # k = 6 and k = 2
    r = torch.tensor([1.0] * 5 + [0.0] * 5)  # k = 6 rewarded above the baseline, k = 2 below
    pol.record(s, a, r)
    before = pol.probs(s[:1])[0]
    pol.update(opt)
    after = pol.probs(s[:1])[0]
    assert after[4] > before[4] and after[0] < before[0]


def test_reward_formula_privacy_minus_utility():
    pol = _policy("sample", penalty=4.0, target_acc=0.8)
    pol.loss_ema.fill_(2.0)
    a = torch.arange(5)  # k = 2..6
    loss = torch.full((5,), 3.0)
    pol.val_acc.fill_(0.9)  # above target: no utility term, reward = L / L_ema
    torch.testing.assert_close(pol.reward(loss, a), torch.full((5,), 1.5))
    pol.val_acc.fill_(0.6)  # 0.2 below target: each extra partner costs 4 * 0.2 / 4
    torch.testing.assert_close(pol.reward(loss, a), 1.5 - 0.2 * torch.arange(5.0))


def test_state_features():
    x = torch.rand(4, 1, 112, 112) * 2 - 1
    e = band_energies(x, "none")
    assert e.shape == (4, 15) and torch.isfinite(e).all()
    pol = _policy("batch")
    assert pol.state(x, 0.5).shape == (1, STATE_DIM)
    k, a = pol.act(pol.state(x, 0.5), 4)
    assert k.shape == (4,) and len(set(k.tolist())) == 1 and 2 <= int(k[0]) <= 6
    pol = _policy("sample")
    k, a = pol.act(pol.state(x, 0.5), 4)
    assert k.shape == (4,) and a.shape == (4,)
