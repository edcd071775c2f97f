"""The judge: an independent face-recognition model that decides whether an attack's output shows the right
person. It is not the victims' classifier and never saw a victim face (STYLE.md rule 15; issue 14 item 3):
it is pretrained on the split's *judge pool* (``data.py``: people who are neither victims nor the
attacker's), and the victims are only *enrolled*, by templates built from their training images.

Three judges, built differently and exposed the same way (``Judge``), so a leak can be checked against another:

    "cnn" (default)  a small residual CNN (PReLU, widths 16/32/64 on the centre 48x48, flatten + linear to a
                     128-d embedding) trained with a CosFace margin loss (training.loss.MarginHead, s 30,
                     m 0.35) on the pool's people with >= 2 images: random flips, shifts, scale, rotation and
                     linear contrast jitter; SGD with one-cycle LR. Embedding = mean of the image and its mirror.
    "cnn2"           another CNN family: a plain VGG-style stack (ReLU, max-pool, no shortcuts, widths
                     16/32/48/96 on the centre 52x52) with MobileFaceNet's global depthwise conv output, trained
                     with an ArcFace margin loss (s 32, m 0.3) by AdamW with a cosine LR on the same people:
                     random-resized crops, gamma (non-linear) lighting, down/up-sampling blur and erased
                     squares. Embedding = mean of the image and its mirror. On the shared LFW pool it matches
                     "cnn" on clean faces (ORL s0/s1 clean_rank1 1.000/0.983, LFW 0.875/0.900) and holds up far
                     better on degraded ones (ORL s0 training faces down/up-sampled x4: 0.89 vs cnn 0.47;
                     noise sd 0.2: 0.80 vs 0.31), so it grades blurry reconstructions more leniently.
    "lda"            classical: uniform LBP histograms (radius 1 and 2) on a grid of cells, square-rooted,
                     PCA-whitened, then Fisher LDA between the pool's identities (Fisherfaces on LBP).

Images in: (N, 1, 56, 56) float in [-1, 1] (``training.data.to_float`` of the uint8 faces). Embeddings out:
(N, E), L2-normalised. Templates: the mean of the L2-normalised embeddings of an identity's enrolled images,
re-normalised. Scores: cosine similarity.

Every judge is trained once per pool and cached: ``load_judge(split, kind, work=...)`` keeps
``<work>/cache/judge_<pool>_<kind>_<hash>.pt``, the hash covering the pool's files, labels, size and crop,
the judge kind, its hyper-parameters, its budget and seed, and ``VERSION`` (bumped when the code changes what
it learns).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.config import project_root
from training.data import CachedFaces, to_float
from training.loss import MarginHead

VERSION = 1  # the hash also covers each kind's hyper-parameters: a new kind leaves the others' caches valid
KINDS = ("cnn", "cnn2", "lda")
DEFAULT_KIND = "cnn"

# Budgets: "full" is what the evaluation uses, "smoke" the tests. Measured on one thread: cnn 3000 steps 9 min
# idle, 18-25 min under load; cnn2 0.27 s per step idle (~13.5 min), 51 min on 2 cores shared by 5-9 jobs.
# A budget may also narrow the nets ("widths" replaces the kind's): the smoke judges only carry the tests' plumbing,
# and at full width grading is most of a smoke run's time (every attacked image through 3 judges, mirrored).
CNN_BUDGETS = {"full": {"steps": 3000, "batch": 128}, "smoke": {"steps": 8, "batch": 32, "widths": (4, 8, 16)}}
CNN_HPARAMS = {"widths": (16, 32, 64), "crop": 48, "embedding": 128, "s": 30.0, "m": 0.35, "lr": 0.1, "wd": 5e-4,
               "min_images": 2, "max_per_id": 40}
CNN2_BUDGETS = {"full": {"steps": 3000, "batch": 128}, "smoke": {"steps": 8, "batch": 32, "widths": (4, 8, 12, 24)}}
CNN2_HPARAMS = {"widths": (16, 32, 48, 96), "crop": 52, "embedding": 128, "s": 32.0, "m": 0.3,
                "lr": 3e-3, "wd": 0.05, "warmup": 0.05, "min_images": 2, "max_per_id": 40}
LDA_BUDGETS = {"full": {"pca": 600, "max_images": 20000}, "smoke": {"pca": 60, "max_images": 600}}
LDA_HPARAMS = {"grid": 7, "crop": 48, "min_images": 2, "max_per_id": 40, "lda_dims": 256, "reg": 1e-3}
# kind -> (hyper-parameters, budgets)
SPECS = {"cnn": (CNN_HPARAMS, CNN_BUDGETS), "cnn2": (CNN2_HPARAMS, CNN2_BUDGETS), "lda": (LDA_HPARAMS, LDA_BUDGETS)}


# ----------------------------------------------------------------------------------------------------
# Judge: enrollment, identification, verification (the same for every kind)
# ----------------------------------------------------------------------------------------------------


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float passes through (reconstructions are float already)."""
    return to_float(x) if x.dtype == torch.uint8 else x.float()


