"""The training loop: FR steps on masked, mixed faces alternating with policy steps.

One iteration:
    faces -> (policy: state -> k) -> defence (fastmix) -> backbone -> margin head -> mixed-label loss
          -> FR optimiser step; the policy records (state, k, reward) and takes a REINFORCE step every
          ``policy.update_every`` iterations.
The loop only sees the ``Defence`` interface: it does not know which defence it trains.

Distributed: launched by torchrun (WORLD_SIZE > 1), the FR network (defence + backbone + head) is one DDP
module; every rank masks its own slice of the global batch (or, with ``defence.global_partners``, mixes
with partners from the whole global batch); the policy's gradients and rewards are averaged over ranks.
AMP (bf16 or fp16 with a GradScaler) runs the backbone on CUDA (on the CPU with train.amp_cpu); the masks and
the margin head stay fp32.

Checkpoints (every ``train.ckpt_every`` steps, at the end, and after the step under way when SIGINT / SIGTERM
arrives: StopOnSignal) are written to a temporary file and renamed
over ``<out_dir>/ckpt.pt`` (os.replace: atomic on POSIX), so a crash never leaves a torn checkpoint. They
hold everything that decides the next step: model, optimisers, LR schedule, GradScaler, policy (weights,
baseline, averages, pending buffer), the data position (epoch, batch) and every RNG stream of every rank
(torch CPU / CUDA, numpy, python, the HybridMask / defence generators, the partner, data and policy
generators). Resuming therefore continues bit for bit (tests/training/test_resume.py).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import fastmix

from . import eval as evaluation
from .config import check_values, flatten
from .data import SKIPS, ResumableBatchSampler, collate_skipping, load_data, to_float
from .defences import build_defence
from .loss import MarginHead, mixed_label_loss
from .model import build_model
from .policy import Policy

CKPT = "ckpt.pt"

# Config keys a resumed run may change: where it writes, how much it logs, how far this process runs, and
# the final evaluation. Any other difference means the checkpoint belongs to another experiment: resuming
# would report that run's model under this config.
RESUME_MAY_CHANGE = ("out_dir", "train.max_steps_this_run", "train.progress", "train.log_every", "train.threads",
                     "train.ckpt_every", "data.num_workers", "data.pairs", "data.bin_sets", "eval.")


class ResumeMismatch(ValueError):
    """The out_dir holds a checkpoint written under another config (see RESUME_MAY_CHANGE)."""


def config_changes(saved: dict, cfg: dict) -> list[str]:
    """``key: old -> new`` for every key outside RESUME_MAY_CHANGE on which two configs differ."""
    a, b = flatten(saved), flatten(cfg)
    free = tuple(k for k in RESUME_MAY_CHANGE if k.endswith("."))
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and key not in RESUME_MAY_CHANGE and not key.startswith(free)]


class StopOnSignal:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) during training: finish the step under way,
    write the checkpoint, return ``stopped_early``; the same command resumes from there bit for bit. A second
    signal interrupts at once (KeyboardInterrupt). Under DDP the ranks agree on the step (a MAX all-reduce
    of the flag after every step, next to the step's loss read-back) so that they checkpoint together.
    Handlers are installed only from the main thread (the only one Python lets install them)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.flag = False
        self._prev: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev = {}
        return False

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.flag = True
        print(f"[training] {signal.Signals(signum).name}: checkpointing after this step, then stopping "
              "(send it again to stop at once)", flush=True)

    def requested(self, world: int, device: torch.device) -> bool:
        if world == 1:
            return self.flag
        t = torch.tensor([int(self.flag)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the training process (StopOnSignal): Ctrl-C in a terminal
    reaches the whole process group, and a worker that died of it would end the run before its checkpoint.
    They still exit with the main process (DataLoader shuts them down; they also watch their parent)."""
    for sig in StopOnSignal.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class TrainStep(nn.Module):
    """defence -> backbone -> head -> per-face mixed-label loss; the module DDP wraps."""

    def __init__(self, defence, backbone, head, amp_dtype=None):
        super().__init__()
        self.defence, self.backbone, self.head = defence, backbone, head
        self.amp_dtype = amp_dtype
        # tap(x, y, masked): sees every protected batch this module trains on, with its source faces and labels
        # (the privacy layer's training-stream attack records what the FR server receives). None in training.
        self.tap = None

    def forward(self, x, y, k=None):
        m = self.defence(x, y, k)
        if self.tap is not None:
            self.tap(x.detach(), y.detach(), m)
        with torch.autocast(device_type=m.x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            emb = self.backbone(m.x)
        return mixed_label_loss(self.head, emb.float(), m.labels, m.weights), m.weights


# ----------------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------------


def setup_distributed(cfg: dict) -> tuple[int, int, torch.device]:
    """(rank, world, device); initialises the process group when torchrun (or a test) set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg["train"]["device"]
    cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"train.device is 'cuda' but this torch ({torch.__version__}) sees no CUDA device; "
                         "use train.device=auto or cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _is_main(rank):
    return rank == 0


# ----------------------------------------------------------------------------------------------------
# RNG streams and checkpoints
# ----------------------------------------------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator], device) -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, generators: dict[str, torch.Generator], device) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    for k, g in generators.items():
        g.set_state(st["generators"][k])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def atomic_save(obj, path: Path) -> None:
    """torch.save to <path>.tmp.<pid>, fsync, then os.replace: readers see the old or the new file, never half."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _gather_objects(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------
# Schedules and metrics
# ----------------------------------------------------------------------------------------------------


def lr_lambda(cfg_train: dict):
    steps, warm, kind = int(cfg_train["steps"]), int(cfg_train["warmup"]), cfg_train["schedule"]

    def f(step):
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        t = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss, validation accuracy, mean k and the k distribution over training, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    tr = [r for r in rows if r.get("kind") == "train"]
    va = [r for r in rows if r.get("kind") == "val"]
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.6))
    if tr:
        s = [r["step"] for r in tr]
        ax[0].plot(s, [r["loss"] for r in tr])
        ax[2].plot(s, [r["k_mean"] for r in tr])
        ks = sorted({int(k) for r in tr for k in r["k_hist"]})
        tot = [max(1, sum(r["k_hist"].values())) for r in tr]
        ax[3].stackplot(s, *[[r["k_hist"].get(str(k), 0) / t for r, t in zip(tr, tot)] for k in ks], labels=[f"k={k}" for k in ks])
        ax[3].legend(loc="upper left", fontsize=7)
    if va:
        ax[1].plot([r["step"] for r in va], [r["accuracy"] for r in va], marker="o")
    for a, t in zip(ax, ("FR loss (mixed)", "held-out accuracy", "mean k", "k distribution")):
        a.set_title(t)
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def train(cfg: dict, resume: bool = True, data=None, tap=None) -> dict:
    """Train and evaluate one config; returns the results dict (also written to <out_dir>/results.json).

    ``data``: a preloaded DataBundle (the results command reuses one across defences).
    ``tap``: called as tap(x, y, masked) with every training batch's faces (N, C, S, S) after augmentation, labels
    (N,) and the defence's output (``defences.Masked``: what the FR server sees, with the mixed-label loss's
    partner labels and weights) -- the privacy layer's training-stream attack (S5) records the stream with it.
    """
    checks = fastmix.set_index_checks(True)  # restored on return; _train turns them off on a GPU
    try:
        return _train(cfg, resume, data, tap)
    finally:
        fastmix.set_index_checks(checks)


