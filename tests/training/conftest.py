"""Shared helpers for the training-layer tests: tiny configs on synthetic faces (CPU, seconds)."""
from __future__ import annotations

import copy

import pytest

from training.config import load_config  # the project root is on sys.path through tests/conftest.py


def tiny_config(out_dir, **over) -> dict:
    """A few-step run of the tiny backbone on 8 synthetic identities x 6 faces (C = 1, 112x112)."""
    cfg = load_config(overrides={
        "name": "tiny",
        "out_dir": str(out_dir),
        "data": {"kind": "synthetic", "synthetic_ids": 8, "synthetic_per_id": 6, "color": "grey"},
        "defence": {"name": "adaptive", "upsample": 1},
        "model": {"arch": "tiny", "embedding": 16},
        "train": {"steps": 4, "batch_size": 8, "lr": 0.05, "warmup": 1, "log_every": 1, "eval_every": 2,
                  "progress": False, "threads": 1},
        "policy": {"update_every": 2},
    })
    for key, val in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = copy.deepcopy(val)
    return cfg


@pytest.fixture
def tiny():
    """tiny(out_dir, **{"dotted.key": value}) -> config dict."""
    return tiny_config


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_thread):
    """tests/conftest.py's one_thread for every test here: the CI machine has 2 cores shared with other
    suites, and one intra-op thread keeps runs predictable."""