class Judge:
    """An embedding function plus enrolled victim templates.

    ``embedder``: a callable (N, 1, S, S) float [-1, 1] -> (N, E) L2-normalised embeddings."""

    def __init__(self, embedder, kind: str, info: dict | None = None):
        self.embedder, self.kind, self.info = embedder, kind, dict(info or {})
        self.templates: torch.Tensor | None = None  # (V, E)
        self.ids: torch.Tensor | None = None  # (V,) the label of each template row

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """(N, 1, S, S) uint8 or [-1, 1] float -> (N, E) L2-normalised embeddings."""
        x = _as_float(x)
        return torch.cat([self.embedder(x[i : i + batch]) for i in range(0, x.shape[0], batch)]) if len(x) else \
            torch.zeros(0, self.embed_dim())

    def embed_dim(self) -> int:
        return int(self.embedder(torch.zeros(2, 1, 56, 56)).shape[1])

    def enroll(self, images: torch.Tensor, labels: torch.Tensor) -> "Judge":
        """Templates from enrollment images (N, 1, S, S) with labels (N,): per label the re-normalised mean
        of its L2-normalised embeddings. Returns self."""
        e = self.embed(images)
        ids = torch.unique(labels)
        self.templates = F.normalize(torch.stack([e[labels == i].mean(0) for i in ids]), dim=1)
        self.ids = ids
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, V) cosine similarity to every enrolled template."""
        if self.templates is None:
            raise RuntimeError("enroll() the victims before identify()/scores()")
        return self.embed(x) @ self.templates.t()

    def identify(self, x: torch.Tensor, k: int = 5) -> torch.Tensor:
        """(N, 1, S, S) -> (N, min(k, V)) enrolled labels, most similar first."""
        s = self.scores(x)
        return self.ids[s.topk(min(k, s.shape[1]), dim=1).indices]

    def hits(self, x: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(N,) float 0/1: the true label is among the judge's top-k. k = 1 is the per-sample success measure
        shared by every attack ("the judge identifies this output as its victim")."""
        return (self.identify(x, k) == labels.view(-1, 1)).any(1).float()

    def verify(self, recon: torch.Tensor, recon_labels: torch.Tensor, gallery: torch.Tensor,
               gallery_labels: torch.Tensor, exclude: torch.Tensor | None = None, far: float = 0.01,
               threshold: float | None = None) -> dict:
        """Verification of reconstructions against real gallery faces.

        recon (R, 1, S, S), recon_labels (R,); gallery (G, 1, S, S), gallery_labels (G,); exclude (R,) the
        gallery index each reconstruction was made from (-1: none), so a genuine pair is always a
        reconstruction and ANOTHER image of the same person. Impostor pairs: the reconstruction and every
        gallery image of another person. ``threshold`` None: set at ``far`` on these impostor scores (the
        threshold that at most ``far`` of them exceed).

        Returns {"tar", "far", "threshold", "auc", "genuine_pairs", "impostor_pairs",
        "accepted" (R,) share of each reconstruction's genuine pairs accepted (mean over R = tar when every
        reconstruction has as many genuine pairs), "genuine_mean" (R,) its mean genuine cosine}."""
        er, eg = self.embed(recon), self.embed(gallery)
        s = er @ eg.t()  # (R, G)
        same = recon_labels.view(-1, 1) == gallery_labels.view(1, -1)
        if exclude is not None:
            ex = exclude.view(-1)
            rows = (ex >= 0).nonzero().flatten()
            same = same.clone()
            valid = torch.ones_like(same)
            valid[rows, ex[rows]] = False  # the source image is neither genuine nor impostor
            same &= valid
        else:
            valid = torch.ones_like(same)
        imp = s[~same & valid]
        gen = s[same]
        if gen.numel() == 0 or imp.numel() == 0:
            raise ValueError(f"verify needs genuine and impostor pairs (got {gen.numel()} / {imp.numel()}): "
                             "every reconstructed person needs another gallery image")
        thr = float(threshold) if threshold is not None else threshold_at_far(imp, far)
        acc_pairs = (s > thr) & same
        n_gen = same.sum(1)
        accepted = torch.where(n_gen > 0, acc_pairs.sum(1).float() / n_gen.clamp_min(1), torch.full_like(n_gen, float("nan"), dtype=torch.float))
        gmean = torch.where(n_gen > 0, (s * same).sum(1) / n_gen.clamp_min(1), torch.full_like(n_gen, float("nan"), dtype=torch.float))
        return {"tar": float((gen > thr).float().mean()), "far": float((imp > thr).float().mean()), "threshold": thr,
                "auc": roc_auc(gen, imp), "genuine_pairs": int(gen.numel()), "impostor_pairs": int(imp.numel()),
                "accepted": accepted, "genuine_mean": gmean}


