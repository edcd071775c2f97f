"""Exact resume: 2N steps in one run == N steps, a checkpoint, a fresh process state, N more steps,
compared bit for bit (model, optimiser, policy, every RNG stream, the data position)."""
from __future__ import annotations

import json
import os
import random
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
