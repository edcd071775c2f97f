"""Smoke runs of each attack (tiny, CPU, synthetic faces) and the exactness of the attacker's tools."""
from __future__ import annotations

import pytest
import torch

import fastmix
from training.data import to_float
from training.privacy import attacks as A

from conftest import defence_for, synthetic

DEFENCES = [("none", {}), ("ppfr", {}), ("partialface", {}), ("dctdp", {}), ("instahide", {"k": 3}),
            ("hybrid", {"k": 6, "sign_flip": True}), ("adaptive", {})]


@pytest.mark.parametrize("name,over", DEFENCES, ids=[d[0] for d in DEFENCES])
def test_protect_shapes_and_targets(name, over):
    d = defence_for(name, **over)
    x = to_float(synthetic().images[:8])
    p = A.protect(d, x, torch.Generator().manual_seed(0), k_dist={2: 1.0, 5: 1.0} if name == "adaptive" else None)
    assert p.z.shape[0] == 8 and p.target.shape == (8,)
    assert (p.seed is not None) == (name == "instahide" or over.get("sign_flip", False))
    img = A.pseudo_inverse(d, p.z)
    assert img.shape == x.shape and torch.isfinite(img).all()
    if name not in ("instahide", "hybrid", "adaptive"):
        assert torch.equal(p.target, torch.arange(8))


def test_pseudo_inverse_is_exact_on_kept_channels_and_removes_known_signs():
    """S2's tool: with the key, the signed mix decodes to the unsigned mix (the key is an involution)."""
    d = defence_for("hybrid", k=4, sign_flip=True)
    x = to_float(synthetic().images[:8])
    g = torch.Generator().manual_seed(3)
    index = fastmix.sample_partners(8, 4, generator=g)
    w = fastmix.sample_weights(8, 4, generator=g)
    signed = d.frontend(x, keep=d.ids, index=index, weight=w, seed=1234)
    plain = d.frontend(x, keep=d.ids, index=index, weight=w)
    assert not torch.allclose(signed, plain)
    torch.testing.assert_close(A.pseudo_inverse(d, signed, seed=1234), A.pseudo_inverse(d, plain), atol=1e-4, rtol=1e-4)
    # no mixing, no DC drop: the pseudo-inverse gives the face back
    f = defence_for("freq")
    torch.testing.assert_close(A.pseudo_inverse(f, f.frontend(x, keep=f.ids)), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,over,known", [("none", {}, False), ("hybrid", {"k": 3, "sign_flip": True}, True),
                                             ("adaptive", {}, False)], ids=["none-S1", "hybrid-S2", "adaptive-S1"])
def test_decoder_smoke(name, over, known):
    d = defence_for(name, **over)
    faces = synthetic(4, 4)
    dec = A.train_decoder(d, faces.images, sign_known=known, steps=2, batch=4, width=4, k_dist={3: 1.0} if name == "adaptive" else None)
    shown, rec, tg = A.reconstruct(dec, faces.images[:6], batch=3, k_dist={3: 1.0} if name == "adaptive" else None)
    assert rec.shape == (6, 1, 56, 56) and shown.shape == (6, 1, 56, 56) and tg.shape == (6,)
    assert rec.abs().max() <= 1 and int(tg.max()) < 6


def test_reconstruct_mixes_victims_in_shuffled_batches():
    """Victim sets come ordered by identity; training mixes shuffled batches, so the attack must too (batches
    of consecutive victims held a few people each, and partners shared the target's identity far more often).
    Row j stays victim j's own mix."""
    faces = synthetic(4, 10)  # 4 identities x 10 faces, in identity order
    plain = A.train_decoder(defence_for("none"), faces.images, steps=1, batch=4, width=4)
    _, _, tg = A.reconstruct(plain, faces.images, batch=10)
    assert tg.tolist() == list(range(40))  # no mixing: every row decodes to its own face
    mix = A.train_decoder(defence_for("hybrid", k=3), faces.images, steps=1, batch=4, width=4)
    _, _, tg = A.reconstruct(mix, faces.images, batch=10)
    # dominant partners from outside the row's block of 10 consecutive victims: only with shuffled batches
    assert (tg // 10 != torch.arange(40) // 10).sum() >= 10


def _model(name, **over):
    from training.loss import MarginHead
    from training.model import build_model

    d = defence_for(name, **over)
    c, s = d.out_shape()
    torch.manual_seed(0)
    return A.DefendedModel(d, build_model("tiny", c, s, 16), MarginHead(16, 4, "cosface", 30.0, 0.2))


@pytest.mark.parametrize("name,over", [("none", {}), ("hybrid", {"k": 4, "sign_flip": True}), ("dctdp", {})], ids=["none", "hybrid-signs", "dctdp"])
def test_deployed_model_is_differentiable_through_fastmix_and_counts_queries(name, over):
    """S3 needs gradients through the defence's front-end; S4 reads only scores (inversion.py attacks it)."""
    m = _model(name, **over)
    x = torch.zeros(2, 1, 56, 56, requires_grad=True)
    m(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    s = m.scores(torch.zeros(3, 1, 56, 56))
    assert torch.allclose(s.sum(1), torch.ones(3)) and not s.requires_grad and m.queries == 5
