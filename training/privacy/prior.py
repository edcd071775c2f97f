"""The model-inversion attacker's face priors (S3 / S4): what it learns from faces of people who are not victims.

Threat model (THREAT_MODEL.md, S3 / S4). A model-inversion attacker holds faces of other people: its own
(``split.attacker``) and public web photos (``public_faces``: LFW people who are neither victims nor in the
judge's pool). It never sees a victim face. It fits a face prior on them once and searches the prior's latent
for the image the target model takes for a victim (``inversion.py``): GMI (Zhang et al., "The Secret
Revealer", CVPR 2020) and Plug & Play Attacks (Struppek et al., ICML 2022) search a GAN trained on public faces
(CelebA / FFHQ) so that the result stays a face. This module holds the priors; the latent search and its
scoring are ``inversion.py``'s.

Two priors, one interface (``decode(z) -> images``, ``encode(images) -> z``, ``dims``, ``bound``, latent
z ~ N(0, I) within ``bound`` per coordinate):
- ``PCAPrior``: eigenfaces (Turk & Pentland 1991) of the faces and their mirror images; linear, so the search
  can leave the face manifold along any mix of components.
- ``VAEPrior``: a small convolutional VAE (Kingma & Welling, ICLR 2014), the CPU-sized stand-in for GMI's
  GAN: a non-linear decoder whose every output is face-like to the extent the VAE learned faces.

``attack_prior`` fits the selected kind on exactly the faces of ``public_faces`` (the same identity-disjoint
set for both kinds); ``face_prior`` caches every fitted prior as ``<work>/priors/<kind>_<key>.pt``, the key
covering the faces' bytes and every setting, so a set / seed trains its prior once.

Shapes: faces in (N, C, S, S) uint8; images (N, C, S, S) float in [-1, 1]; latents (N, D).
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.data import to_float

PRIORS = ("pca", "vae")
# Which prior S3 / S4 search by default (``attack_prior``; run.py uses it): chosen by measurement on the
# undefended targets (README, Results, "A learned prior does not close it": the VAE gains 0.08 top-1 on ORL and
# loses 0.13 on LFW), not by which is the more elaborate one.
DEFAULT_PRIOR = "pca"
# eigenfaces of the ~2.8k public faces (lfw_all judge, ORL seeds 0-4 S3 top-1 0.40 / 0.40 / 0.45 / 0.20 / 0.15
# at 160, 0.40 / 0.40 / 0.35 / 0.20 / 0.35 at 300)
PCA_DIMS = 160
VAE_DIMS = 64
VAE_STEPS = 1200  # the full budget's training steps (batch 64): see VAEPrior.fit for the measured time
CACHE_VERSION = "v2"  # bumped when a prior's code changes what it learns (v2: the VAE's decoder, info saved)


class PCAPrior(nn.Module):
    """Eigenfaces of the attacker's faces (and their mirror images: a face's mirror is a face):
    image = clamp(mean + sum_j z_j * sd_j * pc_j, -1, 1), z (N, D) in units of the component's spread, so
    z ~ N(0, I) is a plausible face and |z| <= ``bound`` keeps the search near the face manifold.
    (Generalises ``attacks.FaceBasis``: same basis, standardised latent, a differentiable decode.)"""

    kind = "pca"

    def __init__(self, shape, dims: int = 80, bound: float = 3.0):
        super().__init__()
        self.shape, self.dims, self.bound = tuple(int(s) for s in shape), int(dims), float(bound)
        n = math.prod(self.shape)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("pcs", torch.zeros(self.dims, n))
        self.register_buffer("sd", torch.ones(self.dims))
        self.info: dict = {}

    @torch.no_grad()
    def fit(self, faces_u8: torch.Tensor, **_) -> "PCAPrior":
        x = to_float(faces_u8)
        x = torch.cat([x, x.flip(-1)]).flatten(1)
        if self.dims > x.shape[0]:
            raise ValueError(f"PCA prior: dims={self.dims} components need at least as many faces, got {x.shape[0]} (with mirrors)")
        self.mean.copy_(x.mean(0))
        _, s, vt = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.pcs.copy_(vt[: self.dims])
        self.sd.copy_(s[: self.dims] / math.sqrt(x.shape[0]))
        return self

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C, S, S) in [-1, 1] (differentiable)."""
        return (self.mean + (z * self.sd) @ self.pcs).clamp(-1, 1).view((-1,) + self.shape)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) [-1, 1] -> (N, D): the projection onto the components, clamped to the bound."""
        return (((x.flatten(1) - self.mean) @ self.pcs.t()) / self.sd).clamp(-self.bound, self.bound)


class VAEPrior(nn.Module):
    """A small convolutional VAE of square grey faces whose side is divisible by 8 (56x56 here).

    Encoder: three stride-2 4x4 convs (``width`` x 1 / 2 / 4 channels; S -> S/8) -> (mu, log var) of a
    ``dims``-D latent. Decoder: linear -> (4w, S/8, S/8), then three nearest-neighbour x2 upsamplings each
    followed by a 3x3 conv (4w -> 2w -> w -> w/2), a 3x3 conv to the image and tanh into [-1, 1].
    Upsample-then-convolve rather than transposed convolutions: a strided transposed conv paints a
    checkerboard the inversion's gradients can amplify into exactly the high-frequency pattern a prior is
    there to rule out (Odena et al., "Deconvolution and checkerboard artifacts", Distill 2016).
    Cost: ~11 M multiply-adds per decoded image, about the target model's own, so S3 through it costs about
    twice S3 through the eigenfaces. The search stays within ``bound`` per coordinate of the N(0, I) latent."""

    kind = "vae"

    def __init__(self, shape, dims: int = VAE_DIMS, bound: float = 3.0, width: int = 16):
        super().__init__()
        c, s, s2 = (int(v) for v in shape)
        if s != s2 or s % 8:
            raise ValueError(f"VAE prior: shape must be square with a side divisible by 8, got {tuple(shape)}")
        if width < 2 or width % 2:
            raise ValueError(f"VAE prior: width must be an even number >= 2, got {width}")
        self.shape, self.dims, self.bound, self.w, self.g = (c, s, s), int(dims), float(bound), int(width), s // 8
        w, flat = self.w, 4 * self.w * self.g * self.g
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.enc = nn.Sequential(nn.Conv2d(c, w, 4, 2, 1), act(),
                                 nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), act(),
                                 nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), act(), nn.Flatten())
        self.mu, self.logvar = nn.Linear(flat, self.dims), nn.Linear(flat, self.dims)
        self.fc = nn.Linear(self.dims, flat)

        def up(i, o):
            return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.dec = nn.Sequential(nn.ReLU(), *up(4 * w, 2 * w), *up(2 * w, w), *up(w, w // 2),
                                 nn.Conv2d(w // 2, c, 3, 1, 1), nn.Tanh())
        self.info: dict = {}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C, S, S) in [-1, 1] (differentiable; eval-mode batch norm once fitted)."""
        return self.dec(self.fc(z).view(-1, 4 * self.w, self.g, self.g))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) [-1, 1] -> (N, D): the posterior mean, clamped to the bound."""
        return self.mu(self.enc(x)).clamp(-self.bound, self.bound)

    def fit(self, faces_u8: torch.Tensor, steps: int = VAE_STEPS, batch: int = 64, lr: float = 2e-3, beta: float = 0.1,
            seed: int = 0, **_) -> "VAEPrior":
        """Maximise the ELBO on random flips and +-2 pixel shifts of ``faces_u8`` (N, C, S, S) uint8.

        Reconstruction: per-pixel L1 + MSE (L1 keeps edges sharper than MSE alone). KL: summed over the
        latent, divided by the pixel count to be in the same per-pixel units, weighted by ``beta``. beta
        trades sharpness (small) against how well N(0, I) samples land on faces (large): 0.1 is a Gaussian
        decoder of per-pixel sd ~0.2 in [-1, 1] units. Adam with a one-cycle schedule. ``info`` records
        the loss curve (every ``steps // 12`` steps: its flattening is the sign that the budget sufficed),
        the final reconstruction L1 and KL, and the wall time."""
        if steps < 1:
            raise ValueError(f"VAE prior: steps must be >= 1, got {steps}")
        with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random stream left as it was
            torch.manual_seed(seed)
            for m in self.modules():
                if m is not self and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return self._fit(faces_u8, steps, batch, lr, beta, torch.Generator().manual_seed(seed))

    def _fit(self, faces_u8, steps, batch, lr, beta, g):
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        warm = max(1, steps // 10)  # one-cycle: linear warm-up over 10%, cosine decay (OneCycleLR fails below ~10 steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
        n, s = faces_u8.shape[0], faces_u8.shape[-1]
        t0, curve, every, acc = time.time(), [], max(1, steps // 12), torch.zeros(3)
        self.train()
        for i in range(steps):
            x = to_float(faces_u8[torch.randint(n, (batch,), generator=g)])
            x = torch.where((torch.rand(batch, generator=g) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = F.pad(x, (2, 2, 2, 2), mode="replicate")[..., 2 + dy : 2 + dy + s, 2 + dx : 2 + dx + s]
            h = self.enc(x)
            mu, logvar = self.mu(h), self.logvar(h).clamp(-8, 8)
            z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
            rec = self.decode(z)
            l1 = F.l1_loss(rec, x)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
            loss = l1 + F.mse_loss(rec, x) + beta * kl / math.prod(self.shape)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            acc += torch.stack([loss, l1, kl]).detach()
            if (i + 1) % every == 0 or i + 1 == steps:
                k = (i % every) + 1
                curve.append([i + 1, *(round(float(v) / k, 4) for v in acc)])
                acc.zero_()
        self.info = {"steps": steps, "batch": batch, "beta": beta, "faces": n, "fit_s": round(time.time() - t0, 1),
                     "curve": curve, "final_l1": curve[-1][2], "final_kl": curve[-1][3]}
        return self.eval()


PUBLIC_LFW_SEEDS = range(5)  # data.JUDGE_SEEDS: the LFW people these seeds draw as attackers are in no judge pool


def public_faces(split, lfw_root: Path | str | None = None, log=None, labels: bool = False):
    """The faces the attacker's prior learns from: its own (``split.attacker``) plus public web faces of other
    people: the LFW people that LFW seeds 0-4 draw as *attackers* (people with < 10 images; 2,578 images of
    1,629 people at 56x56). Returns ((N, 1, S, S) uint8, info: counts, and "names" the LFW people added).

    Threat-model choice (issue 14 item 2): a model-inversion attacker holds a public face set of people who
    are not the victims (GMI / PPA use CelebA / FFHQ against FaceScrub / CelebA targets); for ORL its own
    200 lab faces of 20 people are a very thin prior, so it also holds these LFW photos. They are disjoint
    from every victim (ORL: another dataset; LFW: victims have >= 10 images) and from the judge's pool
    (``data.lfw_judge_pool_fixed`` leaves out exactly these people), which is checked here by name: a person
    who is a victim of ``split`` or in its judge pool is dropped. Without LFW the attacker keeps its own faces.
    Measured (ORL seeds 0-2, S3, lfw_all cnn judge top-1): own faces, 80 eigenfaces 0.25 / 0.30 / 0.15; own + LFW
    public, 160 eigenfaces 0.40 / 0.40 / 0.45. ``labels=True``: (faces, (N,) int64 person ids 0.. over both
    parts, info), what an attacker-side face model (``inversion.attacker_face_model``) trains on."""
    from training.data import CachedFaces, data_root, scan_image_folder
    from .data import LFW_CROP, _lfw_draw

    own = split.attacker.images
    root = Path(lfw_root) if lfw_root else data_root() / "lfw"
    own_y = torch.unique(split.attacker.labels, return_inverse=True)[1] if labels else None
    if not root.is_dir():
        info = {"public": "attacker only (no LFW at %s)" % root, "images": len(own), "lfw_images": 0}
        return (own, own_y, info) if labels else (own, info)
    people = scan_image_folder(root)
    names: dict[str, list[str]] = {}
    for s in PUBLIC_LFW_SEEDS:
        for n, fs in _lfw_draw(people, s, 40, 10, 600)[2]:
            names[n] = fs
    banned = set(split.info.get("victims", ())) | set(split.info.get("attackers", ()))  # attackers: already in own
    if split.judge is not None:
        banned |= set(split.judge.identities)
    keep = sorted(n for n in names if n not in banned)
    files, labels_lfw = [], []
    for y, n in enumerate(keep):
        files += names[n]
        labels_lfw += [y] * len(names[n])
    size = int(own.shape[-1])
    # the decoded faces' own labels: from_files skips an unreadable file (and relabels a person left with none)
    cached = CachedFaces.from_files(files, labels_lfw, "grey", size, LFW_CROP) if files else None
    lfw = cached.images if cached is not None else own[:0]
    info = {"public": f"attacker's own + LFW attackers of seeds {min(PUBLIC_LFW_SEEDS)}-{max(PUBLIC_LFW_SEEDS)}",
            "images": len(own) + len(lfw), "lfw_images": len(lfw), "lfw_people": len(keep),
            "dropped_people": len(names) - len(keep), "names": keep}
    if log is not None:
        log(f"    prior faces: {len(own)} own + {len(lfw)} public LFW faces of {len(keep)} other people")
    if labels:
        lfw_y = cached.labels.to(torch.int64) if cached is not None else torch.zeros(0, dtype=torch.int64)
        ys = torch.cat([own_y, lfw_y + (int(own_y.max()) + 1 if len(own_y) else 0)])
        return torch.cat([own, lfw]), ys, info
    return torch.cat([own, lfw]), info


def attack_prior(split, *, work: Path | str | None = None, kind: str | None = None, dims: int | None = None,
                 steps: int | None = None, seed: int = 0, log=None) -> PCAPrior | VAEPrior:
    """The prior S3 and S4 search: ``face_prior`` of ``kind`` (default ``DEFAULT_PRIOR``) fitted on
    ``public_faces(split)``, the same identity-disjoint faces for every kind, cached under ``work``.
    ``.public`` holds public_faces' info."""
    kind = kind or DEFAULT_PRIOR
    faces, info = public_faces(split, log=log)
    dims = dims or (PCA_DIMS if kind == "pca" else VAE_DIMS)
    prior = face_prior(kind, faces, work=work, dims=dims, steps=steps, seed=seed, log=log)
    prior.public = info
    return prior


def _digest(faces_u8: torch.Tensor) -> str:
    return hashlib.sha1(faces_u8.contiguous().numpy().tobytes()).hexdigest()[:16]


def face_prior(kind: str, faces_u8: torch.Tensor, *, work: Path | str | None = None, dims: int | None = None,
               steps: int | None = None, seed: int = 0, log=None) -> PCAPrior | VAEPrior:
    """The attacker's face prior of ``kind`` ("pca" / "vae") fitted on its faces (N, C, S, S) uint8.

    dims: PCA components (default 80) or VAE latent dimensions (``VAE_DIMS``); steps: the VAE's
    training steps (``VAE_STEPS``; ignored for PCA). With ``work``, the fitted prior is cached as
    ``<work>/priors/<kind>_<key>.pt``; the key covers every input that changes it (the faces' bytes, so the
    set, split seed and size; kind, dims, steps, seed and ``CACHE_VERSION``), so a cached prior is reused
    only for the very same training. Returns it in eval mode with ``.cache_path`` (None without ``work``),
    ``.from_cache`` and ``.info`` (the VAE's training curve and time) set."""
    if kind not in PRIORS:
        raise ValueError(f"prior kind must be one of {PRIORS}, got {kind!r}")
    if faces_u8.dtype != torch.uint8 or faces_u8.dim() != 4:
        raise ValueError(f"prior faces must be (N, C, S, S) uint8, got {tuple(faces_u8.shape)} {faces_u8.dtype}")
    dims = int(dims or (80 if kind == "pca" else VAE_DIMS))  # 80 eigenfaces: the attacker's own ~200 faces (attack_prior: PCA_DIMS)
    steps = int(steps if steps is not None else VAE_STEPS) if kind == "vae" else 0
    prior = PCAPrior(faces_u8.shape[1:], dims) if kind == "pca" else VAEPrior(faces_u8.shape[1:], dims)
    key = hashlib.sha1(f"{CACHE_VERSION}|{kind}|{dims}|{steps}|{seed}|{tuple(faces_u8.shape)}|{_digest(faces_u8)}".encode()).hexdigest()[:20]
    path = Path(work) / "priors" / f"{kind}_{key}.pt" if work is not None else None
    prior.cache_path, prior.from_cache = path, False
    if path is not None and path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        prior.load_state_dict(ck["state"])
        prior.info = ck["info"]
        prior.from_cache = True
        return prior.eval()
    t0 = time.time()
    prior.fit(faces_u8, steps=steps, seed=seed)
    if log is not None:
        log(f"    prior {kind} ({dims}-D) fitted on {faces_u8.shape[0]} attacker faces in {time.time() - t0:.1f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": prior.state_dict(), "info": prior.info}, tmp)
        tmp.replace(path)  # atomic: a concurrent run never reads half a file
    return prior.eval()
