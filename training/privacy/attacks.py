"""S1 / S2 of the threat model (THREAT_MODEL.md): reconstruction by a U-Net decoder trained on the attacker's
own faces, and the deployed model (``DefendedModel``) that S3 / S4 invert (inversion.py). S5, the training
stream attack, is stream.py.

Every protected representation is produced by the defence itself, or for the mixing defences by its
``HybridMask`` through ``plan`` / ``apply`` (the plan gives the partner index an evaluation needs: which face
dominates each mix); the attacker's pseudo-inverse is ``fastmix.frontend_inverse``. Nothing here
re-implements a mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastmix
from training.data import to_float
from training.defences import Defence, Mixing

# ----------------------------------------------------------------------------------------------------
# Protected representations (what leaves the client) and the attacker's pseudo-inverse
# ----------------------------------------------------------------------------------------------------


@dataclass
class Protected:
    z: torch.Tensor  # (N, C_out, h, w) the representation the FR server sees
    target: torch.Tensor  # (N,) row of the source batch the attack should recover (dominant partner)
    seed: int | None  # the one-time sign key of this batch (known to the attacker only in S2)


def sample_k(k_dist: dict[int, float] | None, n: int, default: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) k per face: ``default`` or drawn from ``k_dist`` {k: probability} (the adaptive policy's settled law)."""
    if not k_dist:
        return torch.full((n,), default, dtype=torch.int64)
    ks = torch.tensor(sorted(k_dist), dtype=torch.int64)
    p = torch.tensor([float(k_dist[k]) for k in sorted(k_dist)])
    return ks[torch.multinomial(p / p.sum(), n, replacement=True, generator=generator)]


def protect(defence: Defence, x: torch.Tensor, generator: torch.Generator, k_dist=None) -> Protected:
    """Training-time protected representation of a batch of [-1, 1] faces x (N, C, S, S).

    Mixing defences (instahide, hybrid, adaptive): partners within the batch, weights by the defence's law,
    a fresh sign key when the defence flips signs; the target of row m is its largest-weight partner
    (InstaHide-attack convention: the face that dominates the mix). Other defences: the defence's own
    forward (its randomness from ``generator``), target = the row itself.
    """
    n = x.shape[0]
    rows = torch.arange(n)
    with torch.no_grad():
        if isinstance(defence, Mixing):
            m = defence.mask
            k = sample_k(k_dist, n, defence.k, generator) if defence.adaptive else torch.full((n,), defence.k, dtype=torch.int64)
            index = fastmix.sample_partners(n, int(k.max()), generator=generator)
            p = m.plan(index=index, k=k, generator=generator)
            return Protected(m.apply(x, p), p.index[rows, p.weight.argmax(1)], p.seed)
        saved = defence.generator
        defence.generator = generator  # PartialFace subsets / DCTDP noise drawn from the attack's stream
        try:
            z = defence(x, torch.zeros(n, dtype=torch.long)).x
        finally:
            defence.generator = saved
        return Protected(z, rows, None)


