"""Metric functions against known values."""
from __future__ import annotations


import pytest
import torch

from training.privacy import metrics as M


def test_psnr_of_a_known_mse():
    a = torch.zeros(2, 1, 16, 16)
    b = torch.full((2, 1, 16, 16), 0.2)  # [-1, 1] offset 0.2 -> 0.1 on the [0, 1] scale -> MSE 0.01
    assert torch.allclose(M.psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)


def test_psnr_of_identical_images_is_infinite_and_ssim_is_one():
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.isinf(M.psnr(x, x)).all()
    assert torch.allclose(M.ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_ssim_drops_with_noise_and_for_unrelated_images():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    other = torch.rand(x.shape, generator=g) * 2 - 1
    s_noisy, s_other = float(M.ssim(x, noisy)), float(M.ssim(x, other))
    assert 0 < s_noisy < 1 and abs(s_other) < 0.2 and s_noisy > s_other


@pytest.mark.parametrize("rate,chance,want", [(0.5, 0.5, 0.0), (1.0, 0.5, 1.0), (0.75, 0.5, 0.5), (0.3, 0.5, 0.0), (0.05, 0.05, 0.0),
                                               (0.525, 0.05, 0.5), (float("nan"), 0.5, 0.0)])
def test_above_chance(rate, chance, want):
    assert M.above_chance(rate, chance) == pytest.approx(want)


def test_scores():
    # S1: top-1 at chance (1/20), verification 75% -> leak 0.5; S3: top-1 24/20... 0.525 -> 0.5; S4 chance -> 0
    leaks = {"S1": M.scenario_leak({"top1": 0.05, "verification": 0.75}, 20), "S3": M.scenario_leak({"top1": 0.525}, 20),
             "S4": M.scenario_leak({"top1": 0.05}, 20)}
    assert leaks == pytest.approx({"S1": 0.5, "S3": 0.5, "S4": 0.0})
    assert M.score_pp(leaks) == pytest.approx(0.5)
    assert M.score_cls(1.0, 20) == 1.0 and M.score_cls(0.05, 20) == 0.0
    assert M.tradeoff(1.0, 1.0) == 1.0 and M.tradeoff(0.0, 1.0) == 0.0
    assert M.tradeoff(0.5, 1.0) == pytest.approx(2 / 3)
