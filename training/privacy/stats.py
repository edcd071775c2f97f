"""Statistics of the privacy report: one per-victim success measure for every attack, and bootstrap 95%
intervals over seeds x victims.

Every attack yields, per seed, a vector of per-victim successes in [0, 1] (the share of that victim's
attacked faces the judge identifies at rank 1; 0/1 for one model-inversion image per identity). A leak is the
chance-normalised mean success, ``(mean - 1/V) / (1 - 1/V)`` clipped to [0, 1]. Intervals come from the
two-level (hierarchical) bootstrap: resample the seeds with replacement, then within each drawn seed the
victims with replacement; differences between defences (the claim's margin) resample the *same* victims for
every defence of a seed (paired), so the shared victim difficulty cancels.
"""
from __future__ import annotations

import math

import numpy as np

DRAWS = 2000  # bootstrap resamples: the 95% interval's ends move by < 0.005 between reruns at this count (measured)


def leak_of(success_mean: float, victims: int) -> float:
    """Chance-normalised identity leak of a mean per-victim success rate (chance = 1 / victims)."""
    c = 1.0 / victims
    if not math.isfinite(success_mean):
        return float("nan")
    return float(min(1.0, max(0.0, (success_mean - c) / (1.0 - c))))


def _draws(per_seed: list[np.ndarray], rng: np.random.Generator, draws: int):
    """(draws, S) seed picks and, per draw and picked seed, victim picks: the hierarchical resample plan."""
    s = len(per_seed)
    seeds = rng.integers(0, s, size=(draws, s))
    vics = [rng.integers(0, len(per_seed[0]), size=(draws, len(per_seed[0]))) for _ in range(s)]
    return seeds, vics


def bootstrap(per_seed: list, victims: int | None = None, *, draws: int = DRAWS, seed: int = 0, fn=None) -> dict:
    """Mean and 95% interval of a statistic of per-seed per-victim successes.

    per_seed: list over seeds of (V,) arrays (the same victims order within a seed). fn: maps the mean success
    to the reported number (default: the leak when ``victims`` is given, else the mean itself).
    Returns {"mean", "lo", "hi", "half_width", "seeds", "victims"}."""
    arr = [np.asarray(p, dtype=np.float64) for p in per_seed if p is not None]
    if not arr:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "half_width": float("nan"), "seeds": 0, "victims": 0}
    f = fn or ((lambda m: leak_of(m, victims)) if victims else (lambda m: m))
    point = f(float(np.mean([a.mean() for a in arr])))
    rng = np.random.default_rng(seed)
    seeds, vics = _draws(arr, rng, draws)
    vals = np.empty(draws)
    for d in range(draws):
        vals[d] = f(float(np.mean([arr[s][vics[j][d] % len(arr[s])].mean() for j, s in enumerate(seeds[d])])))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "half_width": float((hi - lo) / 2), "seeds": len(arr),
            "victims": int(np.mean([len(a) for a in arr]))}


def paired_bootstrap(per_seed: dict, stat, *, draws: int = DRAWS, seed: int = 0) -> dict:
    """Interval of a statistic of several defences' per-victim arrays, resampling the same victims for
    every defence within a seed (paired). per_seed: {name: [(V,) per seed]} (the same seeds and victims for
    every name); stat: maps {name: mean success over the resample} to a number (or None: undefined there).
    Returns {"mean", "lo", "hi", "half_width", "share_positive"} (share of resamples with stat > 0)."""
    names = list(per_seed)
    arr = {n: [np.asarray(p, dtype=np.float64) for p in per_seed[n]] for n in names}
    s = len(arr[names[0]])
    point = stat({n: float(np.mean([a.mean() for a in arr[n]])) for n in names})
    rng = np.random.default_rng(seed)
    seeds, vics = _draws(arr[names[0]], rng, draws)
    vals = []
    for d in range(draws):
        means = {n: float(np.mean([arr[n][sd][vics[j][d] % len(arr[n][sd])].mean() for j, sd in enumerate(seeds[d])]))
                 for n in names}
        v = stat(means)
        if v is not None and math.isfinite(v):
            vals.append(v)
    if not vals or point is None:
        return {"mean": float("nan") if point is None else point, "lo": float("nan"), "hi": float("nan"),
                "half_width": float("nan"), "share_positive": float("nan"), "seeds": s}
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi), "half_width": float((hi - lo) / 2),
            "share_positive": float(np.mean(np.asarray(vals) > 0)), "seeds": s, "defined_draws": len(vals)}


