"""Partner and weight samplers for k-way mixing, vectorised on the batch's device.

Both take a torch.Generator so that a training run is reproducible; neither loops in Python per sample.
"""
from __future__ import annotations

import math

import torch

LAWS = ("instahide", "dirichlet")
MAX_REDRAWS = 10_000


def _check_nk(n, k):
    for v, name in ((n, "n"), (k, "k")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def check_generator(generator, name: str = "generator") -> None:
    """None or a torch.Generator; anything else (a seed int, a string) raises TypeError naming the argument
    (it used to surface as an AttributeError on .device deep inside a sampler)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be None or a torch.Generator, got {type(generator).__name__}"
                        " (for a seed s, pass torch.Generator().manual_seed(s))")


def _device(generator, device):
    check_generator(generator)
    if device is not None:
        dev = torch.device(device)
        if generator is not None and generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device} but device is {dev}")
        return dev
    return generator.device if generator is not None else torch.device("cpu")


def sample_partners(n: int, k: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, k) int64 partner index, InstaHide style: column 0 is arange(n) (each image is its own first
    partner), columns 1..k-1 are independent uniformly random permutations of 0..n-1.

    Example: ``idx = sample_partners(512, 4, generator=g)``; ``idx[:, 0] == arange(512)``.
    """
    _check_nk(n, k)
    dev = _device(generator, device)
    first = torch.arange(n, device=dev).view(n, 1)
    if k == 1:
        return first
    # argsort of iid uniforms is a uniform permutation; one call draws all k-1 of them.
    perms = torch.rand(k - 1, n, generator=generator, device=dev).argsort(dim=1)
    return torch.cat([first, perms.t()], dim=1)


def sample_weights(
    n: int,
    k: int,
    law: str = "instahide",
    upper: float = 0.65,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, k) float32 mixing weights, each row summing to 1.

    law="instahide": |N(0, 1)| draws normalised to sum 1, rows redrawn (all offending rows at once) until
    every weight is <= ``upper`` (InstaHide's bound, so no single face dominates). law="dirichlet":
    Dirichlet(alpha) rows. ``active`` (n,) int, optional: row i uses only its first active[i] partners, the
    rest get weight exactly 0 (skipped by the kernels): how a per-sample k from a policy is padded.
    A row with a single active partner has weight 1 (the bound cannot apply).
    """
    _check_nk(n, k)
    if law not in LAWS:
        raise ValueError(f"law must be one of {LAWS}, got {law!r}")
    if not (isinstance(upper, (int, float)) and 0 < upper <= 1):
        raise ValueError(f"upper must be in (0, 1], got {upper!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < math.inf):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    dev = _device(generator, device)
    if active is None:
        act = torch.full((n,), k, dtype=torch.int64, device=dev)
    else:
        if not isinstance(active, torch.Tensor) or active.dtype.is_floating_point or active.shape != (n,):
            raise ValueError(f"active must be an integer tensor of shape ({n},)")
        act = active.to(device=dev, dtype=torch.int64)
        if n and (int(act.min()) < 1 or int(act.max()) > k):
            raise ValueError(f"active values must be in [1, {k}]")
    mask = torch.arange(k, device=dev).view(1, k) < act.view(n, 1)
    if law == "dirichlet":
        return _dirichlet(n, k, float(alpha), mask, generator, dev)
    multi = act[act >= 2]  # rows of one active partner have weight 1: the bound does not apply to them
    lowest = int(multi.min()) if multi.numel() else k
    if multi.numel() and upper * lowest <= 1:
        # At upper * k == 1 only the uniform row meets the bound, which a random draw hits with probability 0.
        raise ValueError(f"upper={upper} cannot hold with {lowest} partners: it needs upper * k > 1")
    w = torch.zeros(n, k, device=dev)
    todo = torch.arange(n, device=dev)
    for _ in range(MAX_REDRAWS):
        if todo.numel() == 0:
            return w
        d = torch.randn(todo.numel(), k, generator=generator, device=dev).abs() * mask[todo]
        d = d / d.sum(1, keepdim=True)
        w[todo] = d
        ok = (d <= upper).all(1) | (act[todo] == 1)
        todo = todo[~ok]
    raise RuntimeError(f"sample_weights: could not satisfy upper={upper} after {MAX_REDRAWS} redraws")


def _dirichlet(n: int, k: int, alpha: float, mask: torch.Tensor, generator, dev) -> torch.Tensor:
    """Dirichlet(alpha) rows over the active partners (mask), normalised in log space.

    torch.distributions has no generator argument: Gamma(a, 1) comes from torch._standard_gamma, which takes
    one. For alpha < 1 a float32 Gamma(alpha) draw often underflows (P(G < t) ~ t^alpha / Gamma(alpha + 1):
    about 35% below float32's smallest subnormal 1.4e-45 at alpha = 0.01), and normalising such rows
    directly made them exactly uniform (17.9% of rows at alpha = 0.01, k = 2; 84% at 1e-3) where the law is
    nearly one-hot. So the draw is taken in log space with the Marsaglia-Tsang boost
        G(alpha) = G(alpha + 1) * U^(1/alpha)  ->  log G = log G(alpha + 1) + log(U) / alpha,   U ~ U(0, 1]
    (G(alpha + 1) has shape >= 1: below 1e-300 with probability ~1e-300) in float64, and normalised with a softmax: the
    largest log draw is subtracted first, so the dominant partner keeps its weight. alpha >= 1 keeps the
    direct float32 draw (no underflow there), so seeded runs with those alphas are unchanged."""
    if alpha >= 1:
        g = torch._standard_gamma(torch.full((n, k), alpha, device=dev), generator=generator) * mask
        return g / g.sum(1, keepdim=True)
    boosted = torch._standard_gamma(torch.full((n, k), alpha + 1.0, dtype=torch.float64, device=dev), generator=generator)
    u = 1.0 - torch.rand((n, k), dtype=torch.float64, generator=generator, device=dev)  # (0, 1]: log(u) finite
    logg = boosted.log() + u.log() / alpha
    logg = logg.masked_fill(~mask, -math.inf)  # padded partners: weight exactly 0
    return torch.softmax(logg, dim=1).to(torch.float32)
