"""HybridMask: the adaptive hybrid mask as an nn.Module (sample partners and weights, then one fused op)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.freq_mix import FREQS, freq_mix
from ..ops.frontend import frontend
from ..samplers import LAWS, sample_partners, sample_weights

# PartialFace drops the channels that carry most of the energy; on faces these are the 10 lowest
# frequencies of each colour: (u, v) in {(0,0),(0,1),(0,2),(0,3),(1,0),(1,1),(1,2),(2,0),(2,1),(3,0)}.
PARTIALFACE_DROP = (0, 1, 2, 3, 8, 9, 10, 16, 17, 24)
KEEP_PRESETS = ("all", "no_dc", "partialface")


def keep_ids(preset, channels: int) -> list[int] | None:
    """Channel ids kept by a preset ("all", "no_dc", "partialface") or an explicit id list, for C colours."""
    c = channels
    if isinstance(preset, str):
        if preset == "all":
            return None
        drop = {0} if preset == "no_dc" else set(PARTIALFACE_DROP) if preset == "partialface" else None
        if drop is None:
            raise ValueError(f"keep must be one of {KEEP_PRESETS} or a list of channel ids, got {preset!r}")
        return [ch for ch in range(c * FREQS) if ch % FREQS not in drop]
    return [int(i) for i in preset]


class HybridMask(nn.Module):
    """Frequency-domain hybrid mask: each output mixes its image with k-1 partners in the block-DCT domain,
    keeps a channel subset and flips signs with a fresh one-time key.

    Args:
        k: partners per output (int >= 1), or the maximum k when forward gets a per-sample ``k`` tensor.
        law, upper, alpha: weight law (see :func:`fastmix.sample_weights`).
        keep: "all", "no_dc", "partialface" or explicit channel ids.
        sign_flip: draw a fresh seed per call and flip signs.
        upsample: None -> x is already an image on the DCT grid and :func:`fastmix.freq_mix` runs;
            an int -> x is a [-1, 1] face and the fused :func:`fastmix.frontend` runs (channels out).
        color: frontend colour transform ("ycbcr" or "none").
        out: "channels" or "pixels" (pixels needs upsample=None).
        generator: torch.Generator for partners, weights and seeds (reproducible runs).

    forward(x, labels, k=None) -> (masked, partner_labels (M, k), weights (M, k)), for the mixed-label
    loss  sum_t weights[m, t] * L(f(masked[m]), partner_labels[m, t]).
    """

    def __init__(
        self,
        k: int = 2,
        *,
        law: str = "instahide",
        upper: float = 0.65,
        alpha: float = 1.0,
        keep="no_dc",
        sign_flip: bool = True,
        upsample: int | None = 8,
        color: str = "ycbcr",
        out: str = "channels",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if law not in LAWS:
            raise ValueError(f"law must be one of {LAWS}, got {law!r}")
        if out not in ("channels", "pixels"):
            raise ValueError(f"out must be 'channels' or 'pixels', got {out!r}")
        if out == "pixels" and upsample is not None:
            raise ValueError("out='pixels' needs upsample=None (the frontend produces channels)")
        if isinstance(keep, str) and keep not in KEEP_PRESETS:
            raise ValueError(f"keep must be one of {KEEP_PRESETS} or a list of channel ids, got {keep!r}")
        self.k, self.law, self.upper, self.alpha = k, law, upper, alpha
        self.keep, self.sign_flip, self.upsample, self.color, self.out = keep, sign_flip, upsample, color, out
        self.generator = generator

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator).item())

    def forward(self, x: torch.Tensor, labels: torch.Tensor, k: torch.Tensor | None = None):
        n = x.shape[0]
        if labels.shape[:1] != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        gen = self.generator
        dev = x.device
        kmax, active = self.k, None
        if k is not None:
            if not isinstance(k, torch.Tensor) or k.shape != (n,) or k.dtype.is_floating_point:
                raise ValueError(f"k must be an integer tensor of shape ({n},)")
            if n and (int(k.min()) < 1 or int(k.max()) > self.k):
                raise ValueError(f"k values must be in [1, {self.k}] (the module's k is the maximum)")
            active = k
        # Samplers run on the generator's device; results move to x's device.
        index = sample_partners(n, kmax, generator=gen).to(dev)
        weight = sample_weights(n, kmax, self.law, self.upper, self.alpha, generator=gen, active=active).to(dev)
        seed = self._draw_seed() if self.sign_flip else None
        c = x.shape[1] if x.dim() == 4 else 1
        ids = keep_ids(self.keep, c)
        if self.upsample is None:
            masked = freq_mix(x, index, weight.to(x.dtype), keep=ids, seed=seed, out=self.out)
        else:
            masked = frontend(x, upsample=self.upsample, color=self.color, keep=ids, index=index, weight=weight, seed=seed)
        return masked, labels[index], weight

    def extra_repr(self) -> str:
        keep = self.keep if isinstance(self.keep, str) else f"{len(self.keep)} ids"
        src = "freq_mix" if self.upsample is None else f"frontend(upsample={self.upsample}, color={self.color})"
        return (
            f"k={self.k}, law={self.law}, upper={self.upper}, keep={keep}, sign_flip={self.sign_flip}, "
            f"op={src}, out={self.out}"
        )