def threshold_at_far(impostor: torch.Tensor, far: float) -> float:
    """The smallest threshold t with share(impostor > t) <= far: the ceil(far * n)-th largest impostor score
    (ties above t are counted, so the measured FAR never exceeds ``far``)."""
    v = impostor.flatten().double().sort(descending=True).values
    n = v.numel()
    j = int(math.floor(far * n))  # this many impostors may lie above the threshold
    return float(v[j]) if j < n else float(v[-1]) - 1e-9


def roc_auc(genuine: torch.Tensor, impostor: torch.Tensor) -> float:
    """Area under the ROC curve = P(genuine score > impostor score) + 0.5 P(equal) (Mann-Whitney U)."""
    g, i = genuine.flatten().double(), impostor.flatten().double()
    allv = torch.cat([g, i])
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
    ranks = (sums / counts)[inv]
    u = ranks[: g.numel()].sum() - g.numel() * (g.numel() + 1) / 2
    return float(u / (g.numel() * i.numel()))


def per_identity(values: torch.Tensor, labels: torch.Tensor, num: int) -> torch.Tensor:
    """(N,) per-sample values and (N,) labels -> (num,) per-identity means (nan where an identity has none):
    the per-victim unit the lead's bootstrap resamples."""
    tot = torch.zeros(num, dtype=torch.float64).index_add_(0, labels, values.double())
    cnt = torch.zeros(num, dtype=torch.float64).index_add_(0, labels, torch.ones_like(values, dtype=torch.float64))
    return torch.where(cnt > 0, tot / cnt.clamp_min(1), torch.full_like(tot, float("nan")))


def clean_rank1(judge: Judge, enrollment) -> dict:
    """Held-out identification of clean victims: templates from ``enrollment.gallery`` (victim_train),
    probes ``enrollment.probe`` (victim_test). Returns {"rank1", "rank5", "hits" (P,) 0/1}."""
    judge.enroll(enrollment.gallery.images, enrollment.gallery.labels)
    h1 = judge.hits(enrollment.probe.images, enrollment.probe.labels, 1)
    h5 = judge.hits(enrollment.probe.images, enrollment.probe.labels, 5)
    return {"rank1": float(h1.mean()), "rank5": float(h5.mean()), "hits": h1}


# ----------------------------------------------------------------------------------------------------
# Pool preparation (every kind): people with enough images, the largest capped
# ----------------------------------------------------------------------------------------------------


