"""The README's code runs as printed: its Python example, and the shapes its comments promise."""
from __future__ import annotations

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path: str) -> list[str]:
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_quick_start_runs_as_printed():
    blocks = _python_blocks(os.path.join(ROOT, "README.md"))
    assert blocks, "README.md has no ```python block"
    scope: dict = {}
    exec(compile(blocks[0], "README.md quick start", "exec"), scope)  # noqa: S102 - our own README
    # what its comments say: z (32, 189, 112, 112); partner_labels, w (32, 4); a finite loss that trained
    assert scope["z"].shape == (32, 189, 112, 112)
    assert scope["partner_labels"].shape == scope["w"].shape == (32, 4)
    assert torch.allclose(scope["w"].sum(1), torch.ones(32)) and bool((scope["w"] <= 0.65 + 1e-6).all())
    assert torch.isfinite(scope["loss"]) and all(p.grad is not None for p in scope["backbone"].parameters())
