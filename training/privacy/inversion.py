"""Calibrated model inversion of the defended FR model: S3 (white-box) and S4 (black-box) over a face prior.

Threat model (THREAT_MODEL.md, S3 / S4). The attacker wants, for every victim identity t of the deployed
closed-set FR model, an image that shows person t. It holds faces of *other* people (``split.attacker``, and
public web photos of further people: ``public_faces``, LFW people who are neither victims nor in the judge's
pool; identity-disjoint from the victims, it never sees a victim face) and
- S3, white-box: the deployed model's weights (the defence's test-time encoding through fastmix's
  differentiable front-end -> backbone -> normalised head), so gradients of any output w.r.t. the image;
- S4, black-box: score queries only (``DefendedModel.scores``: the softmax vector of an image); the number
  of queries is counted and reported.

The attacks follow the generative-prior model-inversion line, scaled to a CPU:
- MI-Face (Fredrikson, Jha, Ristenpart, CCS 2015): gradient ascent on the target's confidence. Done in pixel
  space (``attacks.invert_white_box``) it finds adversarial patterns: on the undefended ORL model the target
  model classified 100% of its inversions as the target while the independent judge recognised 10-20% (chance 5%).
- GMI (Zhang et al., "The Secret Revealer", CVPR 2020): search the latent space of a generative face prior
  trained on public faces of other people, so that the result stays a face. Our priors (``prior.py``:
  ``PCAPrior`` eigenfaces, ``VAEPrior`` a small convolutional VAE, GMI's generator at CPU size) are fitted on
  the attacker's faces (``attack_prior``: its own + the public ones, the same faces for both) and cached on
  disk (``face_prior``); ``DEFAULT_PRIOR`` is the one S3 / S4 search unless told otherwise.
- Plug & Play Attacks (PPA; Struppek et al., ICML 2022): a non-saturating identity loss (the Poincare loss;
  here also the target's cosine, which does not saturate under the CosFace / ArcFace scale as CE does),
  random augmentations of the candidate during the search (so it must hold for shifted / mirrored
  versions: less adversarial), many candidates per identity started from the prior samples the target
  likes best, and the final choice by the target's confidence under augmentations; here the mean latent of
  the few best candidates (what they share is the identity, what they do not is each one's adversarial quirk).
- S4 replaces the gradient by natural-evolution-strategies estimates (Wierstra et al., JMLR 2014; Ilyas et
  al., ICML 2018) from score queries, over the same prior and candidates.

Shapes: images (N, C, S, S) float in [-1, 1] (56x56 grey here); latents (N, D); targets (T,) int64 class ids.
Every inversion returns one image per target plus what the attack itself knows of it (``Inversion``); the
judge's verdict is a separate step (``judge_inversions``) so any judge with ``embed(x) -> (N, E)`` plugs in.
``calibrate`` (``python -m training.privacy.inversion orl 0,1,2,3,4 out.json``) measures S3 / S4 on the
undefended targets beside two trivial baselines, with the target's own top-1 (adversarial collapse: the
target is sure, the judge is not).

What limits S3 (measured, ORL seed 0, PCA prior): inverting the *judge itself* through the same prior reaches
judge top-1 1.00, so the prior can express every victim; inverting the target reaches the target's own top-1
1.00 but judge top-1 0.15-0.50 per ORL seed, and the judge's faces of a victim get only 0.50 from the target. The gap
is what the small target and the judge see differently (its features on 6 faces per victim), not the prior.

What does not close the gap (2026-12-06; ORL seeds 0-4, undefended targets, cnn2 judge, mean judge top-1 / top-5;
per-seed numbers in results/inversion/orl_s3_variants.json; 20 victims a seed, so 0.05 is one victim a seed and
differences under ~0.07 are noise). The default S3 (PCA 160, 40 steps, 16 candidates, mean of the 4 best):
0.42 / 0.82. Budget: 0 / 10 / 20 / 40 / 120 steps 0.16 / 0.35 / 0.39 / 0.42 / 0.33 (more steps push the target's
cosine past its real faces', 0.90 against a median 0.70 on victim test faces, and lose the judge); 64 candidates,
mean of 8 (4x cost) 0.40; mean of all 16 0.38; 16 selection views 0.40; lr 0.03 0.37. Regularisers and views:
Gaussian log-prior penalty 0.5 0.40; 80 eigenfaces 0.37; zoom + contrast 0.15 0.39 / 0.84; pixel noise 0.15
0.40; random blur 0.37; capping the cosine at 0.6 0.29. Initialisation from 2,800 encoded public faces 0.41.
Poincare loss 0.46 / 0.75. LOMMA's model augmentation (``distill_students``: 2 students, 300 steps, ~50 s)
0.42 / 0.77 (loss only: 0.40). The attacker's own LBP-LDA recogniser re-ranking the candidates (``aux``)
0.47 / 0.76 at weight 1, 0.36 / 0.79 at 10. The mean image of all twelve variants' inversions 0.43 / 0.84.
VAE prior 0.43 / 0.88 (S4 beats it on seeds 1 and 2), with ``aux`` 0.43 / 0.87, with 2 students 0.38 / 0.85. Per victim, the judge's hit
rate over the twelve PCA variants is spread over 0-1 (many victims hit by some variants only): the target
pins the identity loosely, and nothing the attacker can measure without a victim face tells the hits apart.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.data import to_float

# The priors live in prior.py (fitting and caching apart from the search); re-exported for the callers of before.
from .prior import (DEFAULT_PRIOR, PCA_DIMS, PRIORS, VAE_STEPS, PCAPrior, VAEPrior, attack_prior,  # noqa: F401
                    face_prior, public_faces)
LOSSES = ("cosine", "poincare")

# Budgets (per defence, one set and seed, 20-40 identities, 1 CPU thread). "full" is the calibrated attack;
# "smoke" only exercises the code. S3's judge top-1 is flat after 20 steps (8 restarts, PCA 160 on the public
# faces, lfw_all judge: ORL seeds 0-2 mean 0.22 / 0.43 / 0.38 at 10 / 20 / 40 steps, seeds 0-1 0.43 / 0.38 at
# 100 / 150), so the budget goes to 16 restarts rather than more steps.
BUDGETS = {
    "full": {"wb_steps": 40, "wb_candidates": 16, "wb_lr": 0.1, "bb_iters": 40, "bb_pop": 16, "bb_candidates": 2,
             "bb_sigma": 0.3, "bb_lr": 0.1, "init_pool": 128, "vae_steps": VAE_STEPS},
    "smoke": {"wb_steps": 3, "wb_candidates": 2, "wb_lr": 0.1, "bb_iters": 2, "bb_pop": 4, "bb_candidates": 2,
              "bb_sigma": 0.3, "bb_lr": 0.1, "init_pool": 4, "vae_steps": 5},
}


def budget_of(budget: str | dict) -> dict:
    """A budget by name ("full" / "smoke") or a dict overriding "full"'s entries; unknown keys are refused."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {tuple(BUDGETS)} or a dict, got {budget!r}")
        return dict(BUDGETS[budget])
    bad = set(budget) - set(BUDGETS["full"])
    if bad:
        raise ValueError(f"unknown budget keys {sorted(bad)}; known: {sorted(BUDGETS['full'])}")
    return {**BUDGETS["full"], **budget}


