"""The adaptive policy's S5 proxy (training/exposure.py; issue 15, item 2): the client's running copy of S5's
informed repeat-average attack on its own stream, the reward it gives, its config keys, and its checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import training.defences as D
from training.config import DEFAULTS, load_config
from training.exposure import Exposure
from training.loop import train
from training.policy import EXPOSURE_FEATURES, STATE_DIM, Policy
from training.privacy import stream as S5

DIM = 48


def _planted(n_faces=5, releases=12, seed=0):
    """Faces e (N, D), a pool whose faces share a mean face the victims lack (so that debiasing shows), and a
    stream of rows w e_i + (1 - w) p (the pool-partner mix at k = 2) with each row's slot and own weight."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.linspace(2, 0.5, DIM)
    faces = torch.randn(n_faces, DIM, generator=g)
    pool = torch.randn(200, DIM, generator=g) * 1.5 + mu
    slots, rows, own = [], [], []
    for r in range(releases):
        for i in range(n_faces):
            w = 0.35 + 0.3 * float(torch.rand((), generator=g))
            p = pool[int(torch.randint(200, (1,), generator=g))]
            slots.append(2 * i + (r % 2))  # face i, mirrored on odd releases (its second slot)
            rows.append(w * faces[i] + (1 - w) * p)
            own.append(w)
    return faces, pool.mean(0), torch.tensor(slots), torch.stack(rows), torch.tensor(own)


