"""HybridMask: the adaptive hybrid mask as an nn.Module (sample partners and weights, then one fused op)."""
from __future__ import annotations

import hashlib
import math
import os
import weakref
from typing import NamedTuple

import torch
from torch import nn

from ..ops.freq_mix import FREQS, freq_mix
from ..ops.frontend import frontend
from ..ops.noise import NOISES
from ..samplers import LAWS, check_generator, sample_partners, sample_weights

# PartialFace drops the channels that carry most of the energy; on faces these are the 10 lowest
# frequencies of each colour: (u, v) in {(0,0),(0,1),(0,2),(0,3),(1,0),(1,1),(1,2),(2,0),(2,1),(3,0)}.
PARTIALFACE_DROP = (0, 1, 2, 3, 8, 9, 10, 16, 17, 24)
KEEP_PRESETS = ("all", "no_dc", "partialface")


def keep_ids(preset, channels: int) -> list[int] | None:
    """Channel ids kept by a preset ("all", "no_dc", "partialface") for C colours, or an explicit keep as the
    ops take it (None, a list of ids, an id tensor or a bool mask), passed through for them to check
    (fastmix.ops.freq_mix.normalize_keep)."""
    c = channels
    if isinstance(preset, str):
        if preset == "all":
            return None
        drop = {0} if preset == "no_dc" else set(PARTIALFACE_DROP) if preset == "partialface" else None
        if drop is None:
            raise ValueError(f"keep must be one of {KEEP_PRESETS} or a list of channel ids, got {preset!r}")
        return [ch for ch in range(c * FREQS) if ch % FREQS not in drop]
    return preset


# Generators already re-keyed in this DataLoader worker: generator -> (pid, worker seed) it was re-keyed for.
_WORKER_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def worker_stream(gen: torch.Generator | None) -> torch.Generator | None:
    """``gen``, re-keyed once per DataLoader worker; outside a worker, ``gen`` untouched.

    A DataLoader copies the dataset (and a HybridMask in it, generator included) into every worker: by fork
    the copies start in the same state, so every worker drew the same partners, weights and sign seeds (4 of
    8 seeds were duplicates with 2 workers), and a repeated one-time key lets an attacker cancel the signs
    of two outputs against each other. In a worker the generator is re-seeded before its first draw from
    (a draw of its own stream, the worker's seed): the worker seed (torch.utils.data.get_worker_info().seed,
    the loader's base seed + worker id) differs between workers and between epochs, and comes from the
    main process's RNG, so a run seeded with torch.manual_seed stays reproducible; the draw keeps the
    module's own seed in it. The main process's generator is not touched. With generator None the global
    RNG is used, which the DataLoader already seeds per worker."""
    if gen is None:
        return gen
    info = torch.utils.data.get_worker_info()
    if info is None:
        return gen
    key = (os.getpid(), info.seed)
    if _WORKER_STREAMS.get(gen) != key:
        own = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
        digest = hashlib.blake2b(f"fastmix worker stream {own} {info.seed} {info.id}".encode(), digest_size=8).digest()
        gen.manual_seed(int.from_bytes(digest, "little"))
        _WORKER_STREAMS[gen] = key
    return gen


# torch.compile: the draws cannot be traced (a torch.Generator is not a graph value, the sign key is read back
# with .item(), the DataLoader-worker re-keying is Python state), and a key drawn at trace time would be
# baked into the graph and repeated at every call. So the plan is drawn eagerly, outside the compiled region,
# and passed in: the fused op and everything around it compile with fullgraph=True, the seed becomes a
# symbolic int after the first call (one recompile, then none). tests/test_hybrid_mask.py runs this pattern.
COMPILE_HINT = (
    "HybridMask draws its random plan (partners, weights, one-time sign key) eagerly, outside torch.compile: "
    "call p = mask.plan(x.shape[0]) (or mask.plan(n, k)) before the compiled function and pass it in, "
    "mask(x, labels, plan=p) or mask.apply(x, p), inside; see HybridMask's docstring")


class MixPlan(NamedTuple):
    """The random draws of one HybridMask call: output m mixes rows index[m, :] of the input with
    weight[m, :] (zeros pad a per-sample k), flips signs with the one-time key ``seed`` (None: no flips) and
    adds the noise drawn from ``noise_seed`` (None: no noise)."""

    index: torch.Tensor  # (M, k) int64 rows of the input batch
    weight: torch.Tensor  # (M, k) float32, rows sum to 1
    seed: int | None
    noise_seed: int | None = None


