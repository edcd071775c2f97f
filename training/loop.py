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
generators), and the open metrics window. Resuming therefore continues bit for bit, metrics lines included
(tests/training/test_resume.py).

What can go wrong on disk is checked, not assumed: a checkpoint carries a SHA-256 of its contents, verified
on load (torch.load does not check the zip's CRCs: a flipped bit resumed silently); an empty, truncated or
damaged one, or a full disk while saving, is a CheckpointError naming the file and what to do; temporary
files of killed runs are removed at start; a torn last line of metrics.jsonl is dropped with a warning.

The run itself is ``Run``: its phases (setup, start / resume, train_step, policy_step, log_window, validate,
checkpoint, end) are methods called in order by ``_train``.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import shutil
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
from .config import DEFAULTS, check_values, flatten
from .data import SKIPS, ResumableBatchSampler, collate_skipping, load_data, to_float
from .defences import build_defence
from .exposure import build_exposure
from .loss import MarginHead, mixed_label_loss
from .model import build_model
from .policy import Policy

CKPT = "ckpt.pt"
METRICS = "metrics.jsonl"

# Config keys a resumed run may change: where it writes, how much it logs, how far this process runs, and
# the final evaluation. Any other difference means the checkpoint belongs to another experiment: resuming
# would report that run's model under this config.
RESUME_MAY_CHANGE = ("out_dir", "train.max_steps_this_run", "train.progress", "train.plot", "train.log_every", "train.threads",
                     "train.ckpt_every", "data.num_workers", "data.pairs", "data.bin_sets", "eval.")


DEFAULT_KEYS = flatten(DEFAULTS)


class ResumeMismatch(ValueError):
    """The out_dir holds a checkpoint written under another config (see RESUME_MAY_CHANGE)."""


def config_changes(saved: dict, cfg: dict) -> list[str]:
    """``key: old -> new`` for every key outside RESUME_MAY_CHANGE on which two configs differ."""
    a, b = flatten(saved), flatten(cfg)
    free = tuple(k for k in RESUME_MAY_CHANGE if k.endswith("."))
    # a key added to the config after the checkpoint was written, at its default, is the behaviour that
    # checkpoint ran with (new keys default to the old behaviour), not a change
    new_at_default = {key for key, val in b.items() if key not in a and key in DEFAULT_KEYS and DEFAULT_KEYS[key] == val}
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and key not in RESUME_MAY_CHANGE and not key.startswith(free)
            and key not in new_at_default]


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
        """(per-face loss (M,), the defence's output ``Masked`` with its rows detached: the loop counts k from it
        and the adaptive policy's S5 proxy records the released rows)."""
        m = self.defence(x, y, k)
        if self.tap is not None:
            self.tap(x.detach(), y.detach(), m)
        with torch.autocast(device_type=m.x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            emb = self.backbone(m.x)
        return mixed_label_loss(self.head, emb.float(), m.labels, m.weights), dataclasses.replace(m, x=m.x.detach())


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


class CheckpointError(RuntimeError):
    """ckpt.pt cannot be resumed (empty, truncated, damaged, failing its checksum) or cannot be written (a full
    disk); the message names the file and what to do. The command lines report it in one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _digest(obj, h) -> None:
    """Feed ``obj`` to the hash ``h`` in a canonical form: tensors and arrays by dtype, shape and bytes (in
    logical order, whatever their strides or device), containers by their items in order, scalars and strings
    by repr (which round-trips floats exactly)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).view(np.uint8))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():  # insertion order: torch.save / load keep it
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    elif isinstance(obj, (set, frozenset)):  # iteration order of a set of strings changes between processes
        h.update(f"S{sorted(map(repr, obj))}".encode())
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_checksum(state: dict) -> str:
    """SHA-256 of a checkpoint's contents (``_digest``), the "checksum" entry itself excluded."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


def with_checksum(state: dict) -> dict:
    """The state with its checksum: torch.save's zip records carry CRC-32s that torch.load never checks, so a
    flipped bit in a weight resumed silently (a run finished with test accuracy 0.34 instead of 0.65)."""
    return {**state, "checksum": {"sha256": state_checksum(state)}}


def load_checkpoint(path: Path) -> dict:
    """torch.load a checkpoint and verify its checksum; CheckpointError naming the file and --fresh otherwise."""
    what_to_do = (f"start over with --fresh (train(..., resume=False)), or move {path.name} away to keep it "
                  f"and write elsewhere with --out")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (a run killed while creating it, or a full disk); {what_to_do}")
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as exc:  # torch.load / zipfile / pickle raise many types on damaged data
        raise CheckpointError(f"checkpoint {path} cannot be read, it is truncated or damaged ({type(exc).__name__}: "
                              f"{_first_line(exc)}); {what_to_do}") from exc
    if not isinstance(ck, dict) or "step" not in ck or "model" not in ck:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no step / model entries); {what_to_do}")
    stored = ck.pop("checksum", None)
    if stored is None:
        warnings.warn(f"{path} has no checksum (written before checkpoints carried one): resuming it unverified",
                      stacklevel=3)
    elif not isinstance(stored, dict) or stored.get("sha256") != state_checksum(ck):
        raise CheckpointError(f"checkpoint {path} fails its checksum: its contents changed after it was written (a "
                              f"flipped bit on disk or in a copy); resuming would continue from damaged weights. {what_to_do}")
    return ck


def _save_failure(path: Path, exc: BaseException) -> str:
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "file write failed" in str(exc)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = (f"{path} still holds the previous checkpoint (the same command resumes from it)" if path.exists()
            else f"no checkpoint is left in {path.parent}")
    if full:
        return (f"cannot write the checkpoint {path}: no space left on the device ({free}). {kept}; free space, or "
                f"write elsewhere with --out, and run the command again")
    return f"cannot write the checkpoint {path} ({type(exc).__name__}: {_first_line(exc)}). {kept}"


def atomic_save(obj, path: Path) -> None:
    """torch.save to <path>.tmp.<pid>, fsync, then os.replace: readers see the old or the new file, never half.
    A failed write (a full disk: torch reports it as "enforce fail at inline_container.cc") removes its
    temporary file and raises CheckpointError saying so."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(_save_failure(path, exc)) from exc


