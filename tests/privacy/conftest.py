"""Fixtures of the privacy tests: the project root on sys.path, one torch thread (2 shared cores: one thread
is several times faster than two under load, measured), ORL or a printed skip reason."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the project root on sys.path
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
