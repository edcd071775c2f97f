"""The judge (training/privacy/judge.py): enrollment / identification / TAR@FAR on handmade embeddings with
known answers, the cache (trained once), and on real faces: beats chance widely on clean ORL while never
having seen a victim (its pool is LFW, by construction)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.privacy import judge as J


def _angle_judge() -> J.Judge:
    """Embedding = the unit vector at angle pixel[0, 0, 0] (radians): images are their own embeddings."""
    return J.Judge(lambda x: torch.stack([torch.cos(x[:, 0, 0, 0]), torch.sin(x[:, 0, 0, 0])], 1), "handmade")


def _img(angles) -> torch.Tensor:
    """(N, 1, 4, 4) float images whose embedding is the unit vector at each angle."""
    return torch.tensor(angles, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()


def test_enroll_templates_and_identify_rank_order():
    j = _angle_judge()
    # person 7 at angles 0 and 0.2 (template at 0.1), person 3 at 1.5, person 5 at -1.5
    j.enroll(_img([0.0, 0.2, 1.5, -1.5]), torch.tensor([7, 7, 3, 5]))
    assert j.ids.tolist() == [3, 5, 7]
    assert torch.allclose(j.templates[2], torch.tensor([math.cos(0.1), math.sin(0.1)]), atol=1e-6)
    ranked = j.identify(_img([0.1, 1.0, -1.0]), k=3)
    assert ranked.tolist() == [[7, 3, 5], [3, 7, 5], [5, 7, 3]]
    assert j.hits(_img([0.1, 1.0, -1.0]), torch.tensor([7, 7, 5])).tolist() == [1.0, 0.0, 1.0]
    assert j.hits(_img([0.1, 1.0, -1.0]), torch.tensor([7, 7, 5]), k=2).tolist() == [1.0, 1.0, 1.0]


def test_verify_uses_another_image_and_tar_at_far_by_hand():
    j = _angle_judge()
    # gallery: person 0 at angles 0.0 (g0) and 0.05 (g1); person 1 at 2.0 (g2) and 2.1 (g3)
    gal, gl = _img([0.0, 0.05, 2.0, 2.1]), torch.tensor([0, 0, 1, 1])
    # r0 reconstructs g0 of person 0 perfectly (angle 0); r1 is a bad reconstruction of g2 (angle -1.0)
    rec, rl = _img([0.0, -1.0]), torch.tensor([0, 1])
    out = j.verify(rec, rl, gal, gl, exclude=torch.tensor([0, 2]), far=0.5)
    # genuine pairs exclude the source: r0-g1 cos 0.05, r1-g3 cos(3.1); impostors r0-g2, r0-g3, r1-g0, r1-g1
    assert out["genuine_pairs"] == 2 and out["impostor_pairs"] == 4
    imp = sorted([math.cos(2.0), math.cos(2.1), math.cos(1.0), math.cos(1.05)], reverse=True)
    assert out["threshold"] == pytest.approx(imp[2])  # FAR 0.5 of 4 impostors: 2 may lie above
    assert out["far"] == pytest.approx(0.5) and out["tar"] == pytest.approx(0.5)
    assert out["accepted"].tolist() == [1.0, 0.0]
    # AUC: the genuine cos(0.05) beats all 4 impostors, cos(3.1) beats none -> 4 / 8
    assert out["auc"] == pytest.approx(0.5)
    # without exclusion the perfect self-match r0-g0 would count as genuine: the bias this removes
    assert j.verify(rec, rl, gal, gl, far=0.5)["genuine_pairs"] == 4
    with pytest.raises(ValueError, match="another gallery image"):
        j.verify(rec[:1], rl[:1], gal[:1], gl[:1], exclude=torch.tensor([0]))


def test_threshold_auc_and_per_identity():
    imp = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
    t = J.threshold_at_far(imp, 0.01)
    assert float((imp > t).float().mean()) <= 0.01 and float((imp >= t).float().mean()) > 0.01
    assert J.roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert J.roc_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5  # a tie counts half
    assert J.roc_auc(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.0])) == pytest.approx(0.75)
    v = J.per_identity(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 2, 2]), 3)
    assert v[0] == 0.5 and math.isnan(v[1]) and v[2] == 1.0


def _tiny_pool(tmp_path):
    from training.data import synthetic_faces
    from training.privacy.data import FacePool

    faces = synthetic_faces(6, 4, 1, 56, 0)
    pool = FacePool("tiny", str(tmp_path), [str(tmp_path / f"{i}.png") for i in range(len(faces))],
                    faces.labels.tolist(), [f"p{i}" for i in range(6)], 56, None)
    pool._faces = faces  # already decoded: no files needed
    return pool


EMBED_DIM = {"cnn": J.CNN_HPARAMS["embedding"], "cnn2": J.CNN2_HPARAMS["embedding"], "lda": None}


@pytest.mark.parametrize("kind", J.KINDS)
def test_cache_is_reused(tmp_path, monkeypatch, kind):
    pool = _tiny_pool(tmp_path)
    budget = "smoke" if kind == "cnn2" else {"steps": 3, "batch": 8} if kind == "cnn" else {"pca": 20, "max_images": 100}
    logs = []
    j1 = J.load_judge(pool, kind, budget, work=tmp_path, log=logs.append)
    assert not j1.info["cached"] and any("training" in m for m in logs)
    assert j1.kind == kind and j1.info["kind"] == kind and f"_{kind}_" in j1.info["path"]
    for train in ("train_cnn", "train_cnn2", "train_lda"):
        monkeypatch.setattr(J, train, lambda *a, **k: pytest.fail("trained again"))
    j2 = J.load_judge(pool, kind, budget, work=tmp_path, log=logs.append)
    assert j2.info["cached"] and j2.info["path"] == j1.info["path"]
    x = pool.faces().images[:5]
    assert torch.allclose(j1.embed(x), j2.embed(x), atol=1e-5)
    e = j2.embed(x)
    assert e.shape[0] == 5 and torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    if EMBED_DIM[kind]:
        assert e.shape[1] == EMBED_DIM[kind] == j2.embed_dim()
    # float reconstructions in [-1, 1] are judged as the uint8 faces they come from
    assert torch.allclose(j2.embed(x.float() / 127.5 - 1), e, atol=1e-5)
    # another budget is another judge
    other = {"steps": 4, "batch": 8} if kind in ("cnn", "cnn2") else {"pca": 21, "max_images": 100}
    assert J.cache_path(pool, kind, other, work=tmp_path) != J.cache_path(pool, kind, budget, work=tmp_path)


def test_kinds_are_separate_cache_entries_and_unknown_kind_is_refused(tmp_path):
    pool = _tiny_pool(tmp_path)
    paths = {J.cache_path(pool, k, "smoke", work=tmp_path) for k in J.KINDS}
    assert len(paths) == len(J.KINDS)
    with pytest.raises(ValueError, match="judge kind"):
        J.cache_path(pool, "resnet", "smoke", work=tmp_path)


def test_cnn2_is_built_differently_from_cnn():
    """The second CNN judge must not share the first one's blind spots by construction: another crop, another
    margin loss, no residual shortcut, no PReLU."""
    n1, n2 = J.JudgeNet(), J.JudgeNet2()
    assert J.CNN2_HPARAMS["crop"] != J.CNN_HPARAMS["crop"]
    assert not any(isinstance(m, (J._Res, nn.PReLU)) for m in n2.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in n2.modules()) and not any(isinstance(m, nn.MaxPool2d) for m in n1.modules())
    x = torch.rand(3, 1, 56, 56) * 2 - 1
    assert n2.eval()(x).shape == (3, J.CNN2_HPARAMS["embedding"])
    a = J._augment2(x, J.CNN2_HPARAMS["crop"], torch.Generator().manual_seed(0))
    assert a.shape == (3, 1, 52, 52) and a.min() >= -1 and a.max() <= 1


@pytest.fixture(scope="module")
def orl_split0(orl_root):
    """One ORL split for both judges, so LFW (its judge pool) is decoded once."""
    from training.data import data_root
    from training.privacy.data import get_split

    if not (data_root() / "lfw").is_dir():
        pytest.skip("LFW (the ORL judge's pool) not found (see DATA.md)")
    return get_split("orl", 0)


@pytest.mark.parametrize("kind, budget, floor", [("lda", {"pca": 80, "max_images": 800}, 0.5),
                                                 ("cnn", {"steps": 60, "batch": 64, "max_images": 1500}, 0.3)])
def test_judge_on_clean_orl_beats_chance_and_never_saw_a_victim(orl_split0, tmp_path, kind, budget, floor):
    s = orl_split0
    # by construction: the pool is LFW; no ORL file, no victim identity in it
    assert not set(s.judge.files) & set(s.victim_train.names + s.victim_test.names)
    assert all("orl_faces" not in f for f in s.judge.files) and not set(s.judge.identities) & set(s.info["victims"])
    j = J.load_judge(s, kind, budget, work=tmp_path, log=lambda m: None)
    r = J.clean_rank1(j, s.enrollment)
    chance = 1 / s.num_victims
    print(f"{kind} judge (test budget {budget}): clean ORL rank-1 {r['rank1']:.3f}, rank-5 {r['rank5']:.3f}")
    assert r["hits"].shape == (len(s.victim_test),)
    assert r["rank1"] >= floor, f"{kind} judge rank-1 {r['rank1']:.3f} on clean ORL (chance {chance:.2f})"
