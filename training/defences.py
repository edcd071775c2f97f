"""Privacy defences, all built on fastmix's public API and selected by ``defence.name``.

Each defence maps a batch of [-1, 1] faces (N, C, S, S) and labels (N,) to what the FR network sees, plus
the partner labels (M, k) and weights (M, k) of the mixed-label loss (k = 1, weight 1 when nothing is mixed):

    none         RGB / grey pixels, untouched (the baseline).
    freq         fastmix.frontend, every channel kept, nothing mixed (the frequency baseline).
    ppfr         PPFR-FD style: frontend with the lowest frequencies dropped (u + v < drop_lowest; 1 = DC only).
    partialface  PartialFace style: the 10 highest-energy channels per colour dropped (fastmix's "partialface"
                 keep preset), the rest split into ``partialface_subsets`` fixed random subsets, and every face
                 sees one random subset (one frontend call per subset, keep = that subset); the other
                 channels are zero.
    dctdp        DCTDP style: frontend with the DC dropped, then Laplace noise per channel with a learnable
                 budget: eps_c = E * n * softmax(theta)_c (sum of budgets fixed at E * n), scale
                 b_c = sensitivity / eps_c on coefficients divided by 128; theta trains with the FR loss.
    instahide    InstaHide in the frequency domain: HybridMask(k, every channel kept, sign flip on).
    hybrid       fixed-k hybrid mask: HybridMask(k, keep, sign_flip) (k = 2..6).
    adaptive     hybrid mask whose k comes from the strategy network (policy.py), per batch or per sample:
                 HybridMask(max k) with a per-sample k tensor (unused partners padded with zero weight). With
                 ``partners: pool`` and ``policy.privacy_signal: s5_proxy`` the network's privacy reward is the
                 client's own run of S5 on its stream (training/exposure.py; issue 15, item 2).

Stream-attack options of the mixing defences (hybrid / adaptive / instahide; issue 15; S5 is
``training/privacy/stream.py``). Defaults reproduce the plain hybrid mask:

    mix_weights   "image": one weight per partner (M, k); "frequency": an independent weight row per DCT
                  frequency (M, k, 64), so no single mixing matrix holds for the whole stream (the loss gets
                  the frequency-mean weights).
    noise         "none" | "gaussian" | "laplace": noise added to every released coefficient after mixing, std
                  (Gaussian) or scale (Laplace) ``noise_scale`` x the coefficient range of its frequency
                  (``coefficient_range``): a data-independent scale, so a per-release DP bound exists
                  (``dp_bound``; the bound of the continuous mechanism: the fused sampler draws from a table of
                  atoms, see fastmix/ops/noise.py). Drawn inside the fused frontend (``noise=``) from a seed the
                  defence's generator draws: no noise tensor is materialised.
    partners      "batch": partners from the batch (``self_partner`` false: never the face itself);
                  "pool": every partner from a public face pool held by the client (``pool``, ``pool_size``
                  faces), InstaHide's cross-dataset mode; pool partners carry no label (loss weight 0, the
                  private weights renormalised), so the server learns nothing about them.
    sign_key      with ``sign_flip``: "coefficient" (fastmix's one-time key per coefficient), "channel" (one
                  sign per output and channel) or "block" (one sign per output and 8x8 block position).

Test-time encoding (``encode_eval``) keeps each defence's masking (keep set, noise, sign flip, subsets) but does
not mix unless ``defence.eval_mix`` is set: a query face is not blended with other people's faces at
inference. Its randomness comes from a separate generator so evaluation never moves the training streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fastmix
from fastmix.nn import HybridMask, keep_ids

from .data import to_float

MIX_WEIGHTS = ("image", "frequency")
NOISES = ("none", "gaussian", "laplace")
PARTNERS = ("batch", "pool")
SIGN_KEYS = ("coefficient", "channel", "block")
POOLS = ("lfw",)
NAMES = ("none", "freq", "ppfr", "partialface", "dctdp", "instahide", "hybrid", "adaptive")
FREQS = 64


@dataclass
class Masked:
    x: torch.Tensor  # (M, C_out, H_out, W_out): what the FR network sees
    labels: torch.Tensor  # (M, k) partner labels
    weights: torch.Tensor  # (M, k) mixing weights (rows sum to 1; zeros pad a per-sample k)
    # The client's own bookkeeping, never part of what the server receives (None where the weights above say it):
    # the faces mixed into each row (M,) -- pool partners carry loss weight 0, so the weights count 1 -- and the
    # row's own face's mixing weight (M,) (its frequency mean with per-frequency weights), which the S5 proxy
    # of the adaptive policy uses (training/exposure.py).
    mixed: torch.Tensor | None = None
    own: torch.Tensor | None = None


def _identity(x, y):
    n = x.shape[0]
    return y.view(n, 1), torch.ones(n, 1, device=x.device)


class Defence(nn.Module):
    """Base: frontend with a fixed keep set, nothing mixed (``freq``); subclasses override the pieces."""

    name = "freq"
    mixes = False  # the output depends on partners (k)
    adaptive = False  # k comes from the policy

    def __init__(self, cfg: dict, channels: int, size: int, device, seed: int):
        super().__init__()
        self.cfg, self.c, self.size = cfg, channels, size
        self.upsample = int(cfg["upsample"])
        self.color = "none" if channels == 1 else "ycbcr"
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ids = self.kept_ids()

    # -- configuration ------------------------------------------------------------------------------
    def kept_ids(self) -> list[int] | None:
        return None

    def n_out(self) -> int:
        return self.c * FREQS if self.ids is None else len(self.ids)

    def out_shape(self) -> tuple[int, int]:
        """(channels, spatial size) of the network input."""
        return self.n_out(), self.size * self.upsample // 8

    def frontend(self, x, keep=None, **kw):
        return fastmix.frontend(x, upsample=self.upsample, color=self.color, keep=keep, **kw)

    # -- encoding -----------------------------------------------------------------------------------
    def forward(self, x, y, k=None) -> Masked:
        return Masked(self.frontend(x, keep=self.ids), *_identity(x, y))

    def encode_eval(self, x, generator: torch.Generator) -> torch.Tensor:
        return self.frontend(x, keep=self.ids)

    def encode_alone(self, x) -> torch.Tensor:
        """One face alone, unmixed, unsigned, noise-free, in the released units: the space in which S5 scores a
        recovered face (``privacy.stream.unmixed_space``) and the S5 proxy compares its estimates. The keep-set
        block DCT here; pixels for ``none``, and DCTDP's 1/128 scale (so that a noise-free repeat average of its
        releases lands on it)."""
        return self.frontend(x, keep=self.ids)

    # -- resumable randomness ------------------------------------------------------------------------
    def generators(self) -> dict[str, torch.Generator]:
        return {"defence": self.generator}

    def extra_repr(self):
        c, s = self.out_shape()
        return f"{self.name}: ({self.c}, {self.size}, {self.size}) -> ({c}, {s}, {s}), upsample={self.upsample}, color={self.color}"


class NoDefence(Defence):
    name = "none"

    def out_shape(self):
        return self.c, self.size

    def forward(self, x, y, k=None):
        return Masked(x, *_identity(x, y))

    def encode_eval(self, x, generator):
        return x

    def encode_alone(self, x):
        return x


class PPFR(Defence):
    name = "ppfr"

    def kept_ids(self):
        r = int(self.cfg["drop_lowest"])
        return [ch for ch in range(self.c * FREQS) if (ch % FREQS) // 8 + (ch % FREQS) % 8 >= r]


class PartialFace(Defence):
    name = "partialface"

    def __init__(self, cfg, channels, size, device, seed):
        super().__init__(cfg, channels, size, device, seed)
        s = int(cfg["partialface_subsets"])
        g = torch.Generator().manual_seed(seed + 7919)  # the partition is fixed for the run
        perm = torch.randperm(len(self.ids), generator=g)
        # subsets[j]: positions (into the kept channels) of subset j, ascending (frontend's output order)
        self.subsets = [torch.sort(p).values for p in perm.chunk(s)]

    def kept_ids(self):
        return keep_ids("partialface", self.c)

    def _encode(self, x, generator):
        n = x.shape[0]
        out = x.new_zeros((n, len(self.ids), self.size * self.upsample // 8, self.size * self.upsample // 8))
        pick = torch.randint(len(self.subsets), (n,), generator=generator, device=generator.device).to(x.device)
        for j, pos in enumerate(self.subsets):
            rows = (pick == j).nonzero().flatten()
            if rows.numel():
                ids = [self.ids[p] for p in pos.tolist()]
                out[rows.view(-1, 1), pos.to(x.device).view(1, -1)] = self.frontend(x[rows], keep=ids)
        return out

    def forward(self, x, y, k=None):
        return Masked(self._encode(x, self.generator), *_identity(x, y))

    def encode_eval(self, x, generator):
        if self.cfg["partialface_eval"] == "all":
            return self.frontend(x, keep=self.ids)
        return self._encode(x, generator)


class DCTDP(Defence):
    name = "dctdp"
    SCALE = 128.0  # coefficients / 128: an AC coefficient of one 8x8 block is at most 8 * 255 / 128 ~ 16

    def __init__(self, cfg, channels, size, device, seed):
        super().__init__(cfg, channels, size, device, seed)
        self.theta = nn.Parameter(torch.zeros(len(self.ids)))

    def kept_ids(self):
        return keep_ids("no_dc", self.c)

    def epsilons(self) -> torch.Tensor:
        n = self.theta.numel()
        return float(self.cfg["dctdp_epsilon"]) * n * torch.softmax(self.theta, 0)

    def _noisy(self, x, generator):
        z = self.frontend(x, keep=self.ids) / self.SCALE
        b = float(self.cfg["dctdp_sensitivity"]) / self.epsilons()
        # Laplace(0, 1) = E1 - E2 with E exponential(1); drawn from our generator (resumable).
        u = torch.rand((2,) + z.shape, generator=generator, device=generator.device).to(z.device)
        lap = torch.log(u[0].clamp_min(1e-12)) - torch.log(u[1].clamp_min(1e-12))
        return z + b.to(z.dtype).view(1, -1, 1, 1) * lap.to(z.dtype)

    def forward(self, x, y, k=None):
        return Masked(self._noisy(x, self.generator), *_identity(x, y))

    def encode_eval(self, x, generator):
        return self._noisy(x, generator)

    def encode_alone(self, x):
        return super().encode_alone(x) / self.SCALE


class Mixing(Defence):
    """HybridMask-based defences: instahide, hybrid (fixed k) and adaptive (k from the policy)."""

    name = "hybrid"
    mixes = True

    def __init__(self, cfg, channels, size, device, seed):
        super().__init__(cfg, channels, size, device, seed)
        self.k = self.max_k()
        self.mask = HybridMask(
            self.k, law=cfg["law"], upper=float(cfg["upper"]), alpha=float(cfg["alpha"]), keep=self.keep_preset(),
            sign_flip=self.sign_flip(), upsample=self.upsample, color=self.color, generator=self.generator,
        )
        # Partners drawn from the global batch (DDP): one permutation stream shared by every rank (same seed
        # on all ranks), so each rank computes only its own rows of the same global mix.
        self.partner_generator = torch.Generator(device=device).manual_seed(int(cfg.get("_base_seed", seed)) + 104729)
        # issue 15's stream-attack options (module docstring); .get: configs built before them still load
        self.mix_weights = cfg.get("mix_weights", "image")
        self.noise = cfg.get("noise", "none")
        self.noise_scale = float(cfg.get("noise_scale", 0.0))
        self.partners = cfg.get("partners", "batch")
        self.self_partner = bool(cfg.get("self_partner", True))
        self.sign_key = cfg.get("sign_key", "coefficient")
        self.pool = load_pool(cfg.get("pool", "lfw"), self.size, int(cfg.get("pool_size", 2000)), seed=int(cfg.get("_base_seed", seed)),
                              channels=channels) if self.partners == "pool" else None
        sigma = coefficient_range()[torch.tensor([i % FREQS for i in (self.ids or range(channels * FREQS))])]
        self.register_buffer("sigma", (self.noise_scale * sigma).float().view(1, -1, 1, 1), persistent=False)
        # the same scales per frequency (64,), the form the fused op takes (fastmix.frontend noise_scale=)
        self.register_buffer("noise_freq_scale", (self.noise_scale * coefficient_range()).float(), persistent=False)

    def custom(self) -> bool:
        """True when a stream-attack option is set: the draws and the op run here, not in HybridMask."""
        return (self.mix_weights != "image" or self.noise != "none" or self.partners != "batch" or not self.self_partner
                or (self.sign_flip() and self.sign_key != "coefficient"))

    def _encode(self, x, y, k, gen, mix: bool = True) -> Masked:
        """Partners (batch without self, or the client's pool), weights (per image or per frequency), the fused
        frontend, then noise and channel / block signs. ``mix`` False: each face alone (test time)."""
        n, kmax = x.shape[0], (self.k if mix else 1)
        dev = gen.device
        own = torch.arange(n, device=dev).view(n, 1)
        xs = x
        if kmax == 1:
            index = own
        elif self.partners == "pool":
            pick = torch.randint(self.pool.shape[0], (n * (kmax - 1),), generator=gen, device=dev)
            px = to_float(self.pool[pick.cpu()].to(x.device))
            flip = (torch.rand(n * (kmax - 1), generator=gen, device=dev) < 0.5).to(x.device).view(-1, 1, 1, 1)
            xs = torch.cat([x, torch.where(flip, px.flip(-1), px)])  # pool faces mirrored like the batch's
            index = torch.cat([own, n + torch.arange(n * (kmax - 1), device=dev).view(n, kmax - 1)], 1)
        else:
            index = fastmix.sample_partners(n, kmax, generator=gen)
            if not self.self_partner:
                index = no_self(index, gen)
        active = None if (k is None or not mix) else k.to(dev)
        law, up, al = self.cfg["law"], float(self.cfg["upper"]), float(self.cfg["alpha"])
        if self.mix_weights == "frequency" and kmax > 1:
            act = None if active is None else active.repeat_interleave(FREQS)
            w = fastmix.sample_weights(n * FREQS, kmax, law, up, al, generator=gen, active=act)
            w = w.view(n, FREQS, kmax).permute(0, 2, 1).contiguous()  # (M, k, 64)
            loss_w = w.mean(2)  # rows still sum to 1: the label mix of the average frequency
        else:
            w = fastmix.sample_weights(n, kmax, law, up, al, generator=gen, active=active) if kmax > 1 \
                else torch.ones(n, 1, device=dev)
            loss_w = w
        coef_key = self.sign_flip() and self.sign_key == "coefficient"
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=dev).item()) if coef_key else None
        z = self.frontend(xs, keep=self.ids, index=index.to(x.device), weight=w.to(x.device), seed=seed,
                          **self._noise_args(gen))
        if self.sign_flip() and self.sign_key != "coefficient":
            shape = (n, z.shape[1], 1, 1) if self.sign_key == "channel" else (n, 1, z.shape[2], z.shape[3])
            key = torch.randint(0, 2, shape, generator=gen, device=dev).to(z.device, z.dtype) * 2 - 1
            z = z * key
        labels = y[index.clamp_max(n - 1).to(y.device)]
        mixed = own = None
        if self.partners == "pool" and kmax > 1:
            # pool faces have no label here: the loss sees the private face only (weight 1, the others 0)
            labels = y.view(n, 1).expand(n, kmax).clone()
            own = (w[:, 0].mean(-1) if w.dim() == 3 else w[:, 0]).to(x.device)  # column 0 is the face itself
            mixed = (active if active is not None else torch.full((n,), kmax, dtype=torch.int64, device=dev)).to(x.device)
            loss_w = torch.zeros(n, kmax, device=dev)
            loss_w[:, 0] = 1.0
        return Masked(z, labels, loss_w.to(x.device), mixed=mixed, own=own)

    def _noise_args(self, gen) -> dict:
        """The fused op's noise arguments: the kind, a fresh noise seed from our generator (resumable), and the
        per-frequency scale; added after the frontend's mixing and coefficient signs, before the channel /
        block signs below, as the materialised noise it replaces."""
        if self.noise == "none" or self.noise_scale == 0.0:
            return {}
        nseed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
        return {"noise": self.noise, "noise_seed": nseed, "noise_scale": self.noise_freq_scale}

    def max_k(self) -> int:
        return int(self.cfg["k"])

    def keep_preset(self):
        return self.cfg["keep"]

    def sign_flip(self) -> bool:
        return bool(self.cfg["sign_flip"])

    def kept_ids(self):
        return keep_ids(self.keep_preset(), self.c)

    def forward(self, x, y, k=None):
        n = x.shape[0]
        if k is None:
            k = torch.full((n,), self.k, dtype=torch.int64)
        elif isinstance(k, int):
            k = torch.full((n,), k, dtype=torch.int64)
        k = k.to(self.generator.device)
        if self.custom():
            # the stream-attack options run single-process (the global-batch path draws through HybridMask)
            return self._encode(x, y, k, self.generator)
        if self.cfg["global_partners"] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return self._global(x, y, k)
        masked, labels, weights = self.mask(x, y, k=k)
        return Masked(masked, labels, weights.to(x.device))

    def _global(self, x, y, k):
        """Mix with partners from every rank's batch: all_gather the faces (no gradient: they are data), draw
        the global partner permutation from the shared stream, keep this rank's rows; the weights and the sign
        key come from this rank's stream (``HybridMask.plan`` with an external index)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        n = x.shape[0]
        xs = [torch.empty_like(x) for _ in range(world)]
        ys = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(xs, x.contiguous())
        dist.all_gather(ys, y.contiguous())
        xg, yg = torch.cat(xs), torch.cat(ys)
        kmax = torch.tensor([int(k.max())], device=x.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(kmax, op=dist.ReduceOp.MAX)
        kmax = int(kmax.item())
        index = fastmix.sample_partners(n * world, kmax, generator=self.partner_generator)
        p = self.mask.plan(index=index[rank * n : (rank + 1) * n], k=k)
        z, labels, weights = self.mask(xg, yg, plan=p)
        return Masked(z, labels, weights)

    def encode_eval(self, x, generator):
        """Test-time encoding: the same keep set and sign flips, partners only with ``defence.eval_mix``."""
        n = x.shape[0]
        if self.custom():
            y = torch.zeros(n, dtype=torch.int64, device=x.device)
            return self._encode(x, y, None, generator, mix=bool(self.cfg["eval_mix"])).x
        if self.cfg["eval_mix"]:
            p = self.mask.plan(n, generator=generator)
        else:  # each face alone (k = 1, weight 1)
            p = self.mask.plan(index=torch.arange(n, device=generator.device).view(n, 1), generator=generator)
        return self.mask.apply(x, p)

    def generators(self):
        return {"defence": self.generator, "partners": self.partner_generator}

    def extra_repr(self):
        return super().extra_repr() + f"\nmask: {self.mask.extra_repr()}"


class InstaHide(Mixing):
    name = "instahide"

    def keep_preset(self):
        return "all"

    def sign_flip(self):
        return True


class Adaptive(Mixing):
    name = "adaptive"
    adaptive = True

    def max_k(self):
        return int(max(self.cfg["k_choices"]))


def no_self(index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Partner index (M, k) whose partner columns 1.. never hold the row itself: each fixed point of a column's
    permutation is swapped with a random other row of that column (still a permutation). fastmix's
    sample_partners allows them: at k = 2 about 60 % of ORL training faces appeared unmixed at least once in
    a 120-step stream (measured by the lead), a free unmixed copy for the server."""
    n = index.shape[0]
    if n < 2:
        return index
    index = index.clone()
    rows = torch.arange(n, device=index.device)
    for j in range(1, index.shape[1]):
        while True:
            fixed = (index[:, j] == rows).nonzero().flatten()
            if fixed.numel() == 0:
                break
            i = int(fixed[0])
            r = (i + 1 + int(torch.randint(n - 1, (1,), generator=gen, device=gen.device))) % n
            index[i, j], index[r, j] = index[r, j].clone(), index[i, j].clone()
    return index


def coefficient_range() -> torch.Tensor:
    """(64,) float64: the range (max - min) of each 8x8 block-DCT coefficient over images in [0, 255]:
    255 x sum |basis(u, v)| (the DC's is 8 x 255; fastmix's DCT is orthonormal). A face replaced by any
    other moves a coefficient by at most this, times its mixing weight: the sensitivity the noise scale is
    calibrated to, so the scale is data-independent and the DP bound (``dp_bound``) holds."""
    d = fastmix.dct_matrix(8).double()
    basis = d.view(8, 1, 8, 1) * d.view(1, 8, 1, 8)  # (u, v, i, j)
    return 255.0 * basis.abs().sum((2, 3)).flatten()


def dp_bound(noise: str, scale: float, upper: float, coefficients: int, releases: int = 1, delta: float = 1e-5) -> dict:
    """Per-release (and per-run, ``releases`` releases of one face) DP bound of the mixing + noise defence for
    one face replaced by any other (add/remove is not the protocol's unit). A face's weight in a coefficient is
    at most ``upper``, its coefficient moves by at most its range, the noise is ``scale`` x that range:
    Laplace: eps = coefficients x upper / scale (L1 over the release's coefficients; basic composition
    over releases); Gaussian: mu-GDP with mu = upper sqrt(coefficients) / scale (Dong et al. 2019;
    sqrt(releases) over a run), eps at ``delta`` from the GDP-to-(eps, delta) curve."""
    if noise == "none" or scale <= 0:
        return {"eps_release": math.inf, "eps_run": math.inf, "delta": 0.0}
    if noise == "laplace":
        e = coefficients * upper / scale
        return {"eps_release": e, "eps_run": e * releases, "delta": 0.0}
    mu = upper * math.sqrt(coefficients) / scale
    return {"mu_release": mu, "eps_release": gdp_eps(mu, delta), "eps_run": gdp_eps(mu * math.sqrt(releases), delta),
            "delta": delta}


def gdp_eps(mu: float, delta: float) -> float:
    """The smallest eps with delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta (bisection;
    log-space tails: mu is in the hundreds for any useful noise)."""
    def log_phi(t):  # log Phi(t), stable for very negative t
        return math.log(0.5 * math.erfc(-t / math.sqrt(2))) if t > -30 else -t * t / 2 - math.log(-t * math.sqrt(2 * math.pi))

    def dlt(e):
        a, b = log_phi(-e / mu + mu / 2), e + log_phi(-e / mu - mu / 2)
        return math.exp(a) - math.exp(b) if a > b else 0.0

    lo, hi = 0.0, 1.0
    while dlt(hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dlt(mid) > delta else (lo, mid)
    return hi


_POOLS: dict = {}


def load_pool(name: str, size: int, count: int, seed: int, channels: int = 1) -> torch.Tensor:
    """The client's public partner pool (count, C, size, size) uint8, never sent to the server.

    "lfw": LFW images of people with fewer than 10 images (the privacy split draws LFW victims from people
    with >= 10, so no victim is in the pool; ORL victims are other people by construction), centre 128x128
    as training/configs/lfw_cpu.yaml, ``count`` of them drawn by ``seed``. Cached in memory and under
    out/cache (decoding thousands of JPEGs takes a while on 2 cores)."""
    if name not in POOLS:
        raise ValueError(f"defence.pool must be one of {POOLS}, got {name!r}")
    key = (name, size, count, seed, channels)
    if key in _POOLS:
        return _POOLS[key]
    from .config import project_root
    from .data import data_root, decode_image

    cache = project_root() / "out" / "cache" / f"pool_{name}_{size}_{count}_{seed}_{channels}.pt"
    if cache.is_file():
        faces = torch.load(cache, weights_only=True)
    else:
        root = data_root() / "lfw"
        if not root.is_dir():
            raise FileNotFoundError(f"defence.partners=pool needs LFW at {root} (see ../shared/data/DATA.md)")
        files = []
        for person in sorted(p for p in root.iterdir() if p.is_dir()):
            imgs = sorted(person.iterdir())
            if len(imgs) < 10:
                files += imgs
        g = torch.Generator().manual_seed(seed + 31337)
        pick = torch.randperm(len(files), generator=g)[:count].tolist()
        color = "grey" if channels == 1 else "rgb"
        out = [decode_image(Path(files[i]).read_bytes(), color, size, 128, str(files[i])) for i in pick]
        faces = torch.stack([f for f in out if f is not None])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(faces, cache)
    _POOLS[key] = faces
    return faces


CLASSES = {
    "none": NoDefence, "freq": Defence, "ppfr": PPFR, "partialface": PartialFace, "dctdp": DCTDP,
    "instahide": InstaHide, "hybrid": Mixing, "adaptive": Adaptive,
}


def build_defence(cfg: dict, channels: int, device, seed: int) -> Defence:
    """The defence named by ``cfg["defence"]["name"]`` for faces of ``channels`` x ``data.size``^2."""
    d = dict(cfg["defence"])
    d["_base_seed"] = int(cfg["seed"])
    name = d["name"]
    if name not in CLASSES:
        raise ValueError(f"defence.name must be one of {NAMES}, got {name!r}")
    size = int(cfg["data"]["size"])
    if name != "none" and (size * int(d["upsample"])) % 8:
        raise ValueError(f"data.size * defence.upsample must be a multiple of 8, got {size} * {d['upsample']}")
    if name == "hybrid" and not 1 <= int(d["k"]) <= 6:
        raise ValueError(f"defence.k must be in 1..6 for the hybrid mask, got {d['k']}")
    return CLASSES[name](d, channels, size, device, seed)

