"""DDP on the CPU: 2 processes (gloo, torch.multiprocessing.spawn, a free port) train 2 steps of the adaptive
mask with partners drawn from the global batch; both ranks must end with the same network and policy."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from training.loop import train

    try:
        res = train(cfg, resume=False)
        ck = torch.load(os.path.join(cfg["out_dir"], "ckpt.pt"), map_location="cpu", weights_only=False) if rank == 0 else None
        torch.save({"rank": rank, "res_is_none": res is None, "ck": ck}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("global_partners", [True], ids=["global-partners"])
def test_ddp_two_cpu_processes(tmp_path, tiny, global_partners):
    cfg = tiny(tmp_path / "run", **{"defence.name": "adaptive", "defence.global_partners": global_partners,
                                   "train.steps": 2, "train.batch_size": 8, "policy.update_every": 1,
                                   "policy.mode": "sample", "train.eval_every": 1, "train.threads": 1})
    mp.spawn(_worker, args=(_free_port(), cfg, str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert not r0["res_is_none"] and r1["res_is_none"]  # rank 0 evaluates and writes results
    ck = r0["ck"]
    assert ck["world"] == WORLD and ck["step"] == 2 and len(ck["rank_state"]) == WORLD
    # each rank drew its own streams (different sign keys / weights), the partner stream is shared
    g0, g1 = (ck["rank_state"][r]["rng"]["generators"] for r in range(WORLD))
    assert not torch.equal(g0["defence.defence"], g1["defence.defence"])
    assert torch.equal(g0["defence.partners"], g1["defence.partners"])
    assert ck["policy"] is not None and int(ck["policy"]["updates"]) == 2
    # DDP kept the networks equal, the averaged policy gradients kept the policies equal
    f0, f1 = (ck["rank_state"][r]["fingerprint"] for r in range(WORLD))
    assert f0 == f1 and set(f0) == {"model", "policy"}
    assert (tmp_path / "run" / "results.json").exists()


def _worker_signalled(rank, port, cfg, out):
    """Rank 1 alone gets SIGTERM, from inside its first step."""
    import signal

    import training.loop as L

    if rank == 1:
        real = L.mixed_label_loss

        def loss_then_signal(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        L.mixed_label_loss = loss_then_signal
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        res = L.train(cfg, resume=False)
        torch.save({"res": res}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_ranks_stop_together_when_one_is_signalled(tmp_path, tiny):
    """A preemption signal that reaches one rank: both finish step 1 and write one checkpoint at step 1 (a
    rank that stopped alone would leave the other waiting in a collective)."""
    cfg = tiny(tmp_path / "run", **{"defence.name": "adaptive", "train.steps": 4, "train.batch_size": 8,
                                   "train.eval_every": 0, "train.threads": 1})
    mp.spawn(_worker_signalled, args=(_free_port(), cfg, str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["res"]
        assert res == {"step": 1, "stopped_early": True}, (r, res)
    ck = torch.load(tmp_path / "run" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 1 and ck["world"] == WORLD