def remove_orphan_temporaries(path: Path) -> list[Path]:
    """Remove <path>.tmp.<pid> files left by runs killed inside atomic_save (on a full disk every retry left one
    more), except those of a process still running on this machine; returns the removed paths."""
    gone = []
    for tmp in path.parent.glob(f"{path.name}.tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    if gone:
        print(f"[training] removed {len(gone)} temporary checkpoint file(s) of interrupted runs: "
              f"{', '.join(p.name for p in gone)}", flush=True)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, another user's
    return True


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


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of metrics.jsonl. A line that is not JSON is dropped with a warning: a run
    killed while appending leaves its last line torn, and that stopped every later resume with a traceback.
    The log is a record of the run, not its state, so losing that line loses nothing the checkpoint needs."""
    out, torn = [], []
    if not path.exists():
        return out
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn.append(i)
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
        else:
            torn.append(i)
    if torn:
        where = "its last line" if torn == [len(lines)] else f"line(s) {', '.join(map(str, torn))} of {len(lines)}"
        warnings.warn(f"{path}: dropped {where}, not a complete JSON record (a run killed while writing it)", stacklevel=2)
    return out


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss, validation accuracy, mean k and the k distribution over training, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [rec for _, rec in read_metrics(jsonl)]
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
    checks = fastmix.set_index_checks(True)  # restored on return; Run turns them off on a GPU
    try:
        return _train(cfg, resume, data, tap)
    finally:
        fastmix.set_index_checks(checks)


def _train(cfg: dict, resume: bool, data, tap=None) -> dict:
    run = Run(cfg, data, tap)
    run.start(resume)
    with StopOnSignal() as stopper:  # Ctrl-C / SIGTERM: checkpoint at the next step boundary, not lost work
        while run.step < run.stop:
            batch = next(run.batches)
            run.consumed += 1
            if batch is None:  # every image of the batch was unreadable (counted): take the next batch
                continue
            run.train_step(*batch)
            if run.step % int(run.tc["log_every"]) == 0 or run.step == run.total:
                run.log_window()
            if int(run.tc["eval_every"]) and run.step % int(run.tc["eval_every"]) == 0 and run.step < run.total:
                run.val_acc = run.validate()
            if int(run.tc["ckpt_every"]) and run.step % int(run.tc["ckpt_every"]) == 0:
                run.checkpoint()
            if stopper.requested(run.world, run.device):
                break
    return run.end()


class Run:
    """One training run, as the phases ``_train`` calls in order:

    setup (``__init__``: process group, data, defence, network, optimisers, policy, RNG streams) ->
    ``start`` (resume from the checkpoint or start over; the batch stream; metrics.jsonl) ->
    per step ``train_step`` (an FR step; ``policy_step`` every policy.update_every steps), ``log_window``,
    ``validate``, ``checkpoint`` -> ``end`` (last checkpoint, ``finish``: final evaluation and results.json).

    The order of every random draw is the one the exact resume relies on (tests/training/test_resume.py):
    anything added here draws from its own generator or from none."""

    def __init__(self, cfg: dict, data, tap):
        self.t_start = time.time()
        check_values(cfg)  # again: callers may edit the dict after load_config
        self.cfg, self.tc, self.pc = cfg, cfg["train"], cfg["policy"]
        self.rank, self.world, self.device = setup_distributed(cfg)
        self.main = _is_main(self.rank)
        if self.device.type != "cpu":
            # The partners come from HybridMask / fastmix's samplers, valid by construction: no range check,
            # whose host sync would stall every step behind the work queued before it.
            fastmix.set_index_checks(False)
        tc, rank, device = self.tc, self.rank, self.device
        if tc["threads"]:
            torch.set_num_threads(int(tc["threads"]))
        self.seed = seed = int(cfg["seed"])
        torch.manual_seed(seed + rank)
        np.random.seed(seed + rank)
        random.seed(seed + rank)
        self.out = Path(cfg["out_dir"])
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_orphan_temporaries(self.out / CKPT)

        self.data = data = data if data is not None else load_data(cfg)
        amp = None
        # AMP is for GPUs; train.amp_cpu runs the same autocast path on the CPU (tests, or a CPU with bf16 units)
        if tc["amp"] != "off" and (device.type == "cuda" or tc["amp_cpu"]):
            amp = torch.bfloat16 if tc["amp"] == "bf16" else torch.float16
        self.defence = defence = build_defence(cfg, data.channels, device, seed * 1000 + 17 + rank)
        c_in, s_in = defence.out_shape()
        mc = cfg["model"]
        backbone = build_model(mc["arch"], c_in, s_in, int(mc["embedding"]), float(mc["width"]), float(mc["dropout"]))
        head = MarginHead(int(mc["embedding"]), data.num_classes, cfg["head"]["type"], cfg["head"]["s"], cfg["head"]["m"])
        self.step_mod = step_mod = TrainStep(defence, backbone, head, amp).to(device)
        step_mod.tap = tap
        self.net = (nn.parallel.DistributedDataParallel(step_mod, device_ids=[device.index] if device.type == "cuda" else None)
                    if self.world > 1 else step_mod)

        params = [p for p in step_mod.parameters() if p.requires_grad]
        if tc["optimizer"] == "sgd":
            decay = [p for p in params if p.dim() > 1]
            no_decay = [p for p in params if p.dim() <= 1]
            self.opt = torch.optim.SGD([{"params": decay, "weight_decay": float(tc["weight_decay"])},
                                        {"params": no_decay, "weight_decay": 0.0}],
                                       lr=float(tc["lr"]), momentum=float(tc["momentum"]))
        elif tc["optimizer"] == "adamw":
            self.opt = torch.optim.AdamW(params, lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
        else:
            raise ValueError(f"train.optimizer must be sgd or adamw, got {tc['optimizer']!r}")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tc))
        self.scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

        self.policy = self.popt = None
        if defence.adaptive:
            exposure = None
            if self.pc["privacy_signal"] == "s5_proxy":
                if self.world > 1:
                    raise ValueError("policy.privacy_signal='s5_proxy' runs single-process (its per-face state would "
                                     "need every rank's rows); use policy.privacy_signal='loss' under torchrun")
                # the client's copy of S5 on its own stream (training/exposure.py): per-face running averages
                exposure = build_exposure(defence, len(data.train), int(tc["batch_size"]), bool(cfg["data"]["flip"]),
                                          int(tc["steps"]), seed=seed)
            self.policy = Policy(self.pc, cfg["defence"]["k_choices"], data.num_classes, defence.color, seed, device,
                                 exposure=exposure)
            self.popt = torch.optim.Adam(self.policy.net.parameters(), lr=float(self.pc["lr"]))
            if data.val is None and self.main:
                warnings.warn("adaptive defence without a validation set (data.val_identities = 0, or data.val_bin unset "
                              "for a RecordIO pack): the policy's accuracy term (policy.target_acc) is inactive, it "
                              "maximises the FR loss alone", stacklevel=3)
            if self.world > 1:  # one policy for all ranks: start from rank 0's weights (DDP does the same for the network)
                with torch.no_grad():
                    for p in self.policy.parameters():
                        dist.broadcast(p.data, 0)

        self.data_gen = torch.Generator().manual_seed(seed * 7 + 3 + rank)  # augmentation (flips)
        self.generators = {f"defence.{k}": g for k, g in defence.generators().items()}
        self.generators["data"] = self.data_gen
        self.total = int(tc["steps"])
        self.step, self.start_pos = 0, (0, 0)
        self.k_total: dict[int, int] = {}
        self.k_late: dict[int, int] = {}  # k counts over the last 20% of the steps ("where the policy settled")
        self.late_from = int(0.8 * self.total)
        self.ckpt_path = self.out / CKPT
        self.consumed = 0
        self.metrics_f = None
        self.bar = None
        self.last_policy: dict = {}
        self.s = None  # the latest policy state (policy_probs of the metrics line)
        self.win = new_window()

    # --- start: resume or start over ------------------------------------------------------------------

    def start(self, resume: bool) -> None:
        tc, cfg = self.tc, self.cfg
        if resume and self.ckpt_path.exists():
            self.resume()
        elif self.main:
            (self.out / METRICS).unlink(missing_ok=True)
        self.sampler = ResumableBatchSampler(len(self.data.train), int(tc["batch_size"]), self.seed, self.rank,
                                             self.world, self.start_pos)
        loader = torch.utils.data.DataLoader(self.data.train, batch_sampler=self.sampler, collate_fn=collate_skipping,
                                             num_workers=int(cfg["data"]["num_workers"]), pin_memory=self.device.type == "cuda",
                                             worker_init_fn=ignore_stop_signals,
                                             # its own generator: creating the iterator must not draw from the global stream
                                             generator=torch.Generator().manual_seed(self.seed))
        self.batches = iter(loader)
        if self.main:
            if self.step > 0:
                # the log must match the state: lines past the checkpoint (written by a run that died after it)
                # go, and so does a line torn by that death (read_metrics warns)
                keep = [text for text, rec in read_metrics(self.out / METRICS) if rec.get("step", 0) <= self.step]
                (self.out / METRICS).write_text("".join(t + "\n" for t in keep))
            self.metrics_f = open(self.out / METRICS, "a")
        self.stop = self.total if tc["max_steps_this_run"] is None else min(self.total, self.step + int(tc["max_steps_this_run"]))
        if tc["progress"] and self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.step, desc=f"{cfg['name']}:{self.defence.name}", dynamic_ncols=True)
        self.val_acc = float(self.policy.val_acc) if self.policy is not None else float("nan")

    def resume(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        changed = config_changes(ck["config"], self.cfg) if "config" in ck else []
        if changed:
            raise ResumeMismatch(f"{self.ckpt_path} is a checkpoint of another config ({'; '.join(changed)}); resuming "
                                 "it would report that run under this config. Start over (--fresh, resume=False) "
                                 "or write elsewhere (--out, out_dir)")
        try:
            self.step_mod.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["opt"])
            self.sched.load_state_dict(ck["sched"])
            if self.scaler is not None and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            if self.policy is not None:
                self.policy.load_state_dict(ck["policy"])
                self.popt.load_state_dict(ck["policy_opt"])
            per_rank = ck["rank_state"]
        except (KeyError, RuntimeError, ValueError) as exc:  # passed its checksum, yet not this run's layout
            raise CheckpointError(f"{self.ckpt_path} does not fit this run ({type(exc).__name__}: {_first_line(exc)}); "
                                  f"start over with --fresh (resume=False) or write elsewhere with --out") from exc
        if len(per_rank) != self.world:
            raise RuntimeError(f"checkpoint was written by {len(per_rank)} ranks, this run has {self.world}; exact resume needs the same world size")
        mine = per_rank[self.rank]
        set_rng_state(mine["rng"], self.generators, self.device)
        if self.policy is not None:
            self.policy.load_extra_state(mine["policy"])
        self.step, self.start_pos = ck["step"], tuple(ck["position"])
        self.k_total = {int(a): b for a, b in ck["k_total"].items()}
        self.k_late = {int(a): b for a, b in ck["k_late"].items()}
        # The metrics window open at the checkpoint (steps since the last metrics line): the next line averages
        # the same steps as in an uninterrupted run. Checkpoints from before it was saved start an empty one.
        self.win = new_window(ck.get("window"))
        if self.main:
            print(f"[training] resumed from {self.ckpt_path} at step {self.step} (data position epoch "
                  f"{self.start_pos[0]}, batch {self.start_pos[1]})")

    # --- step ----------------------------------------------------------------------------------------

    def train_step(self, u8: torch.Tensor, y: torch.Tensor) -> None:
        """One FR step on a batch (uint8 faces, labels), the policy's record of it, and the k counts."""
        device, policy = self.device, self.policy
        x = to_float(u8.to(device, non_blocking=True))
        y = y.to(device)
        f = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        if self.cfg["data"]["flip"]:
            f = (torch.rand(x.shape[0], generator=self.data_gen) < 0.5).to(device)
            x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
        k = a = s = None
        if policy is not None:
            s = policy.state(x, self.step / max(1, self.total), **self.release_of(x, f))
            k, a = policy.act(s, x.shape[0])
        loss_vec, released = self.net(x, y, k)
        loss = loss_vec.mean()
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        with warnings.catch_warnings():
            # fp16: GradScaler skips the optimiser step when the scaled gradients overflow (the first steps, while
            # it finds its scale); the schedule still advances with the step count, on purpose (exact resume
            # counts steps), so torch's "lr_scheduler.step() before optimizer.step()" warning does not apply.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
            self.sched.step()
        if policy is not None:
            policy.record(s, a, policy.reward(loss_vec, a, released))
            policy.observe_loss(float(loss.detach()))
            if (self.step + 1) % int(self.pc["update_every"]) == 0:
                self.policy_step()
            self.s = s
        # k actually used per face: the faces mixed into its row (pool partners carry loss weight 0), else the
        # partners with a non-zero weight
        used = (released.mixed if released.mixed is not None else (released.weights != 0).sum(1)).cpu()
        win = self.win
        for kv, cnt in zip(*torch.unique(used, return_counts=True)):
            kv, cnt = int(kv), int(cnt)
            win["k"][kv] = win["k"].get(kv, 0) + cnt
            self.k_total[kv] = self.k_total.get(kv, 0) + cnt
            if self.step >= self.late_from:
                self.k_late[kv] = self.k_late.get(kv, 0) + cnt
        win["loss"] += float(loss.detach())
        win["n"] += 1
        win["imgs"] += x.shape[0] * self.world
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(loss.detach()):.3f}", k=f"{used.float().mean():.2f}", val=f"{self.val_acc:.3f}")

    def release_of(self, x: torch.Tensor, flipped: torch.Tensor) -> dict:
        """What the policy's S5 proxy needs about the batch under way (nothing for the other privacy signals):
        each face's slot (its training-set index, from the sampler's position of this batch, and its flip),
        the faces encoded alone, and the step. A batch whose unreadable image was replaced by another of the
        batch (collate_skipping) credits that row to the unreadable one's slot; only RecordIO packs skip."""
        if getattr(self.policy, "exposure", None) is None:
            return {}
        index = torch.tensor(self.sampler.indices_at(self.sampler.position_after(self.consumed - 1)))
        with torch.no_grad():
            truth = self.defence.encode_alone(x).flatten(1)
        return {"slots": self.policy.exposure.slots(index, flipped.cpu()), "truth": truth, "step": self.step}

    # --- policy update -------------------------------------------------------------------------------

    def policy_step(self) -> None:
        """REINFORCE step of the strategy network on the (state, action, reward) buffer."""
        self.last_policy = self.policy.update(self.popt)

    # --- metrics -------------------------------------------------------------------------------------

    def log(self, rec: dict) -> None:
        if self.metrics_f is not None:
            self.metrics_f.write(json.dumps(rec) + "\n")
            self.metrics_f.flush()

    def log_window(self) -> None:
        """One "train" line averaging the steps since the previous one, then a new window."""
        win, kh = self.win, self.win["k"]
        rec = {
            "kind": "train", "step": self.step, "lr": self.sched.get_last_lr()[0], "loss": win["loss"] / max(1, win["n"]),
            "k_mean": sum(k_ * c for k_, c in kh.items()) / max(1, sum(kh.values())), "k_hist": {str(k_): c for k_, c in sorted(kh.items())},
            "window_steps": win["n"],
            # measured over the window's steps run by this process (after a resume: those since the resume)
            "imgs_per_s": win["imgs"] / max(1e-9, time.time() - win["t"]), "skipped_images": SKIPS.count,
        }
        if self.policy is not None:
            rec["policy_probs"] = [round(float(p), 4) for p in self.policy.mean_probs(self.s)]
            rec.update(self.last_policy)
        self.log(rec)
        self.win = new_window()

    # --- validate ------------------------------------------------------------------------------------

    def validate(self) -> float:
        """Held-out accuracy (rank 0 evaluates, the others receive it); the policy's utility signal."""
        data, world = self.data, self.world
        acc = torch.zeros(1)
        res = None
        if data.val is not None and self.main:
            res = evaluation.evaluate(data.val, self.step_mod.backbone, self.defence, self.device, int(self.cfg["eval"]["batch_size"]))
            acc[0] = res["accuracy"]
        if world > 1:
            acc = acc.to(self.device) if dist.get_backend() == "nccl" else acc
            dist.broadcast(acc, 0)
        if self.policy is not None and data.val is not None:  # no validation set: no accuracy, not "accuracy 0"
            self.policy.observe_validation(float(acc[0]))
        if res is not None:
            self.log({"kind": "val", "step": self.step, **res})
        return float(acc[0])

    # --- checkpoint ----------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        # float64 sums of the parameters: identical on every rank when DDP and the policy sync work
        with torch.no_grad():
            fp = {"model": float(sum(p.double().sum() for p in self.step_mod.parameters()))}
            if self.policy is not None:
                fp["policy"] = float(sum(p.double().sum() for p in self.policy.parameters()))
        return fp

    def checkpoint(self) -> None:
        policy, popt = self.policy, self.popt
        per = _gather_objects({"rng": rng_state(self.generators, self.device), "policy": policy.extra_state() if policy else None,
                               "fingerprint": self.fingerprint()}, self.world)
        if self.main:
            atomic_save(with_checksum({
                "step": self.step, "position": self.sampler.position_after(self.consumed), "model": self.step_mod.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "policy": policy.state_dict() if policy else None, "policy_opt": popt.state_dict() if popt else None,
                "rank_state": per, "k_total": self.k_total, "k_late": self.k_late, "config": self.cfg, "world": self.world,
                "window": {k: self.win[k] for k in ("loss", "n", "k")},
            }), self.ckpt_path)
        if self.world > 1:
            dist.barrier()

    # --- end -----------------------------------------------------------------------------------------

    def end(self) -> dict | None:
        if self.bar is not None:
            self.bar.close()
        self.checkpoint()
        results = None
        if self.step >= self.total:
            results = finish(self.cfg, self.data, self.step_mod, self.defence, self.policy, self.device, self.rank,
                             self.k_total, self.k_late, self.out, self.t_start, self.validate, self.world)
        if self.metrics_f is not None:
            self.metrics_f.close()
            if self.cfg["train"]["plot"] and (self.out / METRICS).stat().st_size:
                plot_metrics(self.out / METRICS, self.out / "metrics.png")
        if self.world > 1:
            # Leave together: a rank that tears its process group down while rank 0 still evaluates the test
            # sets can abort in gloo's connection threads (seen once in the 2-process CPU test under load).
            dist.barrier()
        if self.step < self.total:
            return {"step": self.step, "stopped_early": True}
        return results  # None on ranks other than 0


