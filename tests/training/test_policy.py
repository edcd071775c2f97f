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
    pol = _policy("sample", penalty=4.0, penalty_lr=0.0, target_acc=0.8)  # lambda fixed at 4
    pol.loss_ema.fill_(2.0)
    a = torch.arange(5)  # k = 2..6
    loss = torch.full((5,), 3.0)
    pol.observe_validation(0.9)  # above target: no utility term, reward = L / L_ema
    torch.testing.assert_close(pol.reward(loss, a), torch.full((5,), 1.5))
    pol.observe_validation(0.6)  # 0.2 below target: each extra partner costs 4 * 0.2 / 4
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


def test_no_utility_term_before_the_first_validation():
    # before any held-out accuracy exists the reward is the privacy term alone (acc_val = 0 is not a measurement)
    pol = _policy("sample", penalty=4.0, penalty_lr=0.0, target_acc=0.8)
    pol.loss_ema.fill_(2.0)
    a = torch.arange(5)
    loss = torch.full((5,), 3.0)
    torch.testing.assert_close(pol.reward(loss, a), torch.full((5,), 1.5))
    pol.observe_validation(0.0)  # a measured 0 is a real gap
    torch.testing.assert_close(pol.reward(loss, a), 1.5 - 0.8 * torch.arange(5.0))


def test_lambda_dual_ascent():
    pol = _policy("sample", penalty=4.0, penalty_lr=20.0, target_acc=0.8)
    pol.observe_validation(0.7)  # 0.1 below target: lambda 4 -> 6
    assert float(pol.lam) == pytest.approx(6.0)
    pol.observe_validation(0.75)
    assert float(pol.lam) == pytest.approx(7.0)
    pol.observe_validation(0.9)  # above target: back down, never below the configured penalty
    assert float(pol.lam) == pytest.approx(5.0)
    pol.observe_validation(1.0)
    assert float(pol.lam) == pytest.approx(4.0)
    pol.loss_ema.fill_(1.0)
    pol.observe_validation(0.6)  # lambda 8: the utility term uses the adapted value
    torch.testing.assert_close(pol.reward(torch.ones(5), torch.arange(5)), 1.0 - 8.0 * 0.2 * torch.arange(5.0) / 4)


@pytest.mark.parametrize("key,val", [("explore", 1.0), ("explore", -0.1), ("penalty_lr", -1.0), ("penalty", -1.0)])
def test_bad_policy_config_is_an_error_naming_the_key(key, val):
    with pytest.raises(ValueError, match=key):
        _policy("batch", **{key: val})


def _collapsed(explore):
    """A policy that put (almost) all its mass on k = 2, as the utility term makes it do early on."""
    # entropy 0: the bonus alone (Adam rescales its tiny gradient) would also unstick the policy, slowly
    pol = _policy("batch", explore=explore, entropy=0.0)
    with torch.no_grad():
        pol.net.net[-1].bias.copy_(torch.tensor([12.0, 0, 0, 0, 0]))
    return pol


def test_exploration_floor():
    pol = _collapsed(0.1)
    s = torch.zeros(1, STATE_DIM)
    assert pol.probs(s)[0, 0] > 0.9999
    ks = torch.cat([pol.act(s, 1)[0] for _ in range(4000)])
    frac6 = float((ks == 6).float().mean())
    assert abs(frac6 - 0.02) < 0.01, frac6  # eps / |K| = 0.1 / 5


@pytest.mark.parametrize("explore", [0.0, 0.1])
def test_collapsed_policy_moves_again_once_the_penalty_lifts(explore):
    # The penalty is off (accuracy above target) and the privacy term rewards more partners: a policy that
    # collapsed on k = 2 must move towards k = 6 -- it can only if it still samples other k (explore > 0).
    pol = _collapsed(explore)
    pol.loss_ema.fill_(1.0)
    pol.observe_validation(0.95)
    opt = torch.optim.Adam(pol.net.parameters(), lr=float(DEFAULTS["policy"]["lr"]))
    s = torch.zeros(1, STATE_DIM)
    for _ in range(60):  # 60 policy steps = 300 FR steps with update_every 5
        for _ in range(5):
            k, a = pol.act(s, 1)
            pol.record(s, a, pol.reward(0.8 + 0.1 * (k.float() - 2), a))  # L_mix grows with k
        pol.update(opt)
    p6 = float(pol.probs(s)[0, -1].detach())
    if explore:
        assert p6 > 0.5, p6
    else:
        assert p6 < 1e-4, p6  # without the floor the collapse is permanent: what the floor is for
