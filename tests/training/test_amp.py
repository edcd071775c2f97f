"""AMP: the backbone runs under autocast (bf16, or fp16 with a GradScaler), the masks and the head in fp32.

The loop enables AMP on CUDA; ``train.amp_cpu`` takes the same path on the CPU, which is how CI (no GPU)
exercises it."""
from __future__ import annotations

import pytest
import torch

from training.defences import build_defence
from training.loop import TrainStep, train
from training.loss import MarginHead
from training.model import build_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backbone_runs_in_the_amp_dtype_and_the_rest_in_fp32(tiny, tmp_path, dtype):
    cfg = tiny(tmp_path, **{"defence.name": "hybrid", "defence.k": 3})
    defence = build_defence(cfg, 1, torch.device("cpu"), 0)
    c_in, s_in = defence.out_shape()
    backbone = build_model("tiny", c_in, s_in, 16)
    head = MarginHead(16, 8, "cosface", 30.0, 0.2)
    seen = {}
    backbone.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].dtype, out=out.dtype))
    step = TrainStep(defence, backbone, head, dtype)
    x = torch.rand(8, 1, 112, 112) * 2 - 1
    y = torch.arange(8)
    loss, w = step(x, y, None)
    assert seen == {"inp": torch.float32, "out": dtype}, seen  # the mask's output is fp32, the backbone computes in dtype
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in step.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fp16_run_with_grad_scaler_resumes_exactly(tiny, tmp_path):
    over = {"defence.name": "hybrid", "defence.k": 2, "train.amp": "fp16", "train.amp_cpu": True, "train.steps": 4}
    full = tiny(tmp_path / "full", **over)
    train(full, resume=False)
    part = tiny(tmp_path / "part", **over)
    part["train"]["max_steps_this_run"] = 2
    train(part, resume=False)
    part["train"]["max_steps_this_run"] = None
    train(part, resume=True)
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)
    assert a["scaler"] is not None and a["scaler"] == b["scaler"]  # the GradScaler state is checkpointed
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
        else:  # extra state: the HybridMask generator
            assert torch.equal(v["generator"], b["model"][k]["generator"]), k


def test_bad_amp_value_is_an_error_naming_the_key(tiny, tmp_path):
    with pytest.raises(ValueError, match="train.amp"):
        train(tiny(tmp_path, **{"train.amp": "fp8"}), resume=False)