def _select(labels: torch.Tensor, min_images: int, max_per_id: int, seed: int,
            max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (M,) into a pool with labels (N,) 0..I-1, and their labels (M,) 0..C-1: the people with
    >= min_images images, at most max_per_id each (LFW's George W Bush has 530: uncapped he would be 5% of
    the pool's images), then at most ``max_images`` in all (a seeded subset; None: no cap)."""
    g = torch.Generator().manual_seed(70_000 + seed)
    keep = []
    for y in range(int(labels.max()) + 1 if labels.numel() else 0):
        idx = (labels == y).nonzero().flatten()
        if idx.numel() >= min_images:
            keep.append(idx[torch.randperm(idx.numel(), generator=g)[:max_per_id]])
    if not keep:
        raise ValueError(f"the judge pool has no person with >= {min_images} images")
    idx = torch.cat(keep)
    lab = torch.cat([torch.full((k.numel(),), i, dtype=torch.long) for i, k in enumerate(keep)])
    if max_images is not None and len(idx) > max_images:
        sub = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_images]
        idx, lab = idx[sub], torch.unique(lab[sub], return_inverse=True)[1]
    return idx, lab


def _pool_faces(pool, hp: dict, budget: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected pool faces (M, 1, S, S) uint8 and labels (M,) 0..C-1. Only the selected files are
    decoded (LFW's pool is ~12k images, the selection ~7k; a test budget's a few hundred)."""
    if pool._faces is not None:  # already decoded
        idx, lab = _select(pool._faces.labels, hp["min_images"], hp["max_per_id"], seed, budget.get("max_images"))
        return pool._faces.images[idx], lab
    idx, lab = _select(torch.tensor(pool.labels), hp["min_images"], hp["max_per_id"], seed, budget.get("max_images"))
    faces = CachedFaces.from_files([pool.files[i] for i in idx.tolist()], lab.tolist(), "grey", pool.size, pool.crop)
    if faces.num_classes == 0:
        raise ValueError(f"judge pool {pool.name}: none of the selected images could be read")
    return faces.images, faces.labels  # from_files relabels if a person lost every image to unreadable files


def _centre(x: torch.Tensor, c: int) -> torch.Tensor:
    s = x.shape[-1]
    o = (s - c) // 2
    return x[..., o : o + c, o : o + c]


# ----------------------------------------------------------------------------------------------------
# "cnn": residual CNN + CosFace
# ----------------------------------------------------------------------------------------------------


class _Res(nn.Module):
    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.PReLU(o),
                                  nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o))
        self.short = nn.Identity() if (i == o and stride == 1) else \
            nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
        self.act = nn.PReLU(o)

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


class JudgeNet(nn.Module):
    """(N, 1, 56, 56) [-1, 1] -> (N, E) raw embeddings (``forward``); the centre ``crop`` x ``crop`` is used
    (LFW's 128 crop still holds background at the corners). A stride-2 stem, one residual block per width
    (the first at stride 1, the others stride 2), then flatten + linear: the flatten keeps where on the face
    a feature is, which the global pooling of generic classifiers throws away (the IResNet output-layer
    choice)."""

    def __init__(self, widths=(16, 32, 64), crop: int = 48, embedding: int = 128):
        super().__init__()
        w0 = widths[0]
        layers, c = [nn.Conv2d(1, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.PReLU(w0)], w0
        for j, o in enumerate(widths):
            layers.append(_Res(c, o, 1 if j == 0 else 2))
            c = o
        self.crop = crop
        sp = math.ceil(crop / 2 / 2 ** (len(widths) - 1))
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(c), nn.Flatten(), nn.Dropout(0.2),
                                      nn.Linear(c * sp * sp, embedding), nn.BatchNorm1d(embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(_centre(x, self.crop) if x.shape[-1] != self.crop else x)


class _CnnEmbedder:
    """Eval-mode JudgeNet / JudgeNet2; embedding = normalise(f(x) + f(mirror x)) (test-time flip, as face
    benchmarks)."""

    def __init__(self, net: nn.Module):
        self.net = net.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.net(x) + self.net(x.flip(-1)), dim=1)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, 1, S, S) float: mirror, scale 0.9-1.1, shift +-4 px, rotation +-8 deg (one affine warp), contrast
    0.7-1.3 and brightness +-0.2: LFW is unaligned and ORL differs in scale and lighting, so the judge must
    not depend on where the face sits or how bright it is."""
    b, s = x.shape[0], x.shape[-1]
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    sc = 1.0 + (torch.rand(b, generator=g) * 0.2 - 0.1)
    ang = (torch.rand(b, generator=g) * 16 - 8) * math.pi / 180
    t = (torch.rand(b, 2, generator=g) * 8 - 4) * 2 / s
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos * flip, -sin, t[:, 0]], 1), torch.stack([sin * flip, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    c = 0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=g)
    br = 0.4 * torch.rand(b, 1, 1, 1, generator=g) - 0.2
    return (x * c + br).clamp(-1, 1)


def _fit_margin(net, head, opt, sched, images_u8, labels, steps: int, batch: int, g: torch.Generator, augment,
                kind: str, log=None):
    """The judges' training loop: epochs of reshuffled batches (every face once per pass), ``augment(x, g)``,
    margin-head cross-entropy, one scheduler step per step. Returns the net in eval mode."""
    n = images_u8.shape[0]
    net.train()
    t0, perm, pos = time.time(), torch.randperm(n, generator=g), 0
    for step in range(steps):
        if pos + batch > n:  # epochs: every face once per pass, reshuffled
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        x = augment(to_float(images_u8[idx]), g)
        y = labels[idx]
        loss = F.cross_entropy(head.logits(head.cosine(net(x)), y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"[judge {kind}] step {step + 1}/{steps} loss {float(loss.detach()):.3f} ({time.time() - t0:.0f} s)")
    return net.eval()


def train_cnn(images_u8: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 128, seed: int = 0,
              hp: dict | None = None, log=None) -> JudgeNet:
    """CosFace training of JudgeNet on (M, 1, S, S) uint8 faces with labels (M,) 0..C-1; eval-mode net."""
    hp = {**CNN_HPARAMS, **(hp or {})}
    torch.manual_seed(60_000 + seed)
    g = torch.Generator().manual_seed(60_000 + seed)
    net = JudgeNet(tuple(hp["widths"]), hp["crop"], hp["embedding"])
    head = MarginHead(hp["embedding"], int(labels.max()) + 1, "cosface", hp["s"], hp["m"])
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=hp["lr"], momentum=0.9, weight_decay=hp["wd"], nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=max(steps, 1), pct_start=0.1)
    return _fit_margin(net, head, opt, sched, images_u8, labels, steps, batch, g, _augment, "cnn", log)


# ----------------------------------------------------------------------------------------------------
# "cnn2": plain VGG-style net + global depthwise conv + ArcFace, another crop and augmentation
# ----------------------------------------------------------------------------------------------------


def _cbr(i: int, o: int, stride: int = 1) -> list:
    return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class JudgeNet2(nn.Module):
    """(N, 1, 56, 56) [-1, 1] -> (N, E) raw embeddings, built unlike ``JudgeNet`` on purpose (a second opinion
    should not share the first one's blind spots): a plain VGG-style stack (3x3 conv-BN-ReLU, no shortcuts,
    max-pool downsampling, where JudgeNet has PReLU residual blocks with strided convs), widths[0] at stride 2,
    then two convs per later width with a 2x2 max-pool between widths, and MobileFaceNet's *global depthwise
    conv* output (Chen et al. 2018: one SxS filter per channel over the last map, position-aware like JudgeNet's
    flatten with far fewer weights) -> linear embedding. Input: the centre ``crop`` (52: more of the face's
    outline than JudgeNet's 48).

    Why not MobileFaceNet's depthwise blocks: on one CPU thread they cost 0.45-0.9 s per 128-face step against
    0.27 s for this net and 0.24 s for JudgeNet (measured), i.e. 25-45 min for the judge's budget."""

    def __init__(self, widths=(16, 32, 48, 96), crop: int = 52, embedding: int = 128):
        super().__init__()
        layers, c, sp = _cbr(1, widths[0], 2), widths[0], math.ceil(crop / 2)
        for j, o in enumerate(widths[1:]):
            if j:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                sp = math.ceil(sp / 2)
            layers += _cbr(c, o) + _cbr(o, o)
            c = o
        layers += [nn.Conv2d(c, c, sp, groups=c, bias=False), nn.BatchNorm2d(c),  # GDC: (N, c, sp, sp) -> (N, c, 1, 1)
                   nn.Flatten(), nn.Dropout(0.1), nn.Linear(c, embedding, bias=False), nn.BatchNorm1d(embedding)]
        self.crop = crop
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(_centre(x, self.crop) if x.shape[-1] != self.crop else x)


def _augment2(x: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    """(B, 1, S, S) float -> (B, 1, crop, crop): random-resized crop (side 80-100 % of the image at a random
    place, aspect 0.9-1.1, resampled to ``crop``), mirror, gamma 0.6-1.6 on [0, 1] intensities (a non-linear
    lighting change, where ``_augment`` is linear), a blur by down- and up-sampling at 1/2-1/3 for a quarter
    of the faces (attack outputs are soft) and one erased square of 8-20 px for a quarter (occlusion)."""
    b, s = x.shape[0], x.shape[-1]
    side = 0.8 + 0.2 * torch.rand(b, generator=g)
    asp = (0.9 + 0.2 * torch.rand(b, generator=g)).sqrt()
    sx, sy = (side * asp).clamp(max=1.0), (side / asp).clamp(max=1.0)
    tx, ty = (1 - sx) * (2 * torch.rand(b, generator=g) - 1), (1 - sy) * (2 * torch.rand(b, generator=g) - 1)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([sx * flip, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, [b, 1, crop, crop], align_corners=False), mode="bilinear",
                      padding_mode="border", align_corners=False)
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.6), math.log(1.6), generator=g))
    x = ((x + 1) / 2).clamp(0, 1) ** gamma * 2 - 1
    blur = (torch.rand(b, generator=g) < 0.25).nonzero().flatten()
    if len(blur):
        f = int(torch.randint(2, 4, (1,), generator=g))
        small = F.interpolate(x[blur], scale_factor=1 / f, mode="area")
        x[blur] = F.interpolate(small, size=(crop, crop), mode="bilinear", align_corners=False)
    for i in (torch.rand(b, generator=g) < 0.25).nonzero().flatten().tolist():
        e = int(torch.randint(8, 21, (1,), generator=g))
        y0, x0 = (int(v) for v in torch.randint(0, crop - e + 1, (2,), generator=g))
        x[i, :, y0 : y0 + e, x0 : x0 + e] = 0.0
    return x


