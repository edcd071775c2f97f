"""Privacy metrics: image quality of reconstructions, identity leak, model-inversion accuracy, scores.

Images are (N, 1, S, S) float tensors in [-1, 1]. PSNR and SSIM come from scikit-image
(``skimage.metrics``) on the [0, 1] range (data_range=1, 7x7 Gaussian-free window, as skimage's default).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity



def _np01(x: torch.Tensor) -> np.ndarray:
    """(N, C, S, S) [-1, 1] -> (N, S, S, C) float64 [0, 1] numpy."""
    return ((x.detach().double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1, 1] images a, b (N, C, S, S) on the [0, 1] scale: 10 log10(1 / MSE)."""
    A, B = _np01(a), _np01(b)
    with np.errstate(divide="ignore"):
        return torch.tensor([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(A, B)], dtype=torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of [-1, 1] images a, b (N, C, S, S) (skimage, data_range 1, channel axis last)."""
    A, B = _np01(a), _np01(b)
    return torch.tensor([structural_similarity(x, y, data_range=1.0, channel_axis=-1) for x, y in zip(A, B)],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# Scores in [0, 1] (definitions: training/privacy/THREAT_MODEL.md, "Scores")
# ----------------------------------------------------------------------------------------------------


def above_chance(rate: float, chance: float) -> float:
    """(rate - chance) / (1 - chance), clipped to [0, 1]: 0 at chance, 1 at perfect."""
    if not math.isfinite(rate):
        return 0.0
    return float(min(1.0, max(0.0, (rate - chance) / (1.0 - chance))))


def scenario_leak(res: dict, classes: int) -> float:
    """Identity leak of one scenario in [0, 1]: the largest chance-normalised identity rate it reached.

    S1 / S2: max(top-1 re-identification, 2 * (verification accuracy - 0.5)); S3 / S4: attack top-1."""
    if "verification" in res:
        return max(above_chance(res["top1"], 1.0 / classes), above_chance(res["verification"], 0.5))
    return above_chance(res["top1"], 1.0 / classes)


def score_pp(leaks: dict[str, float]) -> float:
    """Privacy: 1 - the worst-case identity leak over the scenarios run (an attacker picks the best attack)."""
    return 1.0 - max(leaks.values()) if leaks else float("nan")


def score_cls(accuracy: float, classes: int) -> float:
    """Utility: chance-normalised closed-set identification accuracy of the defended FR model."""
    return above_chance(accuracy, 1.0 / classes)


def tradeoff(pp: float, cls: float) -> float:
    """Harmonic mean of Score_pp and Score_cls (0 when either is 0: no privacy or no utility is no trade-off)."""
    return 0.0 if pp + cls <= 0 else 2 * pp * cls / (pp + cls)
