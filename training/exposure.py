"""The client's online copy of S5 on its own stream: how far the informed server has recovered each face so far.

Issue 15, item 2: the adaptive policy's privacy term should track what the privacy evaluation measures, not the
FR loss. With pool partners (``defence.partners: pool``) the attack that S5 runs on a face's rows is
``repeat_avg+debias`` (training/privacy/stream.py, ``adapted_attacks``): group the rows that carry the face,
average them, and subtract the pool's mean face at the face's own weight. The client did the mixing, so it knows
what the server cannot: which face and which mirror each row carries, its own weight in it, and the pool. It
can therefore run the attack with a perfect grouping (an upper bound of S5's k-means within each identity) for
the price of a running sum per face and mirror:

    slot s = 2 i + flipped         face i of the training set as released (S5 counts a mirror as another source)
    a_s    = (1 / n_s) sum_r z_r   the repeat average of the n_s rows that carried slot s (the released rows)
    d_s    = a_s - (1 - w_s) mu    a_s debiased: w_s the mean own weight of those rows, mu the pool's mean face
    cos_s  = max(cos(a_s, e_s), cos(d_s, e_s))   e_s the slot's face encoded alone (DC-free DCT), as S5 scores

Face i counts as recovered at tau when max(cos_2i, cos_2i+1) >= tau (``summary``), as in S5's ``recovery``.

The policy acts before a face's last release, so it is shown the cosine the attack would reach at the end of
the run if the slot's future rows were like its past ones (``projected``): the average of n rows of one face
plus independent pool noise has signal-to-noise ratio SNR = cos^2 / (1 - cos^2) growing as n, so
SNR_final = SNR_now x n_final / n_now, n_final the slot's expected releases by the end of the run.

The client also knows the pool, so it can simulate what a release at each k would do to the attack before making
it (``counterfactual``): the policy learns from the reward of every k, not only of the k it drew (policy.py).

Calibration (measured, ORL seed 3, 120 steps, fixed k through a one-choice k_choices): the proxy reads higher
than S5, since its grouping and debias weight are exact: its share of faces at cosine >= 0.96 was 97 / 37 / 7.5 /
0 % at k = 2 / 3 / 4 / 6, against S5's informed recovery at 0.9 of 81 / 31-37 / 5-7.5 / 1.7 % on seeds 0-2
(DEFENCES.md); at >= 0.9 the proxy gives 100 / 94 / 70 / 31 %. Its cosine is a signal to steer by, not S5's.

Memory: 2 x faces x D float32 (ORL privacy split: 240 x 3087, 3 MB; 10,000 faces at D = 3087: 250 MB), plus the
pool's codes (not saved). The state is a set of buffers: it travels in the policy's state_dict, so a checkpoint
restores it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import to_float


def attack_cosine(avg: torch.Tensor, wbar: torch.Tensor, mean_face: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(M,) S5's score of repeat averages ``avg`` (M, D) against the faces ``truth`` (M, D): the better of the raw
    and the debiased average, d = avg - (1 - wbar) mu, ``wbar`` (M, 1) the rows' mean own weight, ``mean_face``
    mu (D,) the pool's."""
    deb = avg - (1 - wbar) * mean_face.view(1, -1)
    return torch.maximum(F.cosine_similarity(avg, truth, dim=1), F.cosine_similarity(deb, truth, dim=1))