def seeds_needed(half_width: float, seeds: int, target: float = 0.02) -> int:
    """Seeds for an interval half-width of ``target`` if it shrinks as 1/sqrt(seeds) (victims fixed per seed)."""
    if not math.isfinite(half_width) or half_width <= target:
        return seeds
    return int(math.ceil(seeds * (half_width / target) ** 2))


def paired_means(per_seed: dict, *, draws: int = DRAWS, seed: int = 0) -> tuple[dict, dict]:
    """Every name's mean success, at the point and in each resample of one hierarchical plan (``_draws``, as
    ``paired_bootstrap`` draws it for the same ``seed``) shared by all names: the same seeds and, within each
    drawn seed, the same victims for every name (paired). per_seed: {name: [(V,) per seed]}.
    Returns ({name: point mean}, {name: (draws,) resampled means}); vectorised, so one plan serves many statistics."""
    names = list(per_seed)
    arr = {n: [np.asarray(p, dtype=np.float64) for p in per_seed[n]] for n in names}
    s = len(arr[names[0]])
    point = {n: float(np.mean([a.mean() for a in arr[n]])) for n in names}
    seeds, vics = _draws(arr[names[0]], np.random.default_rng(seed), draws)
    boot = {}
    for n in names:
        tot = np.zeros(draws)
        for j in range(s):  # position j of the drawn seeds: its seed per draw, and its victims per draw
            for sd in range(s):
                rows = np.flatnonzero(seeds[:, j] == sd)
                if len(rows):
                    a = arr[n][sd]
                    tot[rows] += a[vics[j][rows] % len(a)].mean(axis=1)
        boot[n] = tot / s
    return point, boot


def equivalence(point: float, resampled, seeds: int, margin: float = 0.05) -> dict:
    """Verdict on a paired difference (its point value and resampled values) at ``margin``: "agree" when its
    95% interval lies inside [-margin, +margin] (an equivalence test), "differ" when the interval excludes 0 and
    the point's magnitude exceeds the margin, else "unresolved", with the seeds that would decide it if the
    interval shrinks as 1/sqrt(seeds) around the same point (``seeds_needed`` for the width on each side that
    would put it inside the margin, or off 0; None where no width decides: a point at the margin exactly).
    Returns {"mean", "lo", "hi", "half_width", "verdict", "seeds", "seeds_needed"}."""
    vals = np.asarray(resampled, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if not vals.size or not math.isfinite(point):
        return {"mean": float(point), "lo": float("nan"), "hi": float("nan"), "half_width": float("nan"),
                "verdict": "not measured", "seeds": seeds, "seeds_needed": None}
    lo, hi = (float(x) for x in np.percentile(vals, [2.5, 97.5]))
    hw = (hi - lo) / 2
    need = None
    if -margin <= lo and hi <= margin:
        verdict = "agree"
    elif (lo > 0 or hi < 0) and abs(point) > margin:
        verdict = "differ"
    else:
        verdict = "unresolved"
        # each end moves to point + sqrt(seeds / n) * (end - point): the n that puts both ends inside the
        # margin (|point| < margin) or the end nearer 0 past it (|point| > margin)
        if abs(point) < margin:
            sides = [(hi - point, margin - point), (point - lo, margin + point)]
        elif abs(point) > margin:
            sides = [(point - lo, point) if point > 0 else (hi - point, -point)]
        else:
            sides = []
        need = max(seeds + 1, *(seeds_needed(e, seeds, t) for e, t in sides)) if sides else None
    return {"mean": float(point), "lo": lo, "hi": hi, "half_width": float(hw), "verdict": verdict, "seeds": seeds,
            "seeds_needed": need}