# ----------------------------------------------------------------------------------------------------
# Identity objectives (non-saturating) and augmentations
# ----------------------------------------------------------------------------------------------------


def target_cosine(model, x: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) -> (N, classes) cosines of the model's normalised embedding with its class weights
    (logits / s for ``DefendedModel``). Differentiable in x."""
    return model(x) / model.head.s


def identity_loss(model, x: torch.Tensor, targets: torch.Tensor, loss: str = "cosine") -> torch.Tensor:
    """(N,) loss, lower = more the target. "cosine": -cos(emb, W_t) (bounded: it keeps pulling towards the
    identity's direction where CE under s = 30-64 has already saturated). "poincare": PPA's Poincare
    distance between the L1-normalised logits and the (0.9999-smoothed) one-hot target."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    cos = target_cosine(model, x)
    if loss == "cosine":
        return -cos.gather(1, targets.view(-1, 1)).squeeze(1)
    u = cos / cos.abs().sum(1, keepdim=True)  # ||u||_1 = 1 so ||u||_2 < 1: inside the Poincare ball
    v = F.one_hot(targets, cos.shape[1]).float().clamp(max=0.9999)  # PPA's smoothing keeps ||v|| < 1
    d = (u - v).pow(2).sum(1)
    return torch.acosh(1 + 2 * d / ((1 - u.pow(2).sum(1)) * (1 - v.pow(2).sum(1))))


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 3, scale: float = 0.05, rotate: float = 5.0,
            contrast: float = 0.0, zoom: float = 0.0, noise: float = 0.0, blur: float = 0.0) -> torch.Tensor:
    """PPA's augmented views, per image of (N, C, S, S): random horizontal flip and a random similarity
    transform (translation +-``shift`` pixels, scale 1 +- ``scale``, rotation +-``rotate`` degrees; borders
    replicated). A candidate that only fools the model at one exact placement is an adversarial pattern, not
    a face: optimising and selecting over such views keeps what survives them (measured on ORL seed 0, S3
    over 40 eigenfaces: judge top-1 0.25 without augmentation, 0.50 with flips and shifts)."""
    n, s = x.shape[0], x.shape[-1]
    x = torch.where((torch.rand(n, generator=generator) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    if shift <= 0 and scale <= 0 and rotate <= 0:
        return x
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    a = u[:, 0] * math.radians(rotate)
    c = 1 + u[:, 1] * scale
    if zoom > 0:  # PPA's random resized crop: zoom into the inner face by 1 .. 1 + zoom
        c = c + zoom * torch.rand(n, generator=generator)
    t = u[:, 2:] * (2 * shift / s)  # affine_grid works in [-1, 1] coordinates
    theta = torch.stack([torch.stack([a.cos() / c, -a.sin() / c, t[:, 0]], 1),
                         torch.stack([a.sin() / c, a.cos() / c, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if contrast > 0:  # contrast 1 +- c and brightness +- c: identity does not live in the exposure
        u = torch.rand(n, 2, 1, 1, 1, generator=generator) * 2 - 1
        x = (x * (1 + contrast * u[:, 0]) + contrast * u[:, 1]).clamp(-1, 1)
    if blur > 0:  # a random Gaussian blur of sd 0 .. blur pixels (per image): fine patterns do not survive it
        sd = (blur * torch.rand(n, generator=generator)).clamp_min(1e-3)
        r = torch.arange(-3, 4, dtype=x.dtype)
        k = torch.exp(-r.view(1, -1) ** 2 / (2 * sd.view(-1, 1) ** 2))
        k = k / k.sum(1, keepdim=True)  # (n, 7)
        c = x.shape[1]
        xb = F.pad(x.reshape(1, n * c, s, s), (3, 3, 3, 3), mode="replicate")
        kk = k.repeat_interleave(c, 0)
        xb = F.conv2d(xb, kk.view(n * c, 1, 1, 7), groups=n * c)
        x = F.conv2d(xb, kk.view(n * c, 1, 7, 1), groups=n * c).view(n, c, s, s)
    if noise > 0:  # Gaussian pixel noise of sd ``noise`` (randomised smoothing's view)
        x = x + noise * torch.randn(x.shape, generator=generator)
    return x


# ----------------------------------------------------------------------------------------------------
# Model augmentation (LOMMA; Nguyen et al., "Re-thinking Model Inversion Attacks Against Deep Neural Networks",
# CVPR 2023): attacker-side students distilled from the target on public faces only
# ----------------------------------------------------------------------------------------------------


class _Head:
    def __init__(self, s: float):
        self.s = float(s)


class Student(nn.Module):
    """An attacker-side surrogate of the target: a small plain CNN (another architecture than the target's
    IResNet) -> ``embedding`` -> cosine head over the target's classes, scaled by the target's s, so
    ``student(x)`` are logits like ``DefendedModel``'s (``target_cosine`` and ``identity_loss`` take it).
    Trained by ``distill_students`` on public faces to reproduce the target's cosines; it never sees a victim."""

    def __init__(self, classes: int, s: float, width: int = 16, embedding: int = 64, channels: int = 1):
        super().__init__()
        w = int(width)

        def cbr(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*cbr(channels, w, 2), *cbr(w, 2 * w, 2), *cbr(2 * w, 2 * w, 1), *cbr(2 * w, 4 * w, 2),
                                 *cbr(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * w, embedding))
        self.weight = nn.Parameter(torch.randn(classes, embedding) * 0.1)
        self.head = _Head(s)
        self.queries = 0

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.net(x)), F.normalize(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.s * self.cosine(x)

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), 1)


def distill_students(model, faces_u8: torch.Tensor, n: int = 2, steps: int = 300, batch: int = 64, lr: float = 3e-3,
                     width: int = 16, seed: int = 0, log=None) -> list:
    """LOMMA's model augmentation at CPU size: ``n`` ``Student`` s (widths ``width`` x 1, 1.5, ...; seeds apart)
    fitted to the target's cosines on augmented public faces (``faces_u8`` (N, C, S, S) uint8: the attacker's
    own and public faces, never a victim): MSE between the student's and the target's cosine vectors (logit
    matching), ``steps`` Adam steps of ``batch`` with a cosine-decayed rate, the target's cosines of each batch
    computed on the fly (white-box: the attacker runs the model freely, uncounted as S3 queries; no victim data).
    Inverting the target together with the students keeps what they share (the identity the target learned)
    and averages out what only the target's exact weights respond to (LOMMA's "MI overfitting")."""
    x_all = to_float(faces_u8)
    g = torch.Generator().manual_seed(10_000 + seed)
    classes = int(model.head.weight.shape[0]) if hasattr(model.head, "weight") else None
    with torch.no_grad():
        classes = classes or int(model(x_all[:1]).shape[1])
    out = []
    for i in range(int(n)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100 + i)
            st = Student(classes, model.head.s, width=int(round(width * (1 + 0.5 * i))), channels=x_all.shape[1])
        opt = torch.optim.Adam(st.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
        st.train()
        t0 = time.time()
        for k in range(int(steps)):
            xb = augment(x_all[torch.randint(len(x_all), (batch,), generator=g)], g, contrast=0.1)
            with torch.no_grad():
                q = getattr(model, "queries", None)
                tc = target_cosine(model, xb)
                if q is not None:
                    model.queries = q
            loss = F.mse_loss(st.cosine(xb), tc) * classes
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        st.eval()
        for p in st.parameters():
            p.requires_grad_(False)
        st.info = {"steps": steps, "final_mse": float(loss.detach()) / classes, "fit_s": round(time.time() - t0, 1)}
        if log is not None:
            log(f"    student {i} distilled: cosine mse {st.info['final_mse']:.4f} in {st.info['fit_s']} s")
        out.append(st)
    return out


def attacker_face_model(faces_u8: torch.Tensor, labels: torch.Tensor, pca: int = 300):
    """The attacker's own face recogniser: LBP + PCA + Fisher LDA (``judge.train_lda``, the recipe of the
    ``lda`` judge kind) fitted on its own and the public faces with their person labels (``public_faces(...,
    labels=True)``: no victim, nobody of the judge's pool). Returns ``embed(x) -> (N, E)`` normalised, for
    ``invert_white_box(..., aux=)``: an independent view of who a candidate shows. Seconds on one thread."""
    from .judge import train_lda

    return train_lda(faces_u8, labels, pca)


@torch.no_grad()
def _aux_scores(aux, x: torch.Tensor, t: int, k: int, generator: torch.Generator, views: int = 2) -> torch.Tensor:
    """(T * K,) distinctiveness of each candidate in the attacker's own face model: cosine to its target's
    centroid (the normalised mean embedding of that target's K candidates) minus the best cosine to another
    target's centroid. What a target's candidates agree on in an independent recogniser, and what sets them
    apart from the other targets' candidates, is the identity; a candidate that looks like another target's
    (a "hub") or like nobody scores low."""
    e = sum(F.normalize(aux(augment(x, generator, scale=0.0, rotate=0.0, shift=1)).float(), dim=1) for _ in range(views))
    e = F.normalize(e, dim=1)
    c = F.normalize(e.view(t, k, -1).mean(1), dim=1)  # (T, E)
    sim = e @ c.t()  # (TK, T)
    own_t = torch.arange(t).repeat_interleave(k)
    own = sim.gather(1, own_t.view(-1, 1)).squeeze(1)
    other = sim.scatter(1, own_t.view(-1, 1), float("-inf")).max(1).values if t > 1 else torch.zeros_like(own)
    return own - other


# ----------------------------------------------------------------------------------------------------
# S3 / S4
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inversion:
    """One inverted image per target and what the attacker itself measured.

    images (T, C, S, S) [-1, 1]; latents (T, D); confidence (T,) the target model's mean probability of the
    target over the selection's augmented views; queries: model evaluations the attack used (images; for S4
    the score queries), wall_s: seconds; curve: mean target cosine of the kept candidates over the search."""

    images: torch.Tensor
    latents: torch.Tensor
    targets: torch.Tensor
    confidence: torch.Tensor
    queries: int
    wall_s: float
    curve: list = field(default_factory=list)


def _check(model, targets, prior):
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.dim() != 1 or targets.numel() == 0:
        raise ValueError("targets must be a non-empty 1-D int64 tensor of class ids")
    if not hasattr(prior, "decode") or not hasattr(prior, "dims"):
        raise TypeError(f"prior must be a face prior (PCAPrior / VAEPrior from face_prior), got {type(prior).__name__}")


@torch.no_grad()
def _initial_latents(score_fn, prior, targets: torch.Tensor, k: int, pool: int, generator: torch.Generator,
                     pool_latents: torch.Tensor | None = None) -> torch.Tensor:
    """PPA's initial selection: draw ``pool`` latents from the prior's N(0, I), score them once for every
    target with ``score_fn`` ((N, C, S, S) -> (N, classes) target-model scores) and start each target's k
    candidates from the pool's k best for it. Returns (T, k, D)."""
    if pool < k:
        raise ValueError(f"init_pool ({pool}) must be at least the number of candidates ({k})")
    z = torch.randn(pool, prior.dims, generator=generator).clamp(-prior.bound, prior.bound)
    if pool_latents is not None:
        z = torch.cat([pool_latents.clamp(-prior.bound, prior.bound), z])
    sc = score_fn(prior.decode(z))  # (pool, classes): one batch of queries serves every target
    best = sc[:, targets].t().topk(k, 1).indices  # (T, k)
    return z[best]


def log_margin(p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log p_t - max_{j != t} log p_j of score vectors p (N, classes): s * (cos_t - cos_j) for a normalised
    head, so unlike p_t it does not saturate at 1 once the target wins (s = 30-64 puts p_t at 1.0 in float32
    while the candidate can still move further into the identity). Needs only the scores (S4)."""
    lp = torch.log(p.clamp_min(1e-30))
    own = lp.gather(1, targets.view(-1, 1)).squeeze(1)
    other = lp.scatter(1, targets.view(-1, 1), float("-inf")).max(1).values
    return own - other


@torch.no_grad()
def _select(model, prior, z: torch.Tensor, targets: torch.Tensor, views: int, generator: torch.Generator, black_box: bool,
            average: int = 1, others=(), aux=None, aux_weight: float = 1.0):
    """PPA's final selection: keep the candidate the target model is most sure of over ``views`` augmented views,
    by the mean log margin (``log_margin``; PPA's mean probability saturates at 1 under a scaled cosine head).
    z (T, K, D) -> (images (T, C, S, S), latents (T, D), confidence (T,) mean p_t of the kept one, queries used)."""
    t, k, d = z.shape
    x = prior.decode(z.reshape(t * k, d))
    conf, margin = torch.zeros(t * k), torch.zeros(t * k)
    tk = targets.repeat_interleave(k)
    for _ in range(views):
        p = model.scores(augment(x, generator)) if black_box else torch.softmax(model(augment(x, generator)), 1)
        conf += p.gather(1, tk.view(-1, 1)).squeeze(1) / views
        margin += log_margin(p, tk) / views
        for o in others:  # attacker-side students (white-box only): the candidate must convince them too
            xa = augment(x, generator)
            margin += log_margin(torch.softmax(o(xa), 1), tk) / views
    rows = torch.arange(t)
    if aux is not None:  # rank by the attacker's own recogniser's distinctiveness (z-scored per target), plus the margin's
        a = _aux_scores(aux, x, t, k, generator).view(t, k)
        mm = margin.view(t, k)
        zs = lambda v: (v - v.mean(1, keepdim=True)) / (v.std(1, keepdim=True) + 1e-8)  # noqa: E731
        margin = (aux_weight * zs(a) + zs(mm)).view(-1) if k > 1 else margin
    if average > 1:  # the mean latent of the ``average`` best candidates (identity they share, quirks they do not)
        top = margin.view(t, k).topk(min(average, k), 1).indices
        zb = z[rows.view(-1, 1), top].mean(1)
        return prior.decode(zb), zb, conf.view(t, k)[rows.view(-1, 1), top].mean(1), t * k * views
    best = margin.view(t, k).argmax(1)
    zb = z[rows, best]
    return prior.decode(zb), zb, conf.view(t, k)[rows, best], t * k * views


def invert_white_box(model, targets: torch.Tensor, prior, *, steps: int = 60, candidates: int = 8, lr: float = 0.1,
                     loss: str = "cosine", init_pool: int = 64, views: int = 4, augmented: bool = True, shift: int = 3, average: int = 4, seed: int = 0,
                     scale: float = 0.05, rotate: float = 5.0, contrast: float = 0.0, zoom: float = 0.0, penalty: float = 0.0,
                     pool_latents: torch.Tensor | None = None, students=(), student_weight: float = 1.0,
                     select_students: bool = True, select_views: int | None = None, noise: float = 0.0, blur: float = 0.0,
                     cap: float | None = None, aux=None, aux_weight: float = 1.0, **_) -> Inversion:
    """S3, white-box: GMI / PPA latent search with gradients through the whole deployed model.

    model: ``attacks.DefendedModel`` (defence test-time encoding via fastmix -> backbone -> head; needs
    ``model(x)`` logits (N, classes) differentiable in x, ``model.head.s`` and ``model.scores``).
    For each target t: ``candidates`` latents started from the best of ``init_pool`` prior samples, Adam on
    identity_loss(model, augment(prior.decode(z)), t) for ``steps`` steps, z clamped to the prior's bound;
    the kept image is the mean latent of the ``average`` candidates of highest target confidence over ``views``
    augmented views (1: the best one; 4 measured on ORL seeds 0-4, lfw_all judge, 16 restarts: top-1 0.36 / 0.41
    / 0.40 / 0.42 / 0.41 for 1 / 2 / 4 / 8 / 16). ``scale`` / ``rotate`` / ``contrast`` / ``zoom``: the
    augmentation's ranges (``augment``); ``penalty``: weight of the mean squared latent (a Mahalanobis pull to
    the prior's mode; 0.05 measured no better than 0 on ORL); ``pool_latents`` (P, D): latents added to the
    initial pool (e.g. ``prior.encode`` of the public faces).
    Options measured without gain (``noise`` / ``blur``: ``augment``'s pixel noise and random blur in the
    views; ``cap``: stop pushing a view once its target cosine exceeds it; ``students``: LOMMA's model
    augmentation, ``distill_students``' surrogates added to the loss with ``student_weight`` and, with
    ``select_students``, to the selection's margin; ``aux``: the attacker's own recogniser
    (``attacker_face_model``) re-ranks the candidates by distinctiveness, ``_aux_scores``, z-scored and added
    to the target's z-scored margin with ``aux_weight``; ``select_views``: views of the final selection): see
    the module docstring's table.
    Returns an ``Inversion`` (images (T, C, S, S))."""
    _check(model, targets, prior)
    t0, q0 = time.time(), getattr(model, "queries", 0)
    g = torch.Generator().manual_seed(seed)
    for p in list(model.parameters()) + list(prior.parameters()):
        p.requires_grad_(False)
    t, k = targets.numel(), int(candidates)
    z = _initial_latents(lambda x: torch.softmax(model(x), 1), prior, targets, k, init_pool, g, pool_latents)
    z = z.reshape(t * k, prior.dims).clone().requires_grad_(True)
    tk = targets.repeat_interleave(k)
    opt = torch.optim.Adam([z], lr=lr)
    curve = []
    for _ in range(steps):
        x = prior.decode(z)
        x = augment(x, g, shift, scale, rotate, contrast, zoom, noise, blur) if augmented else x
        li = identity_loss(model, x, tk, loss)
        total = li.sum() if cap is None else li.clamp_min(-cap).sum()
        for st in students:
            total = total + student_weight * identity_loss(st, x, tk, loss).sum()
        opt.zero_grad(set_to_none=True)
        (total + penalty * z.pow(2).mean(1).sum()).backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(-prior.bound, prior.bound)
        curve.append(float(-li.detach().mean()) if loss == "cosine" else float(li.detach().mean()))
    images, zb, conf, _ = _select(model, prior, z.detach().view(t, k, -1), targets, select_views or views, g, black_box=False,
                                  average=average, others=tuple(students) if select_students else (), aux=aux,
                                  aux_weight=aux_weight)
    return Inversion(images, zb, targets, conf, getattr(model, "queries", 0) - q0, time.time() - t0, curve)


@torch.no_grad()
def invert_black_box(model, targets: torch.Tensor, prior, *, iters: int = 40, pop: int = 16, candidates: int = 4,
                     sigma: float = 0.3, lr: float = 0.1, init_pool: int = 64, views: int = 4, augmented: bool = True,
                     shift: int = 3, average: int = 1, seed: int = 0, **_) -> Inversion:
    """S4, black-box: the same prior and candidates as S3, gradients replaced by NES estimates from score
    queries only (``model.scores``: (N, C, S, S) -> (N, classes) probabilities; nothing else is read).

    Per candidate and iteration: ``pop`` antithetic perturbations z + sigma * eps (each scored on one random
    augmented view), fitness standardised within the population, gradient estimate
    mean(f * eps) / sigma, fitness the log margin (``log_margin``: log p(t | x) saturates at 0), an Adam-style normalised step of size ``lr``, z clamped to the prior's bound.
    Queries = init_pool + T * candidates * (iters * pop + views) (counted by the model, returned).
    Returns an ``Inversion`` (images (T, C, S, S))."""
    _check(model, targets, prior)
    if pop < 2 or pop % 2:
        raise ValueError(f"pop must be an even number >= 2 (antithetic pairs), got {pop}")
    t0, q0 = time.time(), getattr(model, "queries", 0)
    g = torch.Generator().manual_seed(seed)
    t, k, d = targets.numel(), int(candidates), prior.dims
    z = _initial_latents(model.scores, prior, targets, k, init_pool, g).reshape(t * k, d)
    tk = targets.repeat_interleave(k)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    half = pop // 2
    curve = []
    for it in range(1, iters + 1):
        eps = torch.randn(t * k, half, d, generator=g)
        eps = torch.cat([eps, -eps], 1)  # (TK, pop, D)
        cand = (z.unsqueeze(1) + sigma * eps).clamp(-prior.bound, prior.bound).reshape(-1, d)
        x = prior.decode(cand)
        x = augment(x, g, shift) if augmented else x
        p = model.scores(x).view(t * k, pop, -1)
        f = log_margin(p.reshape(t * k * pop, -1), tk.repeat_interleave(pop)).view(t * k, pop)
        curve.append(float(f.mean()))
        f = (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-8)
        grad = (f.unsqueeze(2) * eps).mean(1) / sigma
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad.pow(2)
        z = (z + lr * (m / (1 - 0.9**it)) / ((v / (1 - 0.999**it)).sqrt() + 1e-8)).clamp(-prior.bound, prior.bound)
    images, zb, conf, _ = _select(model, prior, z.view(t, k, d), targets, views, g, black_box=True, average=average)
    return Inversion(images, zb, targets, conf, getattr(model, "queries", 0) - q0, time.time() - t0, curve)


# ----------------------------------------------------------------------------------------------------
# Verdicts: the target model's own, and an independent judge's
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def target_top1(model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the deployed model's own top-1 on the inversions (not counted as attack queries). High here
    with a low judge verdict = adversarial collapse (the image fools the target, it is not the person)."""
    q = getattr(model, "queries", None)
    pred = model(images).argmax(1)
    if q is not None:
        model.queries = q
    return pred == targets


@torch.no_grad()
def judge_inversions(judge, images: torch.Tensor, targets: torch.Tensor, enrolled: torch.Tensor,
                     enrolled_labels: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Per-identity verdicts of a judge on inverted images (T, C, S, S) for ``targets`` (T,).

    judge: any object with ``embed(x) -> (N, E)`` (normalised or not; normalised here). Victims are
    enrolled by templates: the mean normalised embedding of ``enrolled`` (M, C, S, S) [-1, 1] images per
    label of ``enrolled_labels`` (M,). Rank of an inversion = position of its target's template among all
    templates by cosine. If the judge also has ``logits(x) -> (N, classes)`` (a classifier judge), its
    classifier ranks are returned too.
    Returns (T,)-tensors: "top1", "top5" (bool, templates), "rank" (int, 1 = best), "cos" (cosine to the
    target template), "knn_dist" (L2 of normalised embeddings to the nearest enrolled image of the target,
    0..2), and with logits "cls_top1", "cls_top5"."""
    if images.shape[0] != targets.numel():
        raise ValueError(f"one image per target: {images.shape[0]} images, {targets.numel()} targets")
    e = F.normalize(judge.embed(images).float())
    ee = F.normalize(judge.embed(enrolled).float())
    classes = int(enrolled_labels.max()) + 1
    if int(targets.max()) >= classes:
        raise ValueError(f"target id {int(targets.max())} has no enrolled images (labels 0..{classes - 1})")
    tmpl = F.normalize(torch.zeros(classes, e.shape[1]).index_add_(0, enrolled_labels, ee))
    sim = e @ tmpl.t()  # (T, classes)
    own = sim.gather(1, targets.view(-1, 1))
    rank = 1 + (sim > own).sum(1)
    d = torch.cdist(e, ee)
    knn = torch.stack([d[i, enrolled_labels == c].min() for i, c in enumerate(targets.tolist())])
    out = {"top1": rank <= 1, "top5": rank <= k, "rank": rank, "cos": own.squeeze(1), "knn_dist": knn}
    if hasattr(judge, "logits"):
        lg = judge.logits(images)
        cr = 1 + (lg > lg.gather(1, targets.view(-1, 1))).sum(1)
        out["cls_top1"], out["cls_top5"] = cr <= 1, cr <= k
    return out


def summarise(verdict: dict[str, torch.Tensor], inv: Inversion | None = None, own: torch.Tensor | None = None) -> dict:
    """Means of per-identity verdicts (floats), with the attack's queries / seconds and the target's own top-1."""
    out = {key: float(v.float().mean()) for key, v in verdict.items()}
    if own is not None:
        out["target_top1"] = float(own.float().mean())
    if inv is not None:
        out["queries"], out["wall_s"], out["confidence"] = inv.queries, inv.wall_s, float(inv.confidence.mean())
    return out


# ----------------------------------------------------------------------------------------------------
# Calibration on the undefended targets (issue 14 item 2): S3 / S4 beside trivial baselines
# ----------------------------------------------------------------------------------------------------


def calibrate(set_name: str, seeds, *, work: Path | str | None = None, budget: str | dict = "full", judge_kind: str = "cnn2",
              priors=("pca",), public: bool = True, dims: int | dict | None = None, average: int = 4,
              scenarios=("S3", "S4"), face_pool: int = 0, vae_pool: int = 0, train_missing: bool = False,
              log=print) -> list[dict]:
    """S3 and S4 on the trained undefended ("none") targets of ``run.py`` (``<work>/<set>_s<seed>/fr/none``),
    graded by the evaluation's cached judge (``judge_kind``; cnn2 is the one run.py reports), once per prior
    kind of ``priors`` (every kind fitted on the same ``public_faces``, cached under ``<work>/priors``), beside
    two trivial baselines that hold no identity information beyond the target's choice among public faces: the
    prior's mean face (z = 0) for every victim, and the public face the target scores highest for each victim (a
    real face, the target's pick: chance for the judge unless the judge rewards something other than the person).

    dims: one value for every kind, or {kind: dims}; face_pool: that many of the prior's encodings of public
    faces (every n-th) join S3's initial pool; vae_pool: the hybrid prior, the eigenface search started from
    faces the VAE draws: that many N(0, I) VAE decodes, projected on the eigenfaces, join the PCA prior's
    initial pool (the VAE is fitted, or taken from the cache, for it); train_missing: train an absent
    undefended target here exactly as run.py does (``run.target_config``, ``training.loop.train``: seconds on
    one thread) instead of raising.
    Returns one dict per (seed, prior): "prior" (kind, dims, faces, its fitting info), for "mean_face",
    "best_public_face" and each of ``scenarios`` the judge's "top1" / "top5" (templates of the victims'
    held-out images, as run.py), the target's own "target_top1", and for the attacks "wall_s" (one thread),
    "queries" and the objective's curve."""
    from training.config import project_root
    from training.loop import train

    from .data import get_split
    from .judge import cache_path, load_judge
    from .run import BUDGETS as RUN_BUDGETS
    from .run import load_target, target_config
    from . import attacks as A

    torch.set_num_threads(1)
    work = Path(work or project_root() / "out" / "privacy")
    ib = budget_of(budget)
    bad = [k for k in priors if k not in PRIORS] + [s for s in scenarios if s not in ("S3", "S4")]
    if bad:
        raise ValueError(f"priors must be among {PRIORS} and scenarios among ('S3', 'S4'); got {bad}")
    out = []
    for seed in seeds:
        split = get_split(set_name, seed)
        v, vic = split.num_victims, split.victim_train
        cfg = target_config(set_name, "none", {"name": "none"}, seed, RUN_BUDGETS["full"], work / f"{set_name}_s{seed}", len(vic))
        if not cache_path(split.judge, judge_kind, "full", 0, work).is_file():
            raise FileNotFoundError(f"the {judge_kind} judge of pool {split.judge.name} is not cached under {work}/cache "
                                    "(python -m training.privacy trains it once)")
        train_s = None
        if not (Path(cfg["out_dir"]) / "ckpt.pt").is_file():
            if not train_missing:
                raise FileNotFoundError(f"no undefended target at {cfg['out_dir']}: run python -m training.privacy first "
                                        "(or calibrate(..., train_missing=True))")
            t0 = time.time()
            train(cfg, resume=False, data=split.bundle())
            train_s = time.time() - t0
            log(f"[calibrate] {set_name} seed {seed}: undefended target trained in {train_s:.0f} s")
        model = load_target(cfg, v)
        dm = A.DefendedModel(model.defence, model.backbone, model.head, seed)
        for p in dm.parameters():
            p.requires_grad_(False)
        judge = load_judge(split, judge_kind, "full", 0, work, log=lambda *_: None)
        judge.enroll(torch.cat([split.victim_val.images, split.victim_test.images]),
                     torch.cat([split.victim_val.labels, split.victim_test.labels]))
        t = torch.arange(v)

        def grade(images):
            return {"top1": float(judge.hits(images, t, 1).mean()), "top5": float(judge.hits(images, t, 5).mean()),
                    "target_top1": float(target_top1(dm, images, t).float().mean())}

        faces, pub_info = public_faces(split) if public else (split.attacker.images, {
            "public": "attacker only", "images": len(split.attacker.images), "lfw_images": 0})
        with torch.no_grad():
            x = to_float(faces)
            sc = torch.cat([dm(x[i : i + 512]) for i in range(0, len(x), 512)])
        best_public = grade(x[sc[:, t].argmax(0)])
        for kind in priors:
            d = dims.get(kind) if isinstance(dims, dict) else dims
            t0 = time.time()
            # attack_prior's prior, on the faces read once above (public=False: the attacker's own faces only,
            # the prior before the public faces, for the comparison)
            if kind == "pca" and d is None:
                d = PCA_DIMS if public else 80
            prior = face_prior(kind, faces, work=work, dims=d, steps=ib["vae_steps"], seed=seed)
            prior.public = pub_info
            fit_s = time.time() - t0
            pub = {k: x for k, x in prior.public.items() if k != "names"}
            info = {k: x for k, x in prior.info.items() if k != "curve"}
            row = {"set": set_name, "seed": seed, "victims": v, "target_train_s": train_s,
                   "prior": {"kind": prior.kind, "dims": prior.dims, "from_cache": prior.from_cache, "load_or_fit_s": round(fit_s, 1),
                             **info, "curve": prior.info.get("curve"), **pub},
                   "mean_face": grade(prior.decode(torch.zeros(v, prior.dims)).detach()), "best_public_face": best_public}
            if "S3" in scenarios:
                pools = [prior.encode(x[:: max(1, len(x) // face_pool)][:face_pool])] if face_pool else []
                if vae_pool and kind == "pca":
                    vae = face_prior("vae", faces, work=work, dims=dims.get("vae") if isinstance(dims, dict) else None,
                                     steps=ib["vae_steps"], seed=seed)
                    zv = torch.randn(vae_pool, vae.dims, generator=torch.Generator().manual_seed(seed)).clamp(-vae.bound, vae.bound)
                    with torch.no_grad():
                        pools.append(prior.encode(vae.decode(zv)))
                row["prior"]["init"] = {"face_pool": face_pool, "vae_pool": vae_pool if kind == "pca" else 0}
                pool = torch.cat(pools) if pools else None
                dm.queries = 0
                inv = invert_white_box(dm, t, prior, steps=ib["wb_steps"], candidates=ib["wb_candidates"], lr=ib["wb_lr"],
                                       init_pool=ib["init_pool"], average=average, seed=seed, pool_latents=pool)
                row["S3"] = {**grade(inv.images), "wall_s": inv.wall_s, "queries": inv.queries,
                             "curve": [round(c, 4) for c in inv.curve[::10]]}
                row["S3_images"] = inv.images
            if "S4" in scenarios:
                dm.queries = 0
                inv = invert_black_box(dm, t, prior, iters=ib["bb_iters"], pop=ib["bb_pop"], candidates=ib["bb_candidates"],
                                       sigma=ib["bb_sigma"], lr=ib["bb_lr"], init_pool=ib["init_pool"], seed=seed)
                row["S4"] = {**grade(inv.images), "wall_s": inv.wall_s, "queries": inv.queries,
                             "curve": [round(c, 4) for c in inv.curve[::10]]}
            shown = ("mean_face", "best_public_face", *scenarios)
            log(f"[calibrate] {set_name} seed {seed} ({v} victims, {judge_kind} judge of {split.judge.name}), prior {kind} "
                f"({prior.dims}-D, {'cached' if prior.from_cache else f'fitted in {fit_s:.0f} s'}): " + "  ".join(
                    f"{k} top1 {row[k]['top1']:.2f} top5 {row[k]['top5']:.2f} target {row[k]['target_top1']:.2f}"
                    + (f" ({row[k]['wall_s']:.1f} s)" if "wall_s" in row[k] else "") for k in shown))
            out.append(row)
    return out


if __name__ == "__main__":  # python -m training.privacy.inversion orl 0,1,2,3,4 [out.json] [options as JSON]
    import json
    import sys

    # e.g. '{"priors": ["pca", "vae"], "scenarios": ["S3"], "train_missing": true, "work": "out/privacy_vae"}'
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    rows = calibrate(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], **opts)
    if len(sys.argv) > 3:
        images = {f"{r['seed']}_{r['prior']['kind']}": r.pop("S3_images") for r in rows if "S3_images" in r}
        Path(sys.argv[3]).write_text(json.dumps(rows, indent=1))
        torch.save(images, Path(sys.argv[3]).with_suffix(".images.pt"))