class Exposure(nn.Module):
    """Running repeat averages of every (face, mirror) slot and the informed attack's cosine on each.

    faces: training-set size N; dim: D of a released row (flattened); mean_face: (D,) the pool's mean face in the
    released space (its mirrors included: pool faces are mirrored at random); releases_per_step: expected
    releases of one slot per FR step (batch / N, halved when faces are flipped at random); steps: the run's
    total FR steps.

    Example::

        ex = Exposure(120, 3087, mu, releases_per_step=40 / 120 / 2, steps=120)
        before = ex.cosine(slots, truth)            # (M,), 0 for a slot never released
        ex.add(slots, z, own)                       # z (M, D) the released rows, own (M,) the face's weights
        after = ex.cosine(slots, truth)
    """

    def __init__(self, faces: int, dim: int, mean_face: torch.Tensor, releases_per_step: float, steps: int,
                 pool_codes: torch.Tensor | None = None, law: str = "instahide", upper: float = 0.65, alpha: float = 1.0,
                 seed: int = 0):
        super().__init__()
        if mean_face.shape != (dim,):
            raise ValueError(f"mean_face must have shape ({dim},) (one released row), got {tuple(mean_face.shape)}")
        if pool_codes is not None and (pool_codes.dim() != 2 or pool_codes.shape[1] != dim):
            raise ValueError(f"pool_codes must have shape (P, {dim}) (the pool's faces encoded alone), "
                             f"got {tuple(pool_codes.shape)}")
        self.faces, self.dim = int(faces), int(dim)
        self.rate, self.steps = float(releases_per_step), int(steps)
        self.law, self.upper, self.alpha = law, float(upper), float(alpha)
        # the pool's faces (and mirrors) encoded alone, for ``counterfactual``: recomputed from the pool, not saved
        self.register_buffer("pool_codes", None if pool_codes is None else pool_codes.float(), persistent=False)
        # draws of the simulated releases: its own stream (the defence's streams stay as they were); checkpointed
        # by the policy's extra state
        self.generator = torch.Generator().manual_seed(int(seed) + 7727)
        self.register_buffer("sums", torch.zeros(2 * faces, dim))
        self.register_buffer("counts", torch.zeros(2 * faces, dtype=torch.int64))
        self.register_buffer("own", torch.zeros(2 * faces, dtype=torch.float64))  # sum of the rows' own weights
        self.register_buffer("last_cos", torch.zeros(2 * faces))  # the attack's cosine after the slot's last row
        self.register_buffer("mean_face", mean_face.detach().float().clone())

    @staticmethod
    def slots(index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """(M,) slot of each row: 2 x its training-set index + 1 if the face was mirrored."""
        return 2 * index.long() + flipped.long()

    def _check(self, slots: torch.Tensor) -> None:
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= 2 * self.faces):
            raise IndexError(f"slots must be in [0, {2 * self.faces}) (2 x faces), "
                             f"got {int(slots.min())}..{int(slots.max())}")

    @torch.no_grad()
    def cosine(self, slots: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """(M,) the informed repeat-average attack's cosine with ``truth`` (M, D) (each slot's face encoded alone,
        as released: mirrored when the slot is), the better of the raw and the debiased average; 0 before the
        slot's first release."""
        self._check(slots)
        n = self.counts[slots]
        m = n.clamp_min(1).to(self.sums.dtype).view(-1, 1)
        avg = self.sums[slots] / m
        wbar = (self.own[slots] / n.clamp_min(1)).to(avg.dtype).view(-1, 1)
        cos = attack_cosine(avg, wbar, self.mean_face, truth.float().flatten(1))
        return torch.where(n > 0, cos, torch.zeros_like(cos))

    @torch.no_grad()
    def add(self, slots: torch.Tensor, z: torch.Tensor, own: torch.Tensor, truth: torch.Tensor | None = None) -> None:
        """Record released rows z (M, D) of ``slots`` (M,) with the face's own weight in each (M,). A slot appears at
        most once per batch (a batch is a slice of a permutation of the training set). With ``truth`` the slots'
        cosines after the release are kept for ``summary``."""
        self._check(slots)
        self.sums.index_add_(0, slots, z.detach().float().flatten(1))
        self.counts.index_add_(0, slots, torch.ones_like(slots))
        self.own.index_add_(0, slots, own.detach().double())
        if truth is not None:
            self.last_cos[slots] = self.cosine(slots, truth)

    @torch.no_grad()
    def counterfactual(self, slots: torch.Tensor, truth: torch.Tensor, ks, draws: int = 8) -> torch.Tensor:
        """(M, len(ks)) the attack's cosine on each slot after one more release of its face mixed with k - 1 pool
        faces, for every k of ``ks``, simulated by the client (weights from the defence's law, pool faces from
        ``pool_codes``; the frontend is linear, so a mix's code is the mix of the codes), averaged over ``draws``
        simulated releases (one draw left the best k of a face to the luck of its pool faces). Call before
        ``add``. Noise (defence.noise) is not simulated."""
        import fastmix

        if self.pool_codes is None:
            raise ValueError("Exposure.counterfactual needs pool_codes (build_exposure sets them)")
        self._check(slots)
        t = truth.float().flatten(1).cpu()
        n = self.counts[slots].cpu()
        sums, own = self.sums[slots].cpu(), self.own[slots].cpu()
        codes, mean_face = self.pool_codes.cpu(), self.mean_face.cpu()
        m = t.shape[0]
        out = torch.zeros(m, len(ks))
        n1 = (n + 1).to(torch.float32).view(-1, 1)
        kmax = max(int(k) for k in ks)
        for _ in range(draws):
            # common random numbers: every k of a draw takes its partners from the same pool faces, so the
            # differences between k (what the policy learns from) are not drowned by the luck of the draw (the
            # cosine's spread over draws, ~0.015 on a synthetic face, was larger than its change from k = 2 to 6)
            pick = torch.randint(codes.shape[0], (m, max(1, kmax - 1)), generator=self.generator)
            for j, k in enumerate(ks):
                k = int(k)
                if k == 1:
                    w, z = torch.ones(m, 1), t
                else:
                    w = fastmix.sample_weights(m, k, self.law, self.upper, self.alpha, generator=self.generator)
                    z = w[:, :1] * t + (w[:, 1:].unsqueeze(2) * codes[pick[:, : k - 1]]).sum(1)
                avg = (sums + z) / n1
                wbar = ((own + w[:, 0].double()) / (n + 1)).float().view(-1, 1)
                out[:, j] += attack_cosine(avg, wbar, mean_face, t)
        return (out / draws).to(self.sums.device)

    def expected_final(self, slots: torch.Tensor, step: int) -> torch.Tensor:
        """(M,) releases a slot will have had by the end of the run, for a release at FR ``step`` not yet
        recorded (call before ``add``): its count, this release, and the expected releases of the later steps."""
        left = max(0, self.steps - step - 1)
        return self.counts[slots].double() + 1 + self.rate * left

    @staticmethod
    def projected(cos: torch.Tensor, n: torch.Tensor, n_final: torch.Tensor) -> torch.Tensor:
        """(M,) the cosine after n_final releases of a slot at cosine ``cos`` after n (SNR grows as n); 0 when n = 0."""
        c = cos.double().clamp(0.0, 0.99999)
        snr = c * c / (1 - c * c) * n_final.double() / n.double().clamp_min(1)
        out = (snr / (1 + snr)).sqrt()
        return torch.where(n > 0, out, torch.zeros_like(out)).float()

    @torch.no_grad()
    def summary(self, taus=(0.9, 0.95)) -> dict:
        """The proxy's verdict on the run so far, per face (the better of its two slots), in S5's terms."""
        per_face = self.last_cos.view(self.faces, 2).max(1).values
        seen = self.counts.view(self.faces, 2).sum(1) > 0
        out = {f"recovered@{t}": float((per_face >= t).float().mean()) for t in taus}
        out["cos_median"] = float(per_face[seen].median()) if bool(seen.any()) else 0.0
        out["releases_mean"] = float(self.counts.double().sum() / max(1, self.faces))
        return out


@torch.no_grad()
def build_exposure(defence, faces: int, batch: int, flip: bool, steps: int, seed: int = 0, chunk: int = 500) -> Exposure:
    """The proxy for a mixing defence with pool partners: the pool's faces and mirrors encoded alone
    (``defence.encode_alone``; their mean is the debiasing face, and they draw the simulated releases of
    ``counterfactual``; 2 x pool x D floats, 49 MB for 2000 faces at D = 3087), the defence's weight law, and the
    release rate of a slot."""
    pool = getattr(defence, "pool", None)
    if pool is None:
        raise ValueError("policy.privacy_signal='s5_proxy' models S5 on pool partners: set defence.partners='pool' "
                         "(with batch partners S5's linear unmixing recovers ~98 % whatever this proxy says)")
    codes = []
    for i in range(0, pool.shape[0], chunk):
        p = to_float(pool[i : i + chunk]).to(defence.generator.device)
        for im in (p, p.flip(-1)):  # the defence mirrors pool partners at random
            codes.append(defence.encode_alone(im).flatten(1).float().cpu())
    codes = torch.cat(codes)
    rate = batch / faces * (0.5 if flip else 1.0)
    c = defence.cfg
    return Exposure(faces, codes.shape[1], codes.double().mean(0).float(), rate, steps, pool_codes=codes,
                    law=c["law"], upper=float(c["upper"]), alpha=float(c["alpha"]), seed=seed)