def train_cnn2(images_u8: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 128, seed: int = 0,
               hp: dict | None = None, log=None) -> JudgeNet2:
    """ArcFace training of JudgeNet2 on (M, 1, S, S) uint8 faces with labels (M,) 0..C-1 with AdamW and a
    linear-warmup cosine LR (``train_cnn``: CosFace, SGD one-cycle); eval-mode net."""
    hp = {**CNN2_HPARAMS, **(hp or {})}
    torch.manual_seed(61_000 + seed)
    g = torch.Generator().manual_seed(61_000 + seed)
    net = JudgeNet2(tuple(hp["widths"]), hp["crop"], hp["embedding"])
    head = MarginHead(hp["embedding"], int(labels.max()) + 1, "arcface", hp["s"], hp["m"])
    # weight decay on conv / linear weights and the class centres only (not BN, PReLU)
    decay = [p for p in list(net.parameters()) + list(head.parameters()) if p.dim() > 1]
    rest = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["wd"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=hp["lr"])
    warm = max(1, int(hp["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    return _fit_margin(net, head, opt, sched, images_u8, labels, steps, batch, g,
                       lambda x, gen: _augment2(x, hp["crop"], gen), "cnn2", log)


# ----------------------------------------------------------------------------------------------------
# "lda": LBP histograms + PCA + Fisher LDA
# ----------------------------------------------------------------------------------------------------


def _uniform_table() -> torch.Tensor:
    """256 LBP codes -> 59 bins: the 58 uniform patterns (<= 2 bit transitions around the circle) get one
    bin each, every other code the last bin (Ojala et al. 2002)."""
    tab, nxt = torch.full((256,), 58, dtype=torch.long), 0
    for c in range(256):
        bits = [(c >> i) & 1 for i in range(8)]
        if sum(bits[i] != bits[(i + 1) % 8] for i in range(8)) <= 2:
            tab[c], nxt = nxt, nxt + 1
    return tab


_UNIFORM = _uniform_table()


def lbp_features(x: torch.Tensor, grid: int = 7, crop: int = 48) -> torch.Tensor:
    """(N, 1, S, S) [-1, 1] -> (N, 2 * grid^2 * 59) square-rooted, per-cell normalised uniform-LBP histograms
    at radius 1 and 2 (8 neighbours each) on the centre ``crop``: texture codes are invariant to monotone
    lighting changes, which raw-pixel Fisherfaces are not."""
    x = _centre(x.float(), crop)[:, 0]
    n, s = x.shape[0], x.shape[-1]
    feats = []
    for r in (1, 2):
        p = F.pad(x.unsqueeze(1), (r, r, r, r), mode="replicate")[:, 0]
        code = torch.zeros(n, s, s, dtype=torch.long)
        offs = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]
        for bit, (dy, dx) in enumerate(offs):
            nb = p[:, r + dy : r + dy + s, r + dx : r + dx + s]
            code |= (nb >= x).long() << bit
        u = _UNIFORM[code]  # (N, s, s) in 0..58
        cell = s // grid
        u = u[:, : cell * grid, : cell * grid].reshape(n, grid, cell, grid, cell).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, -1)
        h = torch.zeros(n, grid * grid, 59).scatter_add_(2, u, torch.ones_like(u, dtype=torch.float))
        feats.append((h / h.sum(2, keepdim=True)).sqrt().flatten(1))
    return torch.cat(feats, 1)


