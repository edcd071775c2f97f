"""Exact resume: 2N steps in one run == N steps, a checkpoint, a fresh process state, N more steps,
compared bit for bit (model, optimiser, policy, every RNG stream, the data position)."""
from __future__ import annotations

import json
import os
import random
import re
import signal

import numpy as np
import pytest
import torch

from training.loop import CKPT, train

N = 3


def _state(out):
    return torch.load(out / CKPT, map_location="cpu", weights_only=False)


def _assert_same(a, b, path="ckpt"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("config",):
                _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("defence,mode", [("adaptive", "sample"), ("dctdp", "batch")])
def test_resume_is_exact(tmp_path, tiny, defence, mode):
    over = {"defence.name": defence, "policy.mode": mode, "train.steps": 2 * N, "train.eval_every": 2,
            "policy.update_every": 2, "data.synthetic_per_id": 5}  # 40 faces, batch 8: an epoch boundary at 5
    full = tiny(tmp_path / "full", **over)
    train(full, resume=False)

    part = tiny(tmp_path / "part", **over)
    part["train"]["max_steps_this_run"] = N
    r1 = train(part, resume=False)
    assert r1.get("stopped_early") and _state(tmp_path / "part")["step"] == N
    # scramble the process-global streams: resume must restore them from the checkpoint
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    part["train"]["max_steps_this_run"] = None
    r2 = train(part, resume=True)
    assert r2["steps"] == 2 * N

    _assert_same_run(tmp_path / "full", tmp_path / "part")


def _assert_same_run(full, part):
    a, b = _state(full), _state(part)
    assert a["step"] == b["step"] == 2 * N and tuple(a["position"]) == tuple(b["position"])
    for key in ("model", "opt", "sched", "policy", "policy_opt", "rank_state", "k_total"):
        _assert_same(a[key], b[key], key)
    # the final evaluation saw identical networks
    ja, jb = (json.loads((d / "results.json").read_text()) for d in (full, part))
    assert ja["tests"] == jb["tests"] and ja["val_accuracy"] == jb["val_accuracy"]


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(tmp_path, tiny, monkeypatch):
    """SIGTERM (or Ctrl-C) during step N: the step completes, the checkpoint is written, train() returns
    stopped_early and restores the signal handlers; resuming gives the uninterrupted run bit for bit. The
    signal is sent from inside step N (the loss call), so the step it lands in is deterministic."""
    import training.loop as L

    over = {"defence.name": "adaptive", "policy.mode": "sample", "train.steps": 2 * N, "train.eval_every": 2,
            "policy.update_every": 2, "data.synthetic_per_id": 5}
    train(tiny(tmp_path / "full", **over), resume=False)

    real, calls = L.mixed_label_loss, {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == N:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(L, "mixed_label_loss", loss_then_signal)
    part = tiny(tmp_path / "part", **over)
    r1 = train(part, resume=False)
    assert r1.get("stopped_early") and r1["step"] == N and _state(tmp_path / "part")["step"] == N
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    monkeypatch.setattr(L, "mixed_label_loss", real)
    r2 = train(part, resume=True)
    assert r2["steps"] == 2 * N
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def test_a_second_signal_stops_at_once():
    from training.loop import StopOnSignal

    st = StopOnSignal()
    st._handle(signal.SIGINT, None)
    assert st.flag and st.requested(1, torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        st._handle(signal.SIGINT, None)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    from training import loop

    path = tmp_path / "ckpt.pt"
    loop.atomic_save({"a": 1}, path)
    calls = []
    real = loop.os.replace

    def spy(src, dst):
        calls.append((str(src), str(dst)))
        assert torch.load(src, weights_only=False) == {"a": 2}  # complete before it becomes visible
        assert torch.load(dst, weights_only=False) == {"a": 1}
        return real(src, dst)

    monkeypatch.setattr(loop.os, "replace", spy)
    loop.atomic_save({"a": 2}, path)
    assert calls and calls[0][1] == str(path)
    assert torch.load(path, weights_only=False) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


class _SignalDispositions(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                             signal.getsignal(signal.SIGTERM) == signal.SIG_IGN])


def test_dataloader_workers_leave_stop_signals_to_the_trainer():
    """Ctrl-C reaches the DataLoader workers too; they ignore it (the training process checkpoints, then shuts
    them down) instead of dying under the loop."""
    from training.loop import ignore_stop_signals

    loader = torch.utils.data.DataLoader(_SignalDispositions(), batch_size=2, num_workers=1,
                                         worker_init_fn=ignore_stop_signals)
    assert next(iter(loader)).all()


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints and logs: a clear error or a repair, never a silent resume or a traceback
# ----------------------------------------------------------------------------------------------------

def _stopped_run(tmp_path, tiny, steps=4, stop=2, **over):
    cfg = tiny(tmp_path / "run", **{"defence.name": "hybrid", "defence.k": 2, "train.steps": steps, **over})
    cfg["train"]["max_steps_this_run"] = stop
    assert train(cfg, resume=False).get("stopped_early")
    cfg["train"]["max_steps_this_run"] = None
    return cfg


def test_a_bit_flipped_checkpoint_is_refused(tmp_path, tiny):
    """16 bytes XORed inside the classifier weights of ckpt.pt resumed silently (the run finished with exit 0
    and a much lower accuracy): torch.load does not check the zip CRCs. The checkpoint now carries a checksum
    of its contents, verified on load; the error names the file and --fresh."""
    from training.loop import CheckpointError, load_checkpoint, state_checksum

    cfg = _stopped_run(tmp_path, tiny)
    path = tmp_path / "run" / CKPT
    ck = load_checkpoint(path)  # intact: verifies
    w = ck["model"]["head.weight"].contiguous().view(torch.uint8).flatten().numpy().tobytes()
    raw = bytearray(path.read_bytes())
    at = raw.find(w[:64])
    assert at > 0 and raw.find(w[:64], at + 1) < 0
    for i in range(at + 100, at + 116):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    flipped = torch.load(path, map_location="cpu", weights_only=False)  # torch itself reads it without complaint
    assert not torch.equal(flipped["model"]["head.weight"], ck["model"]["head.weight"])
    assert state_checksum(flipped) != flipped["checksum"]["sha256"]
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} fails its checksum.*--fresh"):
        train(cfg, resume=True)
    assert train(cfg, resume=False)["steps"] == 4  # --fresh


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_names_the_file_and_fresh(tmp_path, tiny, capsys, damage):
    """An empty, truncated or overwritten ckpt.pt was a raw torch traceback naming neither the file nor --fresh;
    now CheckpointError, and from the command line one line with exit 2."""
    import yaml

    from training import train as cli
    from training.loop import CheckpointError

    cfg = _stopped_run(tmp_path, tiny)
    path = tmp_path / "run" / CKPT
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": b"\x00not a checkpoint" * 50}[damage])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} .*--fresh"):
        train(cfg, resume=True)
    out = cfg.pop("out_dir")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(p), "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(path) in err and "--fresh" in err and "Traceback" not in err


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, tiny):
    """A run killed while appending to metrics.jsonl leaves a torn last line; every resume then stopped with a
    JSONDecodeError traceback. It is dropped with a warning, and the run resumes."""
    cfg = _stopped_run(tmp_path, tiny, **{"train.log_every": 1})
    log = tmp_path / "run" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"kind": "train", "step": 2, "lo')
    with pytest.warns(UserWarning, match="dropped its last line, not a complete JSON record"):
        res = train(cfg, resume=True)
    assert res["steps"] == 4
    rows = [json.loads(x) for x in log.read_text().splitlines()]  # all whole now
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]


