"""Exact resume: 2N steps in one run == N steps, a checkpoint, a fresh process state, N more steps,
compared bit for bit (model, optimiser, policy, every RNG stream, the data position)."""
from __future__ import annotations

import random

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

    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert a["step"] == b["step"] == 2 * N and tuple(a["position"]) == tuple(b["position"])
    for key in ("model", "opt", "sched", "policy", "policy_opt", "rank_state", "k_total"):
        _assert_same(a[key], b[key], key)
    # the final evaluation saw identical networks
    ra = (tmp_path / "full" / "results.json").read_text()
    rb = (tmp_path / "part" / "results.json").read_text()
    import json

    ja, jb = json.loads(ra), json.loads(rb)
    assert ja["tests"] == jb["tests"] and ja["val_accuracy"] == jb["val_accuracy"]


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
