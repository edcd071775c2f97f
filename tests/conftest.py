"""Fixtures of the core-op tests. The helpers they use live in _fastmix_testing.py (see its docstring for
the conventions: backends, seeded inputs, the float64 oracle, the tolerance table)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from _fastmix_testing import BACKEND_PARAMS, absent_reason, generator_for

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the project root on sys.path:
    sys.path.insert(0, str(ROOT))  # tests/training and tests/privacy import the training package from there


@pytest.fixture(params=BACKEND_PARAMS, ids=lambda b: f"be={b}")
def backend(request, monkeypatch) -> str:
    """The backend under test, set through FASTMIX_BACKEND (read by the ops at every call)."""
    reason = absent_reason(request.param)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("FASTMIX_BACKEND", request.param)
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id (reproducible failures); FASTMIX_TEST_SEED draws other inputs."""
    return generator_for(request.node.nodeid)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread. For gradcheck's thousands of tiny calls: the C++ kernels
    parallelise even tiny problems, and on a loaded 2-core machine every parallel region then waits for
    a descheduled thread (measured: 12 ms instead of 0.14 ms per call). Other tests keep the default
    thread count, so the parallel paths stay covered."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
