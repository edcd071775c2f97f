"""The mixing defences' stream-attack options (issue 15; training/defences.py): per-frequency weights, noise,
partners never the face itself, a public partner pool, channel / block sign keys. Shapes, what each option
does to the released rows, determinism, the DP bound, and bad config values refused."""
from __future__ import annotations

import math

import pytest
import torch

import fastmix
from training.config import load_config
from training.defences import build_defence, coefficient_range, dp_bound, gdp_eps, no_self

BASE = {"name": "hybrid", "k": 2, "upsample": 1}


def _defence(seed=0, **d):
    cfg = load_config(overrides={"data": {"size": 56}, "defence": {**BASE, **d}})
    return build_defence(cfg, 1, torch.device("cpu"), seed=seed)


def _faces(n=8):
    return torch.rand(n, 1, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_default_options_keep_the_hybridmask_path():
    assert not _defence().custom()
    assert _defence(self_partner=False).custom() and _defence(mix_weights="frequency").custom()


@pytest.mark.parametrize("opts", [
    {"mix_weights": "frequency"}, {"noise": "gaussian", "noise_scale": 0.01}, {"noise": "laplace", "noise_scale": 0.01},
    {"self_partner": False, "k": 3}, {"sign_flip": True, "sign_key": "channel"}, {"sign_flip": True, "sign_key": "block"},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_shapes_weights_and_determinism(opts):
    x, y = _faces(), torch.arange(8) * 10
    m1 = _defence(**opts)(x, y)
    m2 = _defence(**opts)(x, y)
    k = opts.get("k", 2)
    assert m1.x.shape == (8, 63, 7, 7) and m1.labels.shape == (8, k) and m1.weights.shape == (8, k)
    torch.testing.assert_close(m1.weights.sum(1), torch.ones(8))
    assert torch.equal(m1.labels[:, 0], y)
    torch.testing.assert_close(m1.x, m2.x)  # same seed, same stream
    assert _defence(**opts).encode_eval(x, torch.Generator().manual_seed(0)).shape == (8, 63, 7, 7)


def test_frequency_weights_differ_per_frequency_and_match_frontend():
    d = _defence(mix_weights="frequency")
    x, y = _faces(), torch.arange(8)
    g = torch.Generator().manual_seed(5)
    d.generator.manual_seed(5)
    m = d(x, y)
    # redraw the same plan by hand: partners, then (M * 64, k) weight rows
    idx = fastmix.sample_partners(8, 2, generator=g)
    w = fastmix.sample_weights(8 * 64, 2, "instahide", 0.65, 1.0, generator=g).view(8, 64, 2).permute(0, 2, 1)
    assert w[:, 0].std(1).min() > 0.01  # a different mix at each frequency
    ref = fastmix.frontend(x, upsample=1, color="none", keep=d.ids, index=idx, weight=w.contiguous())
    torch.testing.assert_close(m.x, ref)
    torch.testing.assert_close(m.weights, w.mean(2))


def test_no_self_partner():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 40):
        idx = no_self(fastmix.sample_partners(n, 4, generator=g), g)
        for j in range(1, 4):
            assert not (idx[:, j] == torch.arange(n)).any()
            assert torch.equal(idx[:, j].sort().values, torch.arange(n))  # still a permutation


def test_noise_scale_is_the_coefficient_range():
    r = coefficient_range()
    assert r.shape == (64,) and math.isclose(float(r[0]), 8 * 255, rel_tol=1e-9) and (r > 0).all()
    x, y = _faces(64), torch.arange(64)
    d = _defence(noise="gaussian", noise_scale=0.01, k=1)
    plain = fastmix.frontend(x, upsample=1, color="none", keep=d.ids)
    e = d(x, y).x - plain
    std = e.std((0, 2, 3))
    torch.testing.assert_close(std, 0.01 * r[1:].float(), rtol=0.1, atol=0)


@pytest.mark.parametrize("key", ["channel", "block"])
def test_sign_keys_flip_whole_channels_or_blocks(key):
    x, y = _faces(), torch.arange(8)
    plain = _defence(self_partner=False)
    signed = _defence(self_partner=False, sign_flip=True, sign_key=key)
    a, b = plain(x, y).x, signed(x, y).x
    torch.testing.assert_close(a.abs(), b.abs())
    ratio = torch.sign(a * b)
    dims = (2, 3) if key == "channel" else (1,)
    # within a channel (or a block) one sign; across them both signs occur
    assert (ratio.amax(dims) == ratio.amin(dims)).all()
    assert (ratio == 1).any() and (ratio == -1).any()


def test_pool_partners_carry_no_label(monkeypatch):
    import training.defences as D

    pool = (torch.rand(50, 1, 56, 56, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    monkeypatch.setattr(D, "load_pool", lambda *a, **k: pool)
    d = _defence(partners="pool", k=3)
    x, y = _faces(), torch.arange(8) * 7
    m = d(x, y)
    assert m.x.shape == (8, 63, 7, 7)
    assert torch.equal(m.labels, y.view(8, 1).expand(8, 3))
    assert torch.equal(m.weights, torch.tensor([[1.0, 0.0, 0.0]]).expand(8, 3))
    # a row is its own face plus pool faces, never another victim: changing the other rows leaves row 0 as it is
    x2 = x.clone()
    x2[1:] = -x2[1:]
    a = _defence(partners="pool", k=3)(x, y).x
    b = _defence(partners="pool", k=3)(x2, y).x
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_dp_bound():
    lap = dp_bound("laplace", 0.1, 0.65, 100, releases=10)
    assert math.isclose(lap["eps_release"], 100 * 0.65 / 0.1) and math.isclose(lap["eps_run"], 10 * lap["eps_release"])
    gau = dp_bound("gaussian", 0.1, 0.65, 100, releases=4)
    assert math.isclose(gau["mu_release"], 0.65 * 10 / 0.1)
    assert gau["eps_run"] > gau["eps_release"] > 0
    assert dp_bound("none", 0.0, 0.65, 100)["eps_release"] == math.inf
    # 1-GDP at delta 1e-5 is about eps 4.4 (Dong, Roth, Su 2019, Fig. / Table)
    assert 4.0 < gdp_eps(1.0, 1e-5) < 4.8


@pytest.mark.parametrize("key,val", [
    ("mix_weights", "pixel"), ("noise", "uniform"), ("noise_scale", -0.1), ("partners", "server"), ("pool", "imagenet"),
    ("sign_key", "row"), ("pool_size", 0),
])
def test_bad_values_are_refused(key, val):
    with pytest.raises(ValueError, match=f"defence.{key}"):
        _defence(**{key: val})


def test_noise_without_scale_is_refused():
    with pytest.raises(ValueError, match="noise_scale"):
        _defence(noise="gaussian")
