"""The strategy network pi(k | state): how many faces the adaptive hybrid mask mixes.

State (18 numbers, per batch or per sample):
    15  log band energies of the face's 8x8 block DCT (fastmix.frontend, upsample 1, no mixing): the mean
        squared coefficient over blocks and colours of each anti-diagonal band u + v = 0..14, as
        log1p(e) / 10 -- how much low- versus high-frequency content the faces carry;
     1  training progress, step / total steps;
     1  the FR loss's moving average L_ema / log(num_classes) (how hard the task currently is);
     1  the latest held-out validation accuracy (0 before the first evaluation, when no utility term applies).
    Per batch: the mean state of the batch. Per sample: each face's own bands, the shared scalars.

Action: k in ``k_choices`` (default 2..6), sampled from a softmax over an MLP 18 -> H -> H -> |K|, mixed with
an exploration floor: k ~ (1 - eps) pi(. | s) + eps / |K|, eps = ``explore`` (0.1).

Reward of an action (per batch: of the batch; per sample: of the face):
    r = L_mix / L_ema  -  lambda * max(0, acc_target - acc_val) * (k - k_min) / (k_max - k_min)
where L_mix is the mixed-label FR loss of the mixed batch (or face) measured in the FR step that used k,
L_ema its moving average (momentum ``loss_momentum``, so the privacy term is ~1 and scale-free), acc_val the
latest held-out verification / identification accuracy. Before the first validation there is no accuracy
to compare with, and the utility term is 0 (it used to count acc_val as 0, i.e. the full gap, which drove k
to k_min in the first steps of every run). The first term is privacy: the policy maximises
what the FR network minimises (more partners, harder to recognise, harder to invert). The second is utility:
while validation accuracy is below the target, every extra partner costs lambda * gap / (k_max - k_min), so
the equilibrium is not "always k_max". lambda is a Lagrange multiplier of the constraint acc_val >= acc_target,
adapted by dual ascent at each validation: lambda <- max(lambda_0, lambda + eta * (acc_target - acc_val)).
Defaults: lambda_0 = ``penalty`` = 4.0, eta = ``penalty_lr`` = 20, acc_target = 0.8.

Privacy signal ``privacy_signal`` (issue 15, item 2). "loss" (the default) is the L_mix / L_ema term above. It
says nothing about the training-stream attack S5. "s5_proxy" replaces it with the attack itself, run by the client
on its own stream (training/exposure.py; needs ``defence.partners: pool``): the informed server's repeat average
of each face (and mirror) slot, debiased by the pool's mean face, scored by its cosine with the face, and
projected to the end of the run (``Exposure.projected``: c_hat). The privacy term of releasing a face at k is

    -w_p * [phi(c_hat after a release at k) - phi(c_hat before)],   phi(c) = softplus((c - tau) / T)

tau = ``proxy_threshold``, T = ``proxy_temperature``, w_p = ``privacy_weight``: how much the release moves the
attack's projected final cosine, counted only near and above tau (a face far below it costs nothing to expose a
little more, so the utility term gives it fewer partners; a face projected above it gains from every extra
partner). Summed over a slot's releases the terms telescope to -phi(final cosine): a potential-shaped reward that
ranks policies by the attack's final result. The client can compute this term for every k, not only the k it
took (``Exposure.counterfactual`` simulates the release at each k from the pool), so ``reward`` returns the
(N, |K|) rewards of every k (the utility term below included) and ``update`` fits pi to the optimum of the
entropy-regularised one-step problem, pi*(k | s) ~ exp(r_k / beta) with beta = ``entropy``, by cross-entropy,
instead of the one-sample REINFORCE step. Two state features are added (20 in all): the slot's c_hat before the
release as its margin to tau in units of T (clipped to +-4, scaled to +-1) and its share of releases done.

Update (REINFORCE with a baseline), every ``update_every`` FR steps over the actions taken since the last one:
    A = r - b,   loss = -mean(A * log pi(k | s)) - beta * mean(H(pi(. | s))),   b <- mu b + (1 - mu) mean(r)
with beta = ``entropy`` (0.01) and mu = ``baseline_momentum`` (0.9). The exploratory draws enter the update as if
pi had drawn them (no importance weight pi / mu): on purpose, because the importance-weighted, unbiased
gradient of an action with pi(k) ~ 0 is ~ 0 too, and a policy that collapsed on one k while the utility term
was on could never move again once it switched off (what the first LFW run did: k = 2 from step 80 on). Under DDP the rewards' mean and the
policy gradients are averaged over ranks, so every rank keeps the same policy.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastmix

from .exposure import Exposure

BANDS = 15
STATE_DIM = BANDS + 3
EXPOSURE_FEATURES = 2  # privacy_signal s5_proxy: the slot's projected attack cosine, its share of releases done
PRIVACY_SIGNALS = ("loss", "s5_proxy")


def band_energies(x: torch.Tensor, color: str) -> torch.Tensor:
    """(N, C, S, S) faces in [-1, 1] -> (N, 15) log1p band energies / 10 of their 8x8 block DCT."""
    with torch.no_grad():
        z = fastmix.frontend(x.float(), upsample=1, color=color)  # (N, C*64, S/8, S/8)
        n = z.shape[0]
        e = z.pow(2).mean((2, 3)).view(n, -1, 64).mean(1)  # (N, 64): u*8 + v
        uv = torch.arange(64, device=z.device)
        band = uv // 8 + uv % 8
        out = torch.zeros(n, BANDS, device=z.device).index_add_(1, band, e)
        cnt = torch.zeros(BANDS, device=z.device).index_add_(0, band, torch.ones(64, device=z.device))
        return torch.log1p(out / cnt) / 10.0


class PolicyNet(nn.Module):
    def __init__(self, n_actions: int, hidden: int = 32, state_dim: int = STATE_DIM):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))
        nn.init.zeros_(self.net[-1].weight)  # start uniform over k
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, s):
        return self.net(s)


class Policy(nn.Module):
    """pi(k | state) with its REINFORCE bookkeeping (baseline, loss average, last validation accuracy)."""

    def __init__(self, cfg: dict, k_choices, num_classes: int, color: str, seed: int, device,
                 exposure: Exposure | None = None):
        super().__init__()
        self.cfg = cfg
        self.mode = cfg["mode"]
        if self.mode not in ("batch", "sample"):
            raise ValueError(f"policy.mode must be 'batch' or 'sample', got {self.mode!r}")
        if not 0.0 <= float(cfg["explore"]) < 1.0:
            raise ValueError(f"policy.explore must be in [0, 1), got {cfg['explore']!r}")
        if float(cfg["penalty"]) < 0 or float(cfg["penalty_lr"]) < 0:
            raise ValueError(f"policy.penalty and policy.penalty_lr must be >= 0, got {cfg['penalty']!r}, {cfg['penalty_lr']!r}")
        # .get: policy configs written before the privacy signal existed still load (and mean "loss")
        self.signal = cfg.get("privacy_signal", "loss")
        check_privacy_signal(cfg)
        if self.signal == "s5_proxy" and exposure is None:
            raise ValueError("policy.privacy_signal='s5_proxy' needs the client's attack proxy (training.exposure."
                             "Exposure, built by the training loop for defence.partners='pool'); pass exposure=")
        self.exposure = exposure if self.signal == "s5_proxy" else None
        self.state_dim = STATE_DIM + (EXPOSURE_FEATURES if self.exposure is not None else 0)
        self.register_buffer("k_values", torch.tensor(sorted(int(k) for k in k_choices), dtype=torch.int64))
        self.net = PolicyNet(len(self.k_values), int(cfg["hidden"]), self.state_dim)
        self.color = color
        self.log_classes = math.log(max(2, num_classes))
        self.generator = torch.Generator().manual_seed(seed + 31337)  # CPU: the policy is tiny
        # running statistics, saved with the policy (buffers travel in state_dict)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("loss_ema", torch.zeros(()))
        self.register_buffer("val_acc", torch.zeros(()))
        self.register_buffer("val_seen", torch.zeros((), dtype=torch.int64))  # validations so far
        self.register_buffer("lam", torch.tensor(float(cfg["penalty"])))  # lambda, adapted at each validation
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.to(device)
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last_state: torch.Tensor | None = None
        self._release: tuple | None = None  # s5_proxy: the batch's slots, faces and "before" values, state -> reward

    # -- acting --------------------------------------------------------------------------------------
    def state(self, x: torch.Tensor, progress: float, slots: torch.Tensor | None = None,
              truth: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        """(N, state_dim) per-sample states, or (1, state_dim) for per-batch mode (state_dim 18, or 20 with
        privacy_signal s5_proxy, which also needs each face's ``slots`` (N,) (``Exposure.slots``), ``truth``
        (N, D) the faces encoded alone as released, and the FR ``step``)."""
        bands = band_energies(x, self.color)
        if self.mode == "batch":
            bands = bands.mean(0, keepdim=True)
        ema = float(self.loss_ema) / self.log_classes
        scal = torch.tensor([progress, ema, float(self.val_acc)], device=bands.device).expand(bands.shape[0], 3)
        parts = [bands, scal]
        if self.exposure is not None:
            if slots is None or truth is None:
                raise ValueError("policy.privacy_signal='s5_proxy': Policy.state needs slots= and truth= (the faces' "
                                 "training-set slots and their encodings alone)")
            ex = self.exposure
            slots = slots.to(ex.counts.device)
            n = ex.counts[slots]
            n_final = ex.expected_final(slots, step)
            before = ex.projected(ex.cosine(slots, truth), n, n_final)
            self._release = (slots, truth.detach(), n, n_final, before)
            # the projected cosine as its margin to the threshold in units of the temperature (clipped): the
            # cosines that matter lie within a few hundredths of tau, too close together for a raw input
            tau, temp = float(self.cfg["proxy_threshold"]), float(self.cfg["proxy_temperature"])
            margin = ((before - tau) / temp).clamp(-4, 4) / 4
            feats = torch.stack([margin, (n.double() / n_final).float()], 1).to(bands.device)
            parts.append(feats.mean(0, keepdim=True) if self.mode == "batch" else feats)
        self.last_state = torch.cat(parts, 1).to(self.k_values.device)
        return self.last_state

    def probs(self, s: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(s).float(), -1)

    @torch.no_grad()
    def act(self, s: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample actions for states s; returns (k per face (n,) int64 on CPU, action indices (len(s),))."""
        eps = float(self.cfg["explore"])
        p = (1.0 - eps) * self.probs(s).cpu() + eps / len(self.k_values)
        a = torch.multinomial(p, 1, generator=self.generator).flatten()
        k = self.k_values.cpu()[a]
        return (k.expand(n).clone() if self.mode == "batch" else k), a

    # -- rewards and updates -------------------------------------------------------------------------
    def reward(self, loss: torch.Tensor, actions: torch.Tensor, released=None) -> torch.Tensor:
        """r = privacy - lambda * max(0, target - acc_val) * (k - k_min) / (k_max - k_min); privacy is L_mix / L_ema
        (privacy_signal "loss") or the attack proxy's term (module docstring; ``released``: the defence's output,
        ``defences.Masked``, whose rows and own weights the proxy records)."""
        if self.exposure is not None:
            priv = float(self.cfg["privacy_weight"]) * self.exposure_reward(released)
        else:
            loss = loss.detach().float().cpu()
            if self.mode == "batch":
                loss = loss.mean().view(1)
            ema = float(self.loss_ema) if float(self.loss_ema) > 0 else float(loss.mean())
            priv = loss / max(ema, 1e-8)
        # s5_proxy: the reward of every k (N, |K|), the others: of the k taken (N,)
        k = self.k_values.cpu().float() if self.exposure is not None else self.k_values.cpu()[actions].float()
        kmin, kmax = float(self.k_values.min()), float(self.k_values.max())
        span = max(kmax - kmin, 1.0)
        # no held-out accuracy yet: no utility term (not "accuracy 0", which is the largest possible gap)
        gap = max(0.0, float(self.cfg["target_acc"]) - float(self.val_acc)) if int(self.val_seen) > 0 else 0.0
        return priv - float(self.lam) * gap * (k - kmin) / span

    def exposure_reward(self, released) -> torch.Tensor:
        """The privacy term of every k (N, |K|) (per batch: the faces' mean, (1, |K|)): -[phi(c_hat after a release
        at k) - phi(c_hat before)], the release at each k simulated by the client (``Exposure.counterfactual``),
        then the actual released rows recorded in the proxy."""
        if self._release is None:
            raise RuntimeError("Policy.exposure_reward: call state() on the batch first (it records the slots)")
        if released is None or getattr(released, "own", None) is None:
            raise ValueError("policy.privacy_signal='s5_proxy' needs the released rows and each face's own weight "
                             "(defences.Masked.own, set by defence.partners='pool'); pass released=")
        slots, truth, n, n_final, before = self._release
        self._release = None
        ex = self.exposure
        cf = ex.counterfactual(slots, truth, self.k_values.tolist())  # (N, |K|)
        after = ex.projected(cf, (n + 1).view(-1, 1).expand_as(cf), n_final.view(-1, 1).expand_as(cf))
        ex.add(slots, released.x.flatten(1).to(ex.sums.device), released.own.to(ex.sums.device), truth)
        tau, temp = float(self.cfg["proxy_threshold"]), float(self.cfg["proxy_temperature"])
        phi = lambda c: F.softplus((c.double() - tau) / temp)  # noqa: E731
        r = -(phi(after) - phi(before).view(-1, 1)).float().cpu()  # before = 0 for a first release: a constant
        return r.mean(0, keepdim=True) if self.mode == "batch" else r

    def observe_validation(self, acc: float) -> None:
        self.val_acc.fill_(acc)
        self.val_seen += 1
        # dual ascent on lambda: it grows while accuracy stays below the target and shrinks above it
        step = float(self.cfg["penalty_lr"]) * (float(self.cfg["target_acc"]) - acc)
        self.lam.fill_(max(float(self.cfg["penalty"]), float(self.lam) + step))

    def observe_loss(self, mean_loss: float) -> None:
        mu = float(self.cfg["loss_momentum"])
        cur = float(self.loss_ema)
        self.loss_ema.fill_(mean_loss if cur == 0 else mu * cur + (1 - mu) * mean_loss)

    def record(self, s: torch.Tensor, a: torch.Tensor, r: torch.Tensor) -> None:
        self.buffer.append((s.detach().cpu(), a.cpu(), r.cpu()))

    def update(self, optimizer: torch.optim.Optimizer) -> dict:
        """One REINFORCE step over the buffered (state, action, reward); clears the buffer."""
        if not self.buffer:
            return {}
        dev = self.k_values.device
        s = torch.cat([b[0] for b in self.buffer]).to(dev)
        a = torch.cat([b[1] for b in self.buffer]).to(dev)
        r = torch.cat([b[2] for b in self.buffer]).to(dev)
        self.buffer = []
        every_k = r.dim() == 2  # s5_proxy: the reward of every k, not only of the k taken
        if every_k:
            r_all, r = r, r.gather(1, a.view(-1, 1)).flatten()
        r_mean = r.mean()
        if dist.is_available() and dist.is_initialized():
            r_mean = r_mean.clone()
            dist.all_reduce(r_mean)
            r_mean /= dist.get_world_size()
        if int(self.updates) == 0 and float(self.baseline) == 0:
            self.baseline.copy_(r_mean)
        adv = r - self.baseline
        logits = self.net(s).float()
        logp = F.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        if every_k:
            # Every k's reward is known: fit pi to the optimum of the entropy-regularised one-step problem,
            # pi*(k | s) ~ exp(r_k / beta), beta = ``entropy``, by cross-entropy. Measured on ORL seed 3 (the
            # tuning split): one-sample REINFORCE on the proxy's reward, and the exact expected-reward gradient
            # sum_k pi_k r_k too, ended with one k for every face whatever its exposure (the softmax gradient
            # vanishes on the actions pi has left), although the best k differed with the exposure.
            target = torch.softmax(r_all / max(float(self.cfg["entropy"]), 1e-4), 1)
            loss = -(target * logp).sum(1).mean()
        else:
            loss = -(adv * logp.gather(1, a.view(-1, 1)).flatten()).mean() - float(self.cfg["entropy"]) * ent.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        optimizer.step()
        mu = float(self.cfg["baseline_momentum"])
        self.baseline.mul_(mu).add_((1 - mu) * r_mean)
        self.updates += 1
        return {"policy_loss": float(loss.detach()), "reward": float(r_mean), "advantage_abs": float(adv.abs().mean()), "entropy": float(ent.detach().mean()),
                "lambda": float(self.lam)}

    def mean_probs(self, s: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if s is None:
                s = self.last_state if self.last_state is not None else torch.zeros(1, self.state_dim, device=self.k_values.device)
            return self.probs(s).mean(0).cpu()

    # -- checkpointing (the buffer is part of the exact state) ----------------------------------------
    def extra_state(self) -> dict:
        st = {"buffer": self.buffer, "generator": self.generator.get_state()}
        if self.exposure is not None:  # the simulated releases' draws (the proxy's sums are buffers)
            st["exposure_generator"] = self.exposure.generator.get_state()
        return st

    def load_extra_state(self, st: dict) -> None:
        self.buffer = list(st["buffer"])
        self.generator.set_state(st["generator"])
        if self.exposure is not None:
            self.exposure.generator.set_state(st["exposure_generator"])


def check_privacy_signal(cfg: dict) -> None:
    """The privacy-signal keys of a policy config (ValueError naming the key and what to set)."""
    signal = cfg.get("privacy_signal", "loss")
    if signal not in PRIVACY_SIGNALS:
        raise ValueError(f"policy.privacy_signal must be one of {PRIVACY_SIGNALS}, got {signal!r}")
    if signal != "s5_proxy":
        return
    tau, temp, w = cfg.get("proxy_threshold"), cfg.get("proxy_temperature"), cfg.get("privacy_weight")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0.0 < tau < 1.0:
        raise ValueError(f"policy.proxy_threshold must be a cosine in (0, 1) (S5 scores at 0.9 and 0.95), got {tau!r}")
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not temp > 0:
        raise ValueError(f"policy.proxy_temperature must be > 0 (the width of the threshold, e.g. 0.02), got {temp!r}")
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0:
        raise ValueError(f"policy.privacy_weight must be >= 0, got {w!r}")