class HybridMask(nn.Module):
    """Frequency-domain hybrid mask: each output mixes its image with k-1 partners in the block-DCT domain,
    keeps a channel subset and flips signs with a fresh one-time key.

    Args:
        k: partners per output (int >= 1), or the maximum k when forward gets a per-sample ``k`` tensor.
        law, upper, alpha: weight law (see :func:`fastmix.sample_weights`).
        keep: "all", "no_dc", "partialface", or what the ops take: None (all), channel ids (a list or an
            integer tensor) or a bool mask (C*64,) or (64,).
        sign_flip: draw a fresh seed per call and flip signs.
        noise, noise_scale: None, or "gaussian" / "laplace" with its std / scale b: a number, or a float
            tensor (64,) per frequency or (C*64,) per channel id (see :func:`fastmix.freq_mix`). Added to every
            kept coefficient inside the fused op from a fresh noise seed per call (drawn after the sign key,
            so a mask without noise draws the same plans as before). Noise against the training server's
            stream attack: training/privacy/DEFENCES.md measures which scales it takes.
        upsample: None -> x is already an image on the DCT grid and :func:`fastmix.freq_mix` runs;
            an int -> x is a [-1, 1] face and the fused :func:`fastmix.frontend` runs (channels out).
        color: frontend colour transform ("ycbcr" or "none").
        out: "channels" or "pixels" (pixels needs upsample=None).
        generator: torch.Generator for partners, weights and seeds (reproducible runs). Inside a DataLoader
            worker, the worker's copy is re-keyed before its first draw (:func:`worker_stream`), so workers
            never repeat each other's keys.

    forward(x, labels, k=None, plan=None) -> (masked, partner_labels (M, k), weights (M, k)), for the
    mixed-label loss  sum_t weights[m, t] * L(f(masked[m]), partner_labels[m, t]).

    The draws and the op are also separate steps, for callers that need the partner index (an attack
    evaluation: which face dominates each mix) or choose partners themselves (partners from a global batch
    across ranks, where each rank computes only its own rows)::

        p = mask.plan(n, k)                       # or mask.plan(index=my_rows_of_a_global_index, k=k)
        masked = mask.apply(x, p)                 # == mask(x, labels, plan=p)[0]

    The generator's state is part of ``state_dict()`` (extra state), so a checkpoint restores the stream.

    Under ``torch.compile`` (fullgraph=True included) draw the plan outside and compile the rest; the seed
    travels as a symbolic int, so a fresh key per step does not recompile (after the first step)::

        @torch.compile(fullgraph=True)
        def step(x, labels, plan):
            z, partner_labels, w = mask(x, labels, plan=plan)
            return mixed_label_loss(backbone(z), partner_labels, w)

        loss = step(x, labels, mask.plan(x.shape[0]))

    Calling the module without a plan inside a compiled region raises a RuntimeError saying so (the draws
    cannot be traced, and a key drawn while tracing would be baked into the graph and repeated).
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
        noise: str | None = None,
        noise_scale: float | torch.Tensor | None = None,
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
        if not (keep is None or isinstance(keep, (str, torch.Tensor))):
            if not hasattr(keep, "__iter__"):
                raise TypeError(f"keep must be a preset {KEEP_PRESETS}, None, channel ids or a bool mask, "
                                f"got {type(keep).__name__}")
            keep = list(keep)  # a generator would be used up by the first call
        check_generator(generator)
        if noise is None:
            if noise_scale is not None:
                raise ValueError("noise_scale is given but noise is None; pass noise='gaussian' or 'laplace'")
        else:
            if not isinstance(noise, str) or noise not in NOISES:
                raise ValueError(f"noise must be None or one of {NOISES}, got {noise!r}")
            if noise_scale is None:
                raise ValueError(f"noise={noise!r} needs noise_scale (a number, or a float tensor (64,) or (C*64,))")
            if isinstance(noise_scale, torch.Tensor):
                if not noise_scale.dtype.is_floating_point or noise_scale.dim() > 1:
                    raise ValueError(f"noise_scale must be a number or a 1-D float tensor, got {noise_scale.dtype} "
                                     f"of shape {tuple(noise_scale.shape)}")
                if bool((~torch.isfinite(noise_scale) | (noise_scale < 0)).any()):
                    raise ValueError("noise_scale must be finite and >= 0 everywhere")
            elif isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) \
                    or not math.isfinite(noise_scale) or noise_scale < 0:
                raise ValueError(f"noise_scale must be a finite number >= 0 or a float tensor, got {noise_scale!r}")
        self.noise = noise
        # a tensor scale is a buffer (it follows .to(device)); not in state_dict: it is configuration
        if isinstance(noise_scale, torch.Tensor):
            self.register_buffer("noise_scale", noise_scale.detach().float().clone(), persistent=False)
        else:
            self.noise_scale = noise_scale
        self.k, self.law, self.upper, self.alpha = k, law, upper, alpha
        self.keep, self.sign_flip, self.upsample, self.color, self.out = keep, sign_flip, upsample, color, out
        self.generator = generator

    def _draw_seed(self, gen: torch.Generator | None) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device if gen is not None else None).item())

    def plan(self, n: int | None = None, k: torch.Tensor | None = None, *, index: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> MixPlan:
        """Draw partners, weights and the sign key for one call (from ``generator``, default the module's).

        n: batch size (partners within the batch, ``fastmix.sample_partners``); or index: (M, kmax) rows chosen
        by the caller (column 0 is conventionally the output's own image). k: None (the module's k for every
        output) or an integer tensor (M,) of per-output k in [1, kmax] (weights of the extra partners are 0).
        """
        check_generator(generator)
        # re-keyed once inside a DataLoader worker: forked copies of one generator would repeat the keys
        gen = worker_stream(self.generator if generator is None else generator)
        if index is None:
            if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"n must be an int >= 0 when no index is given, got {n!r}")
            kmax = self.k
        else:
            if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.dtype != torch.int64:
                raise ValueError(f"index must be an int64 tensor of shape (M, k), got {getattr(index, 'shape', index)!r}")
            if not 1 <= index.shape[1] <= self.k:
                raise ValueError(f"index has {index.shape[1]} partner columns; this HybridMask mixes at most k={self.k}")
            kmax = index.shape[1]
        m = n if index is None else index.shape[0]
        if k is not None:
            if not isinstance(k, torch.Tensor) or k.shape != (m,) or k.dtype.is_floating_point or k.dtype == torch.bool:
                raise ValueError(f"k must be an integer tensor of shape ({m},)")
            if m and (int(k.min()) < 1 or int(k.max()) > kmax):
                raise ValueError(f"k values must be in [1, {kmax}] (the module's k, or the index's columns, is the maximum)")
        # Samplers run on the generator's device; the op moves what it needs to x's device.
        if index is None:
            index = sample_partners(n, kmax, generator=gen)
        weight = sample_weights(m, kmax, self.law, self.upper, self.alpha, generator=gen, active=k)
        seed = self._draw_seed(gen) if self.sign_flip else None
        noise_seed = self._draw_seed(gen) if self.noise is not None else None
        return MixPlan(index, weight, seed, noise_seed)

    def apply(self, x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """The masked outputs (M, ...) of plan's rows of x: one fused fastmix op."""
        index, weight = plan.index.to(x.device), plan.weight.to(x.device)
        c = x.shape[1] if x.dim() == 4 else 1
        ids = keep_ids(self.keep, c)
        noise = {}
        if self.noise is not None:
            if plan.noise_seed is None:
                raise ValueError("this HybridMask adds noise: the plan needs a noise_seed (draw it with mask.plan())")
            noise = {"noise": self.noise, "noise_seed": plan.noise_seed, "noise_scale": self.noise_scale}
        if self.upsample is None:
            # weights as drawn (float32): the ones the loss gets (rounded to x's dtype, the two would differ)
            return freq_mix(x, index, weight, keep=ids, seed=plan.seed, out=self.out, **noise)
        return frontend(x, upsample=self.upsample, color=self.color, keep=ids, index=index, weight=weight,
                        seed=plan.seed, **noise)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, k: torch.Tensor | None = None, plan: MixPlan | None = None):
        n = x.shape[0]
        if labels.shape[:1] != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if plan is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(COMPILE_HINT)
            plan = self.plan(n, k)
        elif k is not None:
            raise ValueError("pass k to plan(), not together with a plan")
        masked = self.apply(x, plan)
        return masked, labels[plan.index.to(labels.device)], plan.weight.to(x.device)

    # The generator is not a tensor: its state travels as extra state (a uint8 tensor for CPU generators,
    # the same for CUDA ones: Generator.get_state() is a CPU ByteTensor either way).
    def get_extra_state(self):
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state):
        st = (state or {}).get("generator")
        if st is not None and self.generator is not None:
            self.generator.set_state(st)

    def extra_repr(self) -> str:
        if self.keep is None or isinstance(self.keep, str):
            keep = self.keep
        elif isinstance(self.keep, torch.Tensor) and self.keep.dtype == torch.bool:
            keep = f"mask of {int(self.keep.sum())}"
        else:
            keep = f"{len(self.keep)} ids"
        src = "freq_mix" if self.upsample is None else f"frontend(upsample={self.upsample}, color={self.color})"
        noise = "" if self.noise is None else (
            f", noise={self.noise}, noise_scale="
            + (f"tensor{tuple(self.noise_scale.shape)}" if isinstance(self.noise_scale, torch.Tensor) else f"{self.noise_scale}"))
        return (
            f"k={self.k}, law={self.law}, upper={self.upper}, keep={keep}, sign_flip={self.sign_flip}, "
            f"op={src}, out={self.out}{noise}"
        )
