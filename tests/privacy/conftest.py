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
    """A cache folder holding the smoke-budget judges of the ORL split (trained once per test session, about
    15 s): CLI tests copy it into their --work so each does not retrain them."""
    from training.privacy.data import get_split
    from training.privacy.judge import load_judge
    from training.privacy.run import JUDGES

    work = tmp_path_factory.mktemp("judges")
    split = get_split("orl", 0)
    for _, kind in JUDGES:
        load_judge(split, kind, "smoke", 0, work, log=lambda *_: None)
    return work / "cache"


def work_with_judges(tmp_path: Path, cache: Path) -> Path:
    import shutil

    work = tmp_path / "work"
    shutil.copytree(cache, work / "cache")
    return work