def _train(cfg: dict, resume: bool, data, tap=None) -> dict:
    t_start = time.time()
    check_values(cfg)  # again: callers may edit the dict after load_config
    rank, world, device = setup_distributed(cfg)
    if device.type != "cpu":
        # The partners come from HybridMask / fastmix's samplers, valid by construction: no range check,
        # whose host sync would stall every step behind the work queued before it.
        fastmix.set_index_checks(False)
    tc, pc = cfg["train"], cfg["policy"]
    if tc["threads"]:
        torch.set_num_threads(int(tc["threads"]))
    seed = int(cfg["seed"])
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    out = Path(cfg["out_dir"])
    if _is_main(rank):
        out.mkdir(parents=True, exist_ok=True)

    data = data if data is not None else load_data(cfg)
    amp = None
    # AMP is for GPUs; train.amp_cpu runs the same autocast path on the CPU (tests, or a CPU with bf16 units)
    if tc["amp"] != "off" and (device.type == "cuda" or tc["amp_cpu"]):
        amp = torch.bfloat16 if tc["amp"] == "bf16" else torch.float16
    defence = build_defence(cfg, data.channels, device, seed * 1000 + 17 + rank)
    c_in, s_in = defence.out_shape()
    mc = cfg["model"]
    backbone = build_model(mc["arch"], c_in, s_in, int(mc["embedding"]), float(mc["width"]), float(mc["dropout"]))
    head = MarginHead(int(mc["embedding"]), data.num_classes, cfg["head"]["type"], cfg["head"]["s"], cfg["head"]["m"])
    step_mod = TrainStep(defence, backbone, head, amp).to(device)
    step_mod.tap = tap
    net = nn.parallel.DistributedDataParallel(step_mod, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else step_mod

    params = [p for p in step_mod.parameters() if p.requires_grad]
    if tc["optimizer"] == "sgd":
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": float(tc["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=float(tc["lr"]), momentum=float(tc["momentum"]))
    elif tc["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    else:
        raise ValueError(f"train.optimizer must be sgd or adamw, got {tc['optimizer']!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

    policy = popt = None
    if defence.adaptive:
        policy = Policy(pc, cfg["defence"]["k_choices"], data.num_classes, defence.color, seed, device)
        popt = torch.optim.Adam(policy.net.parameters(), lr=float(pc["lr"]))
        if data.val is None and _is_main(rank):
            warnings.warn("adaptive defence without a validation set (data.val_identities = 0, or data.val_bin unset "
                          "for a RecordIO pack): the policy's accuracy term (policy.target_acc) is inactive, it "
                          "maximises the FR loss alone", stacklevel=2)
        if world > 1:  # one policy for all ranks: start from rank 0's weights (DDP does the same for the network)
            with torch.no_grad():
                for p in policy.parameters():
                    dist.broadcast(p.data, 0)

    data_gen = torch.Generator().manual_seed(seed * 7 + 3 + rank)  # augmentation (flips)
    generators = {f"defence.{k}": g for k, g in defence.generators().items()}
    generators["data"] = data_gen
    total = int(tc["steps"])
    step, start_pos = 0, (0, 0)
    k_total: dict[int, int] = {}
    k_late: dict[int, int] = {}  # k counts over the last 20% of the steps ("where the policy settled")

    ckpt_path = out / CKPT
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = config_changes(ck["config"], cfg) if "config" in ck else []
        if changed:
            raise ResumeMismatch(f"{ckpt_path} is a checkpoint of another config ({'; '.join(changed)}); resuming "
                                 "it would report that run under this config. Start over (--fresh, resume=False) "
                                 "or write elsewhere (--out, out_dir)")
        step_mod.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if policy is not None:
            policy.load_state_dict(ck["policy"])
            popt.load_state_dict(ck["policy_opt"])
        per_rank = ck["rank_state"]
        if len(per_rank) != world:
            raise RuntimeError(f"checkpoint was written by {len(per_rank)} ranks, this run has {world}; exact resume needs the same world size")
        mine = per_rank[rank]
        set_rng_state(mine["rng"], generators, device)
        if policy is not None:
            policy.load_extra_state(mine["policy"])
        step, start_pos = ck["step"], tuple(ck["position"])
        k_total = {int(a): b for a, b in ck["k_total"].items()}
        k_late = {int(a): b for a, b in ck["k_late"].items()}
        if _is_main(rank):
            print(f"[training] resumed from {ckpt_path} at step {step} (data position epoch {start_pos[0]}, batch {start_pos[1]})")
    elif _is_main(rank):
        for f in ("metrics.jsonl",):
            (out / f).unlink(missing_ok=True)

    sampler = ResumableBatchSampler(len(data.train), int(tc["batch_size"]), seed, rank, world, start_pos)
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=sampler, collate_fn=collate_skipping,
                                         num_workers=int(cfg["data"]["num_workers"]), pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals,
                                         # its own generator: creating the iterator must not draw from the global stream
                                         generator=torch.Generator().manual_seed(seed))
    it = iter(loader)
    consumed = 0
    metrics_f = open(out / "metrics.jsonl", "a") if _is_main(rank) else None
    if metrics_f is not None and step > 0:
        # drop lines past the checkpoint (written by a run that died after it): the log matches the state
        lines = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        metrics_f.close()
        (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
        metrics_f = open(out / "metrics.jsonl", "a")

    def log(rec):
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    def fingerprint():
        # float64 sums of the parameters: identical on every rank when DDP and the policy sync work
        with torch.no_grad():
            fp = {"model": float(sum(p.double().sum() for p in step_mod.parameters()))}
            if policy is not None:
                fp["policy"] = float(sum(p.double().sum() for p in policy.parameters()))
        return fp

    def checkpoint():
        per = _gather_objects({"rng": rng_state(generators, device), "policy": policy.extra_state() if policy else None,
                               "fingerprint": fingerprint()}, world)
        if _is_main(rank):
            atomic_save({
                "step": step, "position": sampler.position_after(consumed), "model": step_mod.state_dict(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "policy": policy.state_dict() if policy else None, "policy_opt": popt.state_dict() if popt else None,
                "rank_state": per, "k_total": k_total, "k_late": k_late, "config": cfg, "world": world,
            }, ckpt_path)
        if world > 1:
            dist.barrier()

    def validate():
        acc = torch.zeros(1)
        res = None
        if data.val is not None and _is_main(rank):
            res = evaluation.evaluate(data.val, step_mod.backbone, defence, device, int(cfg["eval"]["batch_size"]))
            acc[0] = res["accuracy"]
        if world > 1:
            acc = acc.to(device) if dist.get_backend() == "nccl" else acc
            dist.broadcast(acc, 0)
        if policy is not None and data.val is not None:  # no validation set: no accuracy, not "accuracy 0"
            policy.observe_validation(float(acc[0]))
        if res is not None:
            log({"kind": "val", "step": step, **res})
        return float(acc[0])

    stop = total if tc["max_steps_this_run"] is None else min(total, step + int(tc["max_steps_this_run"]))
    bar = None
    if tc["progress"] and _is_main(rank):
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"{cfg['name']}:{defence.name}", dynamic_ncols=True)
    win = {"loss": 0.0, "n": 0, "k": {}, "t": time.time(), "imgs": 0}
    last_policy: dict = {}
    late_from = int(0.8 * total)
    val_acc = float(policy.val_acc) if policy is not None else float("nan")

    with StopOnSignal() as stopper:  # Ctrl-C / SIGTERM: checkpoint at the next step boundary, not lost work
        while step < stop:
            batch = next(it)
            consumed += 1
            if batch is None:  # every image of the batch was unreadable (counted): take the next batch
                continue
            u8, y = batch
            x = to_float(u8.to(device, non_blocking=True))
            y = y.to(device)
            if cfg["data"]["flip"]:
                f = (torch.rand(x.shape[0], generator=data_gen) < 0.5).to(device)
                x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
            k = a = s = None
            if policy is not None:
                s = policy.state(x, step / max(1, total))
                k, a = policy.act(s, x.shape[0])
            loss_vec, weights = net(x, y, k)
            loss = loss_vec.mean()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            with warnings.catch_warnings():
                # fp16: GradScaler skips the optimiser step when the scaled gradients overflow (the first steps, while
                # it finds its scale); the schedule still advances with the step count, on purpose (exact resume
                # counts steps), so torch's "lr_scheduler.step() before optimizer.step()" warning does not apply.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
                sched.step()
            if policy is not None:
                policy.record(s, a, policy.reward(loss_vec, a))
                policy.observe_loss(float(loss.detach()))
                if (step + 1) % int(pc["update_every"]) == 0:
                    last_policy = policy.update(popt)
            # k actually used per face: the number of partners with a non-zero weight
            used = (weights != 0).sum(1).cpu()
            for kv, cnt in zip(*torch.unique(used, return_counts=True)):
                kv, cnt = int(kv), int(cnt)
                win["k"][kv] = win["k"].get(kv, 0) + cnt
                k_total[kv] = k_total.get(kv, 0) + cnt
                if step >= late_from:
                    k_late[kv] = k_late.get(kv, 0) + cnt
            win["loss"] += float(loss.detach())
            win["n"] += 1
            win["imgs"] += x.shape[0] * world
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", k=f"{used.float().mean():.2f}", val=f"{val_acc:.3f}")
            if step % int(tc["log_every"]) == 0 or step == stop:
                kh = win["k"]
                rec = {
                    "kind": "train", "step": step, "lr": sched.get_last_lr()[0], "loss": win["loss"] / max(1, win["n"]),
                    "k_mean": sum(k_ * c for k_, c in kh.items()) / max(1, sum(kh.values())), "k_hist": {str(k_): c for k_, c in sorted(kh.items())},
                    "imgs_per_s": win["imgs"] / max(1e-9, time.time() - win["t"]), "skipped_images": SKIPS.count,
                }
                if policy is not None:
                    rec["policy_probs"] = [round(float(p), 4) for p in policy.mean_probs(s)]
                    rec.update(last_policy)
                log(rec)
                win = {"loss": 0.0, "n": 0, "k": {}, "t": time.time(), "imgs": 0}
            if int(tc["eval_every"]) and step % int(tc["eval_every"]) == 0 and step < total:
                val_acc = validate()
            if int(tc["ckpt_every"]) and step % int(tc["ckpt_every"]) == 0:
                checkpoint()
            if stopper.requested(world, device):
                break
    if bar is not None:
        bar.close()
    checkpoint()
    results = None
    if step >= total:
        results = finish(cfg, data, step_mod, defence, policy, device, rank, k_total, k_late, out, t_start, validate, world)
    if metrics_f is not None:
        metrics_f.close()
        if (out / "metrics.jsonl").stat().st_size:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    if world > 1:
        # Leave together: a rank that tears its process group down while rank 0 still evaluates the test
        # sets can abort in gloo's connection threads (seen once in the 2-process CPU test under load).
        dist.barrier()
    if step < total:
        return {"step": step, "stopped_early": True}
    return results  # None on ranks other than 0


def finish(cfg, data, step_mod, defence, policy, device, rank, k_total, k_late, out, t_start, validate, world):
    """Final validation and test evaluation; results.json on rank 0."""
    val = validate()
    if not _is_main(rank):
        return None
    ec = cfg["eval"]
    tests = [evaluation.evaluate(t, step_mod.backbone, defence, device, int(ec["batch_size"]), bool(ec["tta_flip"]), int(ec["folds"]), float(ec["far"]))
             for t in data.tests]

    def mean_k(h):
        return sum(k * c for k, c in h.items()) / max(1, sum(h.values()))

    res = {
        "name": cfg["name"], "defence": defence.name, "steps": int(cfg["train"]["steps"]), "world": world,
        "data": data.info, "num_classes": data.num_classes, "input": list(defence.out_shape()),
        "val_accuracy": val, "tests": tests,
        "k_mean": mean_k(k_total), "k_mean_last20": mean_k(k_late),
        "k_hist": {str(k): c for k, c in sorted(k_total.items())},
        "k_hist_last20": {str(k): c for k, c in sorted(k_late.items())},
        "wall_s": time.time() - t_start, "skipped_images": SKIPS.count,
        "config": cfg,
    }
    if policy is not None:
        # pi(k) at the last logged training state (the metrics line of the final step)
        probs = None
        for line in (out / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("kind") == "train" and "policy_probs" in rec:
                probs = rec["policy_probs"]
        res["policy_probs_final"] = probs
        res["k_choices"] = [int(k) for k in policy.k_values]
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return res
