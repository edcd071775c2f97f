"""Fixtures of the privacy tests: one torch thread (2 shared cores: one thread is several times faster than
two under load, measured), ORL or a printed skip reason. The project root is put on sys.path by tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_thread):
    """tests/conftest.py's one_thread, for every privacy test."""


@pytest.fixture(scope="session")
def orl_root() -> Path:
    from training.data import data_root

    root = data_root() / "orl_faces"
    if not root.is_dir():
        pytest.skip(f"ORL faces not found at {root} (set FASTMIX_DATA or provide ../shared/data, see DATA.md)")
    return root


def defence_for(name: str, **over):
    """A freshly built training-layer defence on 56x56 grey faces (upsample 1: 7x7 grid)."""
    from training.config import load_config
    from training.defences import build_defence

    cfg = load_config(overrides={"data": {"size": 56}, "defence": {"name": name, "upsample": 1, **over}})
    return build_defence(cfg, 1, torch.device("cpu"), 0)


def synthetic(ids: int = 4, per_id: int = 4, seed: int = 0):
    from training.data import synthetic_faces

    return synthetic_faces(ids, per_id, 1, 56, seed)


@pytest.fixture(scope="session")
def smoke_judges(tmp_path_factory, orl_root) -> Path:
    """A work folder holding what the CLI tests' ORL seed-0 runs would otherwise each build again: the
    smoke-budget judges (``cache/``, about 15 s) and the attacker's face prior (``priors/``: the eigenfaces of
    ~2,800 faces, an SVD of 10-30 s on one thread). Trained once per test session; ``work_with_judges`` copies
    it into a test's own --work, so a test never shares files it writes."""
    from training.privacy import inversion as INV
    from training.privacy.data import get_split
    from training.privacy.judge import load_judge
    from training.privacy.run import JUDGES

    work = tmp_path_factory.mktemp("smoke_work")
    split = get_split("orl", 0)
    for _, kind in JUDGES:
        load_judge(split, kind, "smoke", 0, work, log=lambda *_: None)
    INV.attack_prior(split, work=work, seed=0, steps=INV.budget_of("smoke")["vae_steps"])
    return work


def work_with_judges(tmp_path: Path, smoke_work: Path) -> Path:
    """A fresh --work for one test, holding copies of ``smoke_judges``' judges and prior."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(smoke_work, work)
    return work