class LdaModel(nn.Module):
    """LBP features -> centred -> PCA (whitened) -> LDA projection -> L2-normalised (N, D) embedding."""

    def __init__(self, mean: torch.Tensor, proj: torch.Tensor, grid: int, crop: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("proj", proj)
        self.grid, self.crop = grid, crop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = lbp_features(x, self.grid, self.crop)
        f = (f + lbp_features(x.flip(-1), self.grid, self.crop)) / 2  # mirror-averaged, as the CNN judge
        return F.normalize((f - self.mean) @ self.proj, dim=1)


def train_lda(images_u8: torch.Tensor, labels: torch.Tensor, pca: int, hp: dict | None = None, log=None) -> LdaModel:
    """Fit PCA-whitening and Fisher LDA on (M, 1, S, S) uint8 faces with labels (M,) 0..C-1."""
    hp = {**LDA_HPARAMS, **(hp or {})}
    x = to_float(images_u8)
    f = torch.cat([lbp_features(x[i : i + 512], hp["grid"], hp["crop"]) for i in range(0, len(x), 512)]).double()
    f = torch.cat([f, torch.cat([lbp_features(x[i : i + 512].flip(-1), hp["grid"], hp["crop"])
                                 for i in range(0, len(x), 512)]).double()])  # mirrors: twice the samples
    y = torch.cat([labels, labels])
    mean = f.mean(0)
    fc = f - mean
    k = min(pca, fc.shape[0] - 1, fc.shape[1])
    # randomised SVD (Halko et al.): the full SVD of the 13.8k x 5.8k LFW matrix took 10 min on one thread
    torch.manual_seed(0)
    _, sv, v = torch.svd_lowrank(fc.float(), q=min(k + 20, min(fc.shape)), niter=3)
    sv, v = sv[:k].double(), v[:, :k].double()
    w_pca = v / (sv / math.sqrt(fc.shape[0] - 1)).clamp_min(1e-8)  # whitened PCA (D, k)
    z = fc @ w_pca
    c = int(y.max()) + 1
    cnt = torch.zeros(c, dtype=torch.float64).index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
    mu = torch.zeros(c, k, dtype=torch.float64).index_add_(0, y, z) / cnt.view(-1, 1)
    zw = z - mu[y]
    sw = zw.t() @ zw / len(y) + hp["reg"] * torch.eye(k, dtype=torch.float64)
    sb = (mu * cnt.sqrt().view(-1, 1)).t() @ (mu * cnt.sqrt().view(-1, 1)) / len(y)
    # generalised eigenproblem Sb w = l Sw w through the Cholesky factor of Sw
    lc = torch.linalg.cholesky(sw)
    li = torch.linalg.inv(lc)
    ev, evec = torch.linalg.eigh(li @ sb @ li.t())
    d = min(hp["lda_dims"], c - 1, k)
    w_lda = li.t() @ evec[:, -d:].flip(1)
    if log:
        log(f"[judge lda] {len(y)} samples ({c} people), {f.shape[1]} LBP dims -> PCA {k} -> LDA {d}")
    return LdaModel(mean.float(), (w_pca @ w_lda).float(), hp["grid"], hp["crop"])


# ----------------------------------------------------------------------------------------------------
# Cache: train once per pool
# ----------------------------------------------------------------------------------------------------


def _budget(kind: str, budget) -> dict:
    table = SPECS[kind][1]
    return dict(table[budget]) if isinstance(budget, str) else dict(budget)


def _net_hparams(kind: str, budget: dict) -> dict:
    """The CNN kind's hyper-parameters with the budget's "widths", if it names any (the cache key covers both)."""
    return {**SPECS[kind][0], **({"widths": tuple(budget["widths"])} if "widths" in budget else {})}


def cache_path(pool, kind: str, budget="full", seed: int = 0, work: Path | str | None = None) -> Path:
    """Where the judge of this pool / kind / budget / seed is kept."""
    if kind not in KINDS:
        raise ValueError(f"judge kind must be one of {KINDS}, got {kind!r}")
    hp = SPECS[kind][0]
    spec = {"v": VERSION, "pool": pool.key(), "kind": kind, "hp": hp, "budget": _budget(kind, budget), "seed": seed}
    h = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    work = Path(work) if work is not None else project_root() / "out" / "privacy"
    return work / "cache" / f"judge_{pool.name}_{kind}_{h}.pt"


def load_judge(split, kind: str = DEFAULT_KIND, budget="full", seed: int = 0, work: Path | str | None = None,
               log=print) -> Judge:
    """The judge of ``split.judge`` (a data.FacePool): from the cache when there, else trained and cached.

    The victims are not enrolled: call ``judge.enroll(split.victim_train.images, split.victim_train.labels)``
    (or ``clean_rank1``). ``judge.info`` holds {"kind", "pool", "cached", "train_s", "path", ...}."""
    pool = split
    if hasattr(split, "judge"):
        if split.judge is None:
            split.judge_pool  # raises why the split has no pool (LFW absent)
        pool = split.judge
    path = cache_path(pool, kind, budget, seed, work)
    if path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=False)
        info = {**ck["info"], "cached": True, "path": str(path)}
        log(f"[judge] {kind} judge of pool {pool.name} from {path}")
    else:
        b = _budget(kind, budget)
        t0 = time.time()
        imgs, labs = _pool_faces(pool, SPECS[kind][0], b, seed)
        t1 = time.time()
        log(f"[judge] training the {kind} judge on pool {pool.name}: {len(imgs)} images of {int(labs.max()) + 1} people "
            f"(read in {t1 - t0:.0f} s)")
        if kind in ("cnn", "cnn2"):
            train = train_cnn if kind == "cnn" else train_cnn2
            model = train(imgs, labs, b["steps"], b["batch"], seed, hp=_net_hparams(kind, b), log=log)
            state = {"net": model.state_dict()}
        else:
            model = train_lda(imgs, labs, b["pca"], log=log)
            state = {"lda": model.state_dict(), "grid": model.grid, "crop": model.crop}
        info = {"kind": kind, "pool": pool.name, "pool_key": pool.key(), "pool_images": len(imgs),
                "pool_people": int(labs.max()) + 1, "budget": b, "seed": seed, "train_s": time.time() - t1,
                "version": VERSION}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"info": info, **state}, tmp)
        tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated cache entry
        info = {**info, "cached": False, "path": str(path)}
        log(f"[judge] {kind} judge trained in {info['train_s']:.0f} s -> {path}")
        ck = {"info": info, **state}
    if kind in ("cnn", "cnn2"):
        hp = _net_hparams(kind, ck["info"]["budget"])
        net = (JudgeNet(tuple(hp["widths"]), hp["crop"], hp["embedding"]) if kind == "cnn" else
               JudgeNet2(tuple(hp["widths"]), hp["crop"], hp["embedding"]))
        net.load_state_dict(ck["net"])
        return Judge(_CnnEmbedder(net), kind, info)
    st = ck["lda"]
    return Judge(LdaModel(st["mean"], st["proj"], ck["grid"], ck["crop"]), kind, info)
