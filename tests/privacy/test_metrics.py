"""Metric functions against known values."""
from __future__ import annotations

import math

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


class _Oracle(torch.nn.Module):
    """An 'evaluation model' that reads the identity off the first pixel: identity leak must be perfect for
    faithful reconstructions and at chance for constant ones."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def logits(self, x):
        ids = ((x[:, 0, 0, 0] + 1) / 2 * (self.classes - 1)).round().long().clamp(0, self.classes - 1)
        return torch.nn.functional.one_hot(ids, self.classes).float() * 10

    def embed(self, x):
        return torch.nn.functional.normalize(self.logits(x) + 0.01, dim=1)

    def classify(self, x):
        return self.logits(x).argmax(1)


def test_identity_leak_and_attack_accuracy_with_an_oracle():
    classes = 5
    labels = torch.arange(classes).repeat(4)
    imgs = torch.zeros(len(labels), 1, 8, 8)
    imgs[:, 0, 0, 0] = labels.float() / (classes - 1) * 2 - 1
    ev = _Oracle(classes)
    perfect = M.identity_leak(ev, imgs, imgs, labels)
    assert perfect["top1"] == 1.0 and perfect["verification"] == 1.0
    blank = M.identity_leak(ev, torch.full_like(imgs, -1), imgs, labels)
    assert blank["top1"] == pytest.approx(1 / classes)
    mi = M.attack_accuracy(ev, imgs[:classes], torch.arange(classes), imgs, labels)
    assert mi["top1"] == 1.0 and mi["top5"] == 1.0 and mi["knn_dist"] == pytest.approx(0.0, abs=1e-6)
    wrong = M.attack_accuracy(ev, imgs[:classes].roll(1, 0), torch.arange(classes), imgs, labels)
    assert wrong["top1"] == 0.0 and wrong["knn_dist"] > 1.0 and math.isfinite(wrong["knn_dist"])