def pseudo_inverse(defence: Defence, z: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """The attacker's linear inverse of a representation to a (N, C, S, S) image: ``fastmix.frontend_inverse``
    with the defence's keep set (removed channels zero; DCTDP's 1/128 scale undone). With the sign key
    (S2) the signs are removed first: flipping is an involution, so re-applying ``fastmix.frontend`` with the
    same seed to the signed image gives the unsigned channels (the key is a function of output row,
    channel and block, which the round trip preserves)."""
    if defence.name == "none":
        return z
    if defence.name == "dctdp":
        z = z * defence.SCALE
    inv = dict(upsample=defence.upsample, color=defence.color, keep=defence.ids, channels=defence.c)
    if seed is not None:
        z = defence.frontend(fastmix.frontend_inverse(z, **inv), keep=defence.ids, seed=seed)
    return fastmix.frontend_inverse(z, **inv)


# ----------------------------------------------------------------------------------------------------
# S1 / S2: U-Net decoder trained on the attacker's own faces (other identities)
# ----------------------------------------------------------------------------------------------------


def _block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                         nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015): 3 scales, widths w, 2w, 4w, skip connections, tanh output.
    (N, C_in, S, S) -> (N, C_out, S, S), S divisible by 4."""

    def __init__(self, c_in: int = 1, c_out: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.e1, self.e2, self.e3 = _block(c_in, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.u2, self.d2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), _block(4 * w, 2 * w)
        self.u1, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, 2), _block(2 * w, w)
        self.out = nn.Conv2d(w, c_out, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        c = self.e3(F.max_pool2d(b, 2))
        d = self.d2(torch.cat([self.u2(c), b], 1))
        e = self.d1(torch.cat([self.u1(d), a], 1))
        return torch.tanh(self.out(e))


class Decoder(nn.Module):
    """Representation -> image: the pseudo-inverse (fixed, the attacker knows the algorithm) then a U-Net.
    The pseudo-inverse is scaled by a fixed per-defence factor so the U-Net input has unit spread."""

    def __init__(self, defence: Defence, width: int = 16, sign_known: bool = False):
        super().__init__()
        self.defence, self.sign_known = defence, sign_known
        self.net = UNet(defence.c, defence.c, width)
        self.register_buffer("scale", torch.ones(()))

    def prepare(self, p: Protected) -> torch.Tensor:
        with torch.no_grad():
            return pseudo_inverse(self.defence, p.z, p.seed if self.sign_known else None) / self.scale

    def forward(self, p: Protected) -> torch.Tensor:
        return self.net(self.prepare(p))


def train_decoder(defence: Defence, faces_u8: torch.Tensor, *, sign_known: bool = False, steps: int = 300, batch: int = 32,
                  lr: float = 2e-3, width: int = 16, seed: int = 0, k_dist=None, log=None, encode=None) -> Decoder:
    """S1 (sign_known=False) / S2 (True): train a Decoder on the attacker's faces (N, C, S, S) uint8.

    Every step protects a fresh random batch of the attacker's faces with the defence (fresh partners,
    weights, keys: the attacker can simulate the algorithm as often as it likes) and regresses the target
    face with L1 + (1 - SSIM-free) MSE. Horizontal flips augment the 200 faces.

    ``encode(x, generator) -> Protected`` replaces the defence's training-time protection with another
    representation of the same faces (S5 decodes unmixed sources and per-cluster |z| means this way)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encode = encode or (lambda x, gen: protect(defence, x, gen, k_dist))
    dec = Decoder(defence, width, sign_known)
    with torch.no_grad():  # input scale from one batch: the spread of the pseudo-inverse
        x0 = to_float(faces_u8[:64])
        dec.scale.fill_(float(dec.prepare(encode(x0, g)).std().clamp_min(1e-3)))
    opt = torch.optim.Adam(dec.net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    n = faces_u8.shape[0]
    dec.train()
    for step in range(steps):
        idx = torch.randint(n, (batch,), generator=g)
        x = to_float(faces_u8[idx])
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        p = encode(x, g)
        out = dec(p)
        tgt = x[p.target]
        loss = F.l1_loss(out, tgt) + F.mse_loss(out, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            log(f"    decoder {defence.name} S{'2' if sign_known else '1'} step {step + 1}/{steps} loss {float(loss):.4f}")
    dec.eval()
    return dec


@torch.no_grad()
def reconstruct(dec: Decoder, faces_u8: torch.Tensor, seed: int = 0, batch: int = 40, k_dist=None):
    """Protect the victims' faces (N, C, S, S) uint8 in random batches of ``batch`` (training-time mixing
    among victims) and decode. Returns (protected pseudo-inverse for display, reconstruction, target row),
    row j being the mix that holds victim j's face, with the target row into faces_u8 (the dominant partner
    for mixing defences)."""
    n = faces_u8.shape[0]
    g = torch.Generator().manual_seed(10_000 + seed)
    # Victim sets are ordered by identity: consecutive batches of 40 would hold ~7 people, so partners would
    # share the dominant face's identity about twice as often as in training's shuffled batches (measured:
    # 0.14 / 0.43 / 0.72 such partners per mix at k = 2 / 4 / 6 on ORL, against 0.07 / 0.20 / 0.33), a leak overstated.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(20_000 + seed))
    shown, recon, target = [], [], []
    for i in range(0, n, batch):
        rows = perm[i : i + batch]
        p = protect(dec.defence, to_float(faces_u8[rows]), g, k_dist)
        shown.append(pseudo_inverse(dec.defence, p.z))
        recon.append(dec(p))
        target.append(rows[p.target])
    at = torch.empty_like(perm)
    at[perm] = torch.arange(n)  # victim j's mix sits at position at[j] of the processing order
    return torch.cat(shown)[at], torch.cat(recon)[at], torch.cat(target)[at]


# ----------------------------------------------------------------------------------------------------
# S3 / S4: model inversion of the defended FR model
# ----------------------------------------------------------------------------------------------------


class DefendedModel(nn.Module):
    """The deployed FR model: the defence's test-time encoding (fastmix front-end: masked, not mixed; fresh
    sign keys / noise / subsets per call) -> backbone -> normalised class scores s * cos(theta_c)."""

    def __init__(self, defence: Defence, backbone: nn.Module, head: nn.Module, seed: int = 0):
        super().__init__()
        self.defence, self.backbone, self.head = defence, backbone.eval(), head
        self.generator = torch.Generator().manual_seed(seed)
        self.queries = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) [-1, 1] images -> (N, classes) logits (differentiable in x: S3)."""
        self.queries += x.shape[0]
        return self.head.s * self.head.cosine(self.backbone(self.defence.encode_eval(x, self.generator)))

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Black-box query (S4): the score vector (softmax of the logits) and nothing else."""
        return torch.softmax(self.forward(x), 1)