def test_proxy_is_the_informed_repeat_average_with_debias_on_a_planted_stream():
    faces, mu, slots, rows, own = _planted()
    ex = Exposure(len(faces), DIM, mu, releases_per_step=0.5, steps=10)
    truth = faces[slots // 2]  # the planted "mirror" is the face itself: each slot's truth is its face
    for i in range(0, len(slots), 5):  # batches of 5 rows, each slot at most once
        ex.add(slots[i : i + 5], rows[i : i + 5], own[i : i + 5], truth[i : i + 5])
    # S5's own pieces with the exact grouping: group_average of the slot's rows, pool_debias at the mean own weight
    avg = S5.group_average(rows, slots)
    for s in range(2 * len(faces)):
        wbar = float(own[slots == s].mean())
        deb = S5.pool_debias(avg[s : s + 1], mu, wbar)
        want = max(float(F.cosine_similarity(avg[s : s + 1], faces[s // 2 : s // 2 + 1])),
                   float(F.cosine_similarity(deb, faces[s // 2 : s // 2 + 1])))
        got = float(ex.cosine(torch.tensor([s]), faces[s // 2 : s // 2 + 1]))
        assert got == pytest.approx(want, abs=1e-5), s
        assert float(ex.last_cos[s]) == pytest.approx(want, abs=1e-5)
    assert int(ex.counts.sum()) == len(slots)
    # debiasing is what makes the estimate a face: raw averages keep (1 - w) of the pool's mean face
    raw = F.cosine_similarity(avg, faces.repeat_interleave(2, 0), dim=1)
    assert bool((ex.last_cos > raw + 0.05).all()), (ex.last_cos, raw)
    # per face, the better of its two slots (S5 counts a face recovered when it or its mirror is)
    per_face = ex.last_cos.view(-1, 2).max(1).values
    assert ex.summary()["recovered@0.9"] == pytest.approx(float((per_face >= 0.9).float().mean()))


def test_a_slot_never_released_has_cosine_zero_and_bad_slots_are_refused():
    ex = Exposure(3, DIM, torch.zeros(DIM), 0.5, 4)
    assert torch.equal(ex.cosine(torch.tensor([0, 5]), torch.randn(2, DIM)), torch.zeros(2))
    with pytest.raises(IndexError, match="slots"):
        ex.cosine(torch.tensor([6]), torch.randn(1, DIM))
    with pytest.raises(ValueError, match="mean_face"):
        Exposure(3, DIM, torch.zeros(DIM + 1), 0.5, 4)


def test_projection_grows_with_the_releases_to_come():
    c, n = torch.tensor([0.5, 0.8, 0.95]), torch.tensor([4, 4, 4])
    same = Exposure.projected(c, n, n.double())
    torch.testing.assert_close(same, c, atol=1e-4, rtol=0)
    more = Exposure.projected(c, n, 4 * n.double())
    assert bool((more > c).all()) and float(more.max()) < 1
    # SNR x 4: cos 0.5 (SNR 1/3) -> SNR 4/3 -> cos 0.756
    assert float(more[0]) == pytest.approx((4 / 3 / (1 + 4 / 3)) ** 0.5, abs=1e-4)
    assert float(Exposure.projected(torch.tensor([0.7]), torch.tensor([0]), torch.tensor([5.0]))) == 0.0


def _policy(exposure, mode="sample", **over):
    cfg = {**DEFAULTS["policy"], "mode": mode, "privacy_signal": "s5_proxy", **over}
    return Policy(cfg, [2, 3, 4, 5, 6], num_classes=10, color="none", seed=0, device="cpu", exposure=exposure)


class _Released:  # what the policy reads of defences.Masked
    def __init__(self, x, own):
        self.x, self.own = x, own


def _exposed(face, mu, releases, weight, seed=0):
    """A proxy whose slot 0 already holds ``releases`` rows of ``face`` at own weight ``weight`` (k = 2 mixes),
    with a pool of 200 faces around ``mu`` to simulate releases from."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(200, DIM, generator=g) * 1.5 + mu
    ex = Exposure(1, DIM, pool.mean(0), releases_per_step=0.5, steps=40, pool_codes=pool)
    for _ in range(releases):
        p = pool[int(torch.randint(200, (1,), generator=g))]
        ex.add(torch.tensor([0]), (weight * face + (1 - weight) * p).view(1, -1), torch.tensor([weight]))
    return ex


def _rewards(ex, face, step=5, **over):
    """The privacy rewards of every k (1, 5) for the next release of ``face`` into slot 0 (no utility term)."""
    pol = _policy(ex, penalty=0.0, **over)
    s = pol.state(torch.rand(1, 1, 16, 16) * 2 - 1, 0.5, slots=torch.tensor([0]), truth=face.view(1, -1), step=step)
    assert s.shape == (1, STATE_DIM + EXPOSURE_FEATURES)
    row = (0.5 * face + 0.5 * ex.mean_face).view(1, -1)  # the release actually made (k = 2)
    return pol.reward(torch.ones(1), torch.tensor([0]), _Released(row, torch.tensor([0.5])))


def test_counterfactual_at_k1_is_the_exact_next_average():
    mu = torch.linspace(2, 0.5, DIM)
    face = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    ex = _exposed(face, mu, releases=3, weight=0.5)
    cf = ex.counterfactual(torch.tensor([0]), face.view(1, -1), [1])
    ex.add(torch.tensor([0]), face.view(1, -1), torch.tensor([1.0]))  # k = 1: the face alone, weight 1
    assert float(cf[0, 0]) == pytest.approx(float(ex.cosine(torch.tensor([0]), face.view(1, -1))), abs=1e-6)


def test_reward_prefers_more_partners_for_an_exposed_face():
    mu = torch.linspace(2, 0.5, DIM)
    face = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    ex = _exposed(face, mu, releases=4, weight=0.5)
    before = float(ex.cosine(torch.tensor([0]), face.view(1, -1)))
    projected = float(ex.projected(torch.tensor([before]), ex.counts[:1], ex.expected_final(torch.tensor([0]), 5)))
    assert projected > DEFAULTS["policy"]["proxy_threshold"]  # exposed: projected past the threshold
    r = _rewards(ex, face)[0]
    assert r.shape == (5,)
    # more partners than k = 2 help this face (its best k is not k_min; on this synthetic pool k = 4 beats 6:
    # wide pool faces averaged over more partners add less noise)
    assert int(r.argmax()) > 0 and float(r[1:].mean() - r[0]) > 0.2, r
    # a face that stays far below the threshold (its last release of the run, after one faint row): exposing
    # it costs (almost) nothing at any k, so the utility term decides
    hidden = _exposed(face, mu, releases=1, weight=0.2)
    r_low = _rewards(hidden, face, step=39)[0]
    assert float(hidden.last_cos[0]) < 0.8 and float(r_low.abs().max()) < 1e-3, (float(hidden.last_cos[0]), r_low)


def test_utility_term_still_applies_with_the_proxy():
    mu = torch.zeros(DIM)
    face = torch.randn(DIM, generator=torch.Generator().manual_seed(2))
    pool = torch.randn(20, DIM, generator=torch.Generator().manual_seed(3))
    pol = _policy(Exposure(4, DIM, mu, 0.5, 40, pool_codes=pool), penalty=4.0, penalty_lr=0.0, target_acc=0.8,
                  privacy_weight=0.0)
    pol.observe_validation(0.6)  # 0.2 below the target: each extra partner costs 4 * 0.2 / 4
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    pol.state(x, 0.1, slots=torch.tensor([0, 2, 4, 6, 1]), truth=face.expand(5, DIM), step=0)
    r = pol.reward(torch.ones(5), torch.arange(5), _Released(face.expand(5, DIM), torch.full((5,), 0.5)))
    torch.testing.assert_close(r, (-0.2 * torch.arange(5.0)).expand(5, 5))  # every k's reward, per face


def test_update_learns_a_k_per_exposure():
    # two kinds of faces with different best k (as the proxy's rewards make them): the fitted policy gives each
    # its own k, which one-sample REINFORCE on one reward did not (DEFENCES.md)
    pol = _policy(Exposure(2, DIM, torch.zeros(DIM), 0.5, 4, pool_codes=torch.randn(4, DIM)))
    opt = torch.optim.Adam(pol.net.parameters(), lr=0.01)
    s = torch.zeros(40, STATE_DIM + EXPOSURE_FEATURES)
    s[:20, STATE_DIM] = -1.0  # margin far below the threshold
    s[20:, STATE_DIM] = 1.0  # far above
    r = torch.zeros(40, 5)
    r[:20] = -0.1 * torch.arange(5.0)  # utility: k = 2 best
    r[20:] = 0.2 * torch.arange(5.0)  # privacy: k = 6 best
    for _ in range(60):
        pol.record(s, torch.zeros(40, dtype=torch.int64), r)
        pol.update(opt)
    p = pol.probs(s).detach()
    assert float(p[:20, 0].mean()) > 0.8 and float(p[20:, 4].mean()) > 0.8, p[[0, -1]]


def test_policy_without_the_proxy_is_refused_and_state_needs_the_slots():
    with pytest.raises(ValueError, match="privacy_signal"):
        _policy(None)
    pol = _policy(Exposure(2, DIM, torch.zeros(DIM), 0.5, 4))
    with pytest.raises(ValueError, match="slots"):
        pol.state(torch.rand(2, 1, 16, 16), 0.0)
    with pytest.raises(RuntimeError, match="state"):
        pol.reward(torch.ones(2), torch.zeros(2, dtype=torch.int64), _Released(torch.zeros(2, DIM), torch.ones(2)))
    with pytest.raises(ValueError, match="pool_codes"):
        Exposure(2, DIM, torch.zeros(DIM), 0.5, 4, pool_codes=torch.zeros(3, DIM + 1))


@pytest.mark.parametrize("sets,match", [
    (["policy.privacy_signal=attack"], "policy.privacy_signal"),
    (["policy.privacy_signal=s5_proxy", "defence.partners=pool", "policy.proxy_threshold=1.0"], "policy.proxy_threshold"),
    (["policy.privacy_signal=s5_proxy", "defence.partners=pool", "policy.proxy_temperature=0"], "policy.proxy_temperature"),
    (["policy.privacy_signal=s5_proxy", "defence.partners=pool", "policy.privacy_weight=-1"], "policy.privacy_weight"),
    (["policy.privacy_signal=s5_proxy"], "defence.partners=pool"),
    (["policy.privacy_signal=s5_proxy", "defence.partners=pool", "defence.sign_flip=true"], "defence.sign_flip=false"),
])
def test_bad_privacy_signal_config_is_an_error_naming_the_key(sets, match):
    with pytest.raises(ValueError, match=match):
        load_config(sets=sets)


def test_the_default_is_the_loss_signal():
    cfg = load_config()
    assert cfg["policy"]["privacy_signal"] == "loss"
    pol = Policy(cfg["policy"], [2, 3], num_classes=4, color="none", seed=0, device="cpu")
    assert pol.exposure is None and pol.state_dim == STATE_DIM


@pytest.fixture
def pool(monkeypatch):
    faces = (torch.rand(30, 1, 112, 112, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    monkeypatch.setattr(D, "load_pool", lambda *a, **k: faces)
    return faces


PROXY = {"defence.partners": "pool", "policy.privacy_signal": "s5_proxy", "policy.mode": "sample"}


def test_run_with_the_proxy_counts_pool_partners_and_reports_its_estimate(tmp_path, tiny, pool):
    res = train(tiny(tmp_path, **PROXY, **{"train.steps": 6}), resume=False)
    # k counts the faces mixed (pool partners carry loss weight 0): the policy's k, not 1
    assert set(res["k_hist"]) <= {"2", "3", "4", "5", "6"} and sum(res["k_hist"].values()) == 6 * 8
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    counts = ck["policy"]["exposure.counts"]  # (2 x training faces,): one slot per face and mirror
    assert int(counts.sum()) == 6 * 8
    ex = res["exposure"]
    assert 0 <= ex["recovered@0.9"] <= 1 and ex["releases_mean"] == pytest.approx(6 * 8 / (counts.numel() / 2))


def test_resume_restores_the_proxy_exactly(tmp_path, tiny, pool):
    over = {**PROXY, "train.steps": 6, "train.eval_every": 2, "policy.update_every": 2, "data.synthetic_per_id": 5}
    full = tiny(tmp_path / "full", **over)
    train(full, resume=False)
    part = tiny(tmp_path / "part", **over)
    part["train"]["max_steps_this_run"] = 3
    train(part, resume=False)
    mid = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)["policy"]
    assert int(mid["exposure.counts"].sum()) == 3 * 8  # the proxy's state is in the checkpoint
    part["train"]["max_steps_this_run"] = None
    train(part, resume=True)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["policy"] for d in ("full", "part"))
    for key in ("exposure.sums", "exposure.counts", "exposure.own", "exposure.last_cos", "lam", "baseline"):
        assert torch.equal(a[key], b[key]), key
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_checkpoint_from_before_the_new_keys_resumes(tmp_path, tiny):
    # a config saved before the privacy-signal keys existed: the same run, the keys at their defaults
    from training.loop import config_changes

    cfg = tiny(tmp_path)
    old = {**cfg, "policy": {k: v for k, v in cfg["policy"].items()
                             if k not in ("privacy_signal", "proxy_threshold", "proxy_temperature", "privacy_weight")}}
    assert config_changes(old, cfg) == []
    changed = tiny(tmp_path, **{"policy.proxy_threshold": 0.9})
    assert config_changes(old, changed) == ["policy.proxy_threshold: None -> 0.9"]
