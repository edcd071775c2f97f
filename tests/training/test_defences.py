"""A short training run of every defence (CPU, tiny backbone, synthetic faces), and what each defence
feeds the network, checked against fastmix directly."""
from __future__ import annotations

import json
import math

import pytest
import torch

import fastmix
from fastmix.nn import keep_ids
from training.defences import NAMES, build_defence
from training.loop import train

CASES = [(n, {}) for n in NAMES] + [
    ("adaptive", {"policy.mode": "sample"}),
    ("hybrid", {"defence.k": 6, "defence.sign_flip": True, "defence.keep": "partialface"}),
    ("freq", {"data.color": "rgb", "defence.upsample": 8}),
]


@pytest.mark.parametrize("name,over", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES])
def test_short_run(tmp_path, tiny, name, over):
    cfg = tiny(tmp_path, **{"defence.name": name, **over})
    if cfg["defence"]["upsample"] == 8:
        # 192 channels at 112x112 (the published geometry): keep it short
        cfg["train"].update(steps=1, batch_size=4)
        cfg["data"].update(synthetic_ids=4, synthetic_per_id=3)
    res = train(cfg, resume=False)
    assert res["steps"] == cfg["train"]["steps"]
    assert res["defence"] == name
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "results.json").exists()
    ks = {int(k) for k in res["k_hist"]}
    if name in ("hybrid", "instahide"):
        assert ks == {cfg["defence"]["k"]}
    elif name == "adaptive":
        assert ks <= set(cfg["defence"]["k_choices"])
    else:
        assert ks == {1}
    t = res["tests"][0]
    assert t["task"] == "identification" and 0 <= t["accuracy"] <= 1


def test_plot_off_writes_the_metrics_but_no_png(tmp_path, tiny):
    """train.plot false (the privacy evaluation's many small targets): metrics.jsonl as always, no metrics.png."""
    cfg = tiny(tmp_path, **{"defence.name": "none", "train.plot": False})
    cfg["train"]["steps"] = 2
    train(cfg, resume=False)
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0 and (tmp_path / "results.json").exists()
    assert not (tmp_path / "metrics.png").exists()


def _defence(name, c=1, **d):
    from training.config import load_config

    cfg = load_config(overrides={"defence": {"upsample": 1}})
    cfg["defence"].update({"name": name, **d})
    return build_defence(cfg, c, torch.device("cpu"), seed=0)


def _faces(n=6, c=1):
    return torch.rand(n, c, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_freq_and_ppfr_are_frontend_with_a_keep_set():
    x, y = _faces(), torch.arange(6)
    z = _defence("freq")(x, y).x
    torch.testing.assert_close(z, fastmix.frontend(x, upsample=1, color="none"))
    d = _defence("ppfr", drop_lowest=2)
    ids = d.ids
    assert 0 not in ids and 1 not in ids and 8 not in ids and 2 in ids and 9 in ids and len(ids) == 61
    torch.testing.assert_close(d(x, y).x, fastmix.frontend(x, upsample=1, color="none", keep=ids))


def test_partialface_uses_one_subset_per_face():
    d = _defence("partialface", partialface_subsets=3)
    x = _faces()
    z = d(x, torch.arange(6)).x
    full = fastmix.frontend(x, upsample=1, color="none", keep=keep_ids("partialface", 1))
    assert z.shape == full.shape == (6, 54, 14, 14)
    for m in range(6):
        nz = z[m].abs().sum((1, 2)) != 0
        subset = [j for j, s in enumerate(d.subsets) if nz[s].all()]
        assert len(subset) == 1, "each face sees exactly one channel subset"
        torch.testing.assert_close(z[m, nz], full[m, nz])
        assert nz.sum() == len(d.subsets[subset[0]])


def test_dctdp_noise_budget_is_learnable_and_fixed_in_sum():
    d = _defence("dctdp", dctdp_epsilon=2.0)
    eps = d.epsilons()
    assert math.isclose(float(eps.detach().sum()), 2.0 * 63, rel_tol=1e-5)
    z = d(_faces(), torch.arange(6)).x
    z.pow(2).mean().backward()
    assert d.theta.grad is not None and d.theta.grad.abs().sum() > 0


def test_mixing_defences_match_hybridmask_contract():
    x, y = _faces(), torch.arange(6) * 10
    d = _defence("hybrid", k=4)
    m = d(x, y)
    assert m.x.shape == (6, 63, 14, 14) and m.labels.shape == (6, 4) and m.weights.shape == (6, 4)
    assert torch.equal(m.labels[:, 0], y)
    torch.testing.assert_close(m.weights.sum(1), torch.ones(6))
    a = _defence("adaptive")
    k = torch.tensor([2, 3, 4, 5, 6, 2])
    m = a(x, y, k)
    assert torch.equal((m.weights != 0).sum(1), k)
    # test-time encoding: masked, not mixed
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(a.encode_eval(x, g), fastmix.frontend(x, upsample=1, color="none", keep=a.ids))


def test_instahide_flips_signs_with_fresh_keys():
    d = _defence("instahide", k=2)
    x = _faces()
    assert d.mask.sign_flip and d.ids is None
    z1 = d.encode_eval(x, torch.Generator().manual_seed(0))
    z2 = d.encode_eval(x, torch.Generator().manual_seed(1))
    plain = fastmix.frontend(x, upsample=1, color="none")
    torch.testing.assert_close(z1.abs(), plain.abs())
    assert not torch.equal(z1, z2)


def test_unknown_defence_is_rejected():
    with pytest.raises(ValueError, match="defence.name"):
        _defence("nope")
