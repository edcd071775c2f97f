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
                 HybridMask(max k) with a per-sample k tensor (unused partners padded with zero weight).

Test-time encoding (``encode_eval``) keeps each defence's masking (keep set, noise, sign flip, subsets) but does
not mix unless ``defence.eval_mix`` is set: a query face is not blended with other people's faces at
inference. Its randomness comes from a separate generator so evaluation never moves the training streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import fastmix
from fastmix.nn import HybridMask, keep_ids

NAMES = ("none", "freq", "ppfr", "partialface", "dctdp", "instahide", "hybrid", "adaptive")
FREQS = 64


@dataclass
class Masked:
    x: torch.Tensor  # (M, C_out, H_out, W_out): what the FR network sees
    labels: torch.Tensor  # (M, k) partner labels
    weights: torch.Tensor  # (M, k) mixing weights (rows sum to 1; zeros pad a per-sample k)


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