def new_window(saved: dict | None = None) -> dict:
    """The metrics window: loss sum, steps, k counts (restored from a checkpoint), and the images and start time
    of the throughput (this process's own)."""
    win = {"loss": 0.0, "n": 0, "k": {}, "t": time.time(), "imgs": 0}
    if saved:
        win.update(loss=saved["loss"], n=saved["n"], k={int(k): c for k, c in saved["k"].items()})
    return win


def finish(cfg, data, step_mod, defence, policy, device, rank, k_total, k_late, out, t_start, validate, world):
    """Final validation and test evaluation; results.json on rank 0. Every test reports its accuracy with and
    without flip test-time augmentation (``accuracy_plain``, ``accuracy_flip``); ``accuracy`` is the one
    eval.tta_flip names (plain by default, unlike arcface_torch's headline "Accuracy-Flip")."""
    val = validate()
    if not _is_main(rank):
        return None
    ec = cfg["eval"]
    tests = [evaluation.evaluate(t, step_mod.backbone, defence, device, int(ec["batch_size"]), bool(ec["tta_flip"]),
                                 int(ec["folds"]), float(ec["far"]), both=True)
             for t in data.tests]

    def mean_k(h):
        return sum(k * c for k, c in h.items()) / max(1, sum(h.values()))

    res = {
        "name": cfg["name"], "defence": defence.name, "steps": int(cfg["train"]["steps"]), "world": world,
        "data": data.info, "num_classes": data.num_classes, "input": list(defence.out_shape()),
        "val_accuracy": val, "tests": tests, "tta_flip": bool(ec["tta_flip"]),
        "k_mean": mean_k(k_total), "k_mean_last20": mean_k(k_late),
        "k_hist": {str(k): c for k, c in sorted(k_total.items())},
        "k_hist_last20": {str(k): c for k, c in sorted(k_late.items())},
        "wall_s": time.time() - t_start, "skipped_images": SKIPS.count,
        "config": cfg,
    }
    if policy is not None:
        # pi(k) at the last logged training state (the metrics line of the final step)
        probs = None
        for _, rec in read_metrics(out / METRICS):
            if rec.get("kind") == "train" and "policy_probs" in rec:
                probs = rec["policy_probs"]
        res["policy_probs_final"] = probs
        res["k_choices"] = [int(k) for k in policy.k_values]
        if policy.exposure is not None:  # the client's own estimate of S5 (informed repeat average) at the end
            res["exposure"] = policy.exposure.summary()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return res