def test_orphan_temporary_checkpoints_are_removed_at_start(tmp_path, tiny):
    """A run killed inside atomic_save (or failing on a full disk) left ckpt.pt.tmp.<pid> behind, one more per
    retry. They are removed when a run starts, except one of a process still running (its writer)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = out / f"{CKPT}.tmp.{int(dead.stdout)}"
    orphan.write_bytes(b"partial")
    live = out / f"{CKPT}.tmp.{os.getppid()}"
    live.write_bytes(b"being written")
    train(tiny(out, **{"defence.name": "hybrid", "train.steps": 1}), resume=False)
    assert not orphan.exists() and live.exists()
    assert sorted(p.name for p in out.glob(f"{CKPT}*")) == sorted([CKPT, live.name])


def test_a_full_disk_while_saving_says_so(tmp_path, tiny, monkeypatch, capsys):
    """ENOSPC while writing ckpt.pt was "enforce fail at inline_container.cc:672"; now a CheckpointError saying
    the disk is full and that the previous checkpoint is intact, no temporary file left behind, and one line
    (exit 1) from the command line. The disk is /dev/full: every write fails with ENOSPC."""
    import builtins

    import yaml

    from training import loop
    from training import train as cli
    from training.loop import CheckpointError

    cfg = _stopped_run(tmp_path, tiny)
    before = (tmp_path / "run" / CKPT).read_bytes()

    def full_disk(path, mode="r", *args, **kwargs):
        if ".tmp." in str(path):
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(loop, "open", full_disk, raising=False)
    with pytest.raises(CheckpointError, match=r"no space left on the device.*still holds the previous checkpoint"):
        train(cfg, resume=True)
    assert (tmp_path / "run" / CKPT).read_bytes() == before
    assert not list((tmp_path / "run").glob(f"{CKPT}.tmp.*"))
    out = cfg.pop("out_dir")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert cli.main(["--config", str(p), "--out", out]) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "Traceback" not in err


def test_the_first_metrics_line_after_a_resume_covers_its_whole_window(tmp_path, tiny):
    """The window of steps a metrics line averages was lost at a resume: the first line after it covered only
    the steps since the resume (and the stopped run wrote an extra partial line). The window travels in the
    checkpoint, so the log of a resumed run is the uninterrupted run's (throughput aside)."""
    over = {"defence.name": "adaptive", "train.steps": 6, "train.log_every": 4, "policy.update_every": 2,
            "data.synthetic_per_id": 5}
    train(tiny(tmp_path / "full", **over), resume=False)
    part = tiny(tmp_path / "part", **over)
    part["train"]["max_steps_this_run"] = 3
    train(part, resume=False)
    part["train"]["max_steps_this_run"] = None
    train(part, resume=True)

    def lines(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "imgs_per_s"} for r in rows if r["kind"] == "train"]

    full, resumed = lines(tmp_path / "full"), lines(tmp_path / "part")
    assert [r["step"] for r in full] == [4, 6] and [r["window_steps"] for r in full] == [4, 2]
    assert resumed == full
