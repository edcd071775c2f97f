"""The report's statistics: chance-normalised leaks and bootstrap intervals over seeds x victims."""
from __future__ import annotations

import numpy as np

from training.privacy import stats as ST


def test_leak_of_is_chance_normalised():
    assert ST.leak_of(0.05, 20) == 0.0 and ST.leak_of(1.0, 20) == 1.0 and ST.leak_of(0.0, 20) == 0.0
    assert abs(ST.leak_of(0.525, 20) - 0.5) < 1e-12
    assert np.isnan(ST.leak_of(float("nan"), 20))


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small = [rng.binomial(1, 0.6, 20).astype(float) for _ in range(3)]
    big = [rng.binomial(1, 0.6, 80).astype(float) for _ in range(12)]
    a, b = ST.bootstrap(small), ST.bootstrap(big)
    assert a["lo"] <= 0.6 <= a["hi"] and b["lo"] <= 0.6 <= b["hi"]
    assert b["half_width"] < a["half_width"] / 2
    # a binomial's standard error on 960 trials is 0.0158: the 95% half-width is about 1.96 of it
    assert 0.02 < b["half_width"] < 0.045


def test_constant_data_has_a_zero_width_interval():
    r = ST.bootstrap([np.ones(10), np.ones(10)], victims=20)
    assert r["mean"] == r["lo"] == r["hi"] == 1.0


def test_paired_bootstrap_cancels_shared_victim_difficulty():
    """Two defences whose per-victim successes differ by a constant 0.1 on very different victims: the
    paired interval of the difference is tight, an unpaired one would not be."""
    rng = np.random.default_rng(1)
    base = [rng.uniform(0, 0.8, 20) for _ in range(4)]
    per = {"a": [b + 0.1 for b in base], "b": base}
    r = ST.paired_bootstrap(per, lambda m: m["a"] - m["b"])
    assert abs(r["mean"] - 0.1) < 1e-9 and r["half_width"] < 1e-9 and r["share_positive"] == 1.0
    unpaired = ST.bootstrap([b + 0.1 for b in base])["half_width"]
    assert unpaired > 0.03


def test_undefined_statistics_are_reported_not_crashing():
    per = {"a": [np.zeros(5)], "b": [np.ones(5)]}
    r = ST.paired_bootstrap(per, lambda m: None)
    assert np.isnan(r["lo"])


def test_seeds_needed():
    assert ST.seeds_needed(0.01, 5) == 5
    assert ST.seeds_needed(0.04, 5, 0.02) == 20
