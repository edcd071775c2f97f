"""fastmix.nn.HybridMask: shapes, returned partners and weights, per-sample k, keep presets,
reproducibility, the fresh key per call, extra_repr and bad arguments.

Labels are chosen as 10 * i + 3, so the returned partner labels reveal the partner index the module
drew, and every output can be recomputed with the public ops."""
from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fastmix
from fastmix.nn import HybridMask, keep_ids
from _fastmix_testing import rand_faces, randn

PARTIALFACE = [0, 1, 2, 3, 8, 9, 10, 16, 17, 24]


def labels_for(n):
    return torch.arange(n) * 10 + 3


def partners_from(plabels):
    return (plabels - 3) // 10


_CONFIGS = {
    # name: (module kwargs, x shape, expected masked shape)
    "frontend_default": (dict(k=2), (4, 3, 4, 6), (4, 189, 4, 6)),
    "frontend_grey_up2": (dict(k=3, upsample=2, color="none", keep="all"), (5, 1, 4, 8), (5, 64, 1, 2)),
    "freq_mix_channels": (dict(k=4, upsample=None, keep="partialface"), (6, 3, 16, 8), (6, 162, 2, 1)),
    "freq_mix_pixels": (dict(k=2, upsample=None, keep="no_dc", out="pixels"), (3, 4, 8, 16), (3, 4, 8, 16)),
}


@pytest.mark.parametrize("sign_flip", [False, True], ids=["nosign", "sign"])
@pytest.mark.parametrize("name", list(_CONFIGS))
def test_outputs_are_the_fused_op_on_the_drawn_partners(backend, gen, name, sign_flip):
    kwargs, shape, out_shape = _CONFIGS[name]
    n, c = shape[0], shape[1]
    x = rand_faces(gen, *shape) if kwargs.get("upsample", 8) else randn(gen, *shape)
    mask = HybridMask(**kwargs, sign_flip=sign_flip, generator=torch.Generator().manual_seed(1))
    masked, plabels, weights = mask(x, labels_for(n))
    k = kwargs["k"]
    assert masked.shape == out_shape and plabels.shape == (n, k) and weights.shape == (n, k)
    index = partners_from(plabels)
    assert torch.equal(index[:, 0], torch.arange(n))
    assert torch.equal(plabels, labels_for(n)[index])
    torch.testing.assert_close(weights.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    ids = keep_ids(mask.keep, c)
    if mask.upsample is None:
        plain = fastmix.freq_mix(x, index, weights.to(x.dtype), keep=ids, out=mask.out)
    else:
        plain = fastmix.frontend(x, upsample=mask.upsample, color=mask.color, keep=ids, index=index, weight=weights)
    if not sign_flip:
        assert torch.equal(masked, plain)
    elif mask.out == "channels":
        # the same coefficients up to a +-1 key, about half of them flipped
        assert torch.equal(masked.abs(), plain.abs())
        flipped = (masked != plain).float().mean().item()
        assert 0.35 < flipped < 0.65, flipped
    else:
        assert not torch.allclose(masked, plain)


def test_per_sample_k(backend, gen):
    n = 6
    x = randn(gen, n, 3, 8, 16)
    k = torch.tensor([1, 3, 2, 1, 3, 2])
    mask = HybridMask(k=3, upsample=None, keep="all", sign_flip=False, generator=torch.Generator().manual_seed(2))
    masked, plabels, weights = mask(x, labels_for(n), k=k)
    assert weights.shape == plabels.shape and weights.shape[0] == n and weights.shape[1] >= int(k.max())
    pad = torch.arange(weights.shape[1]).view(1, -1) >= k.view(n, 1)
    assert (weights[pad] == 0).all() and (weights[~pad] > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    index = partners_from(plabels)
    assert torch.equal(masked, fastmix.freq_mix(x, index, weights, keep=None))
    # k = 1 rows are the image's own coefficients, whatever partners were padded in
    own = fastmix.to_channels(fastmix.block_dct(x))
    torch.testing.assert_close(masked[k == 1], own[k == 1], rtol=1e-6, atol=1e-5)


def test_padded_partners_are_skipped(backend, gen):
    """A NaN image drawn as a padded partner (weight 0) does not reach that output."""
    n = 5
    x = randn(gen, n, 3, 8, 8)
    x[4] = float("nan")
    k = torch.tensor([1, 1, 1, 1, 2])  # rows 0-3 pad their second partner
    mask = HybridMask(k=2, upsample=None, keep="all", generator=torch.Generator().manual_seed(3))
    padded_nan_seen = 0
    for _ in range(6):
        masked, plabels, weights = mask(x, labels_for(n), k=k)
        index = partners_from(plabels)
        padded_nan_seen += int((index[:4, 1] == 4).sum())
        assert (weights[:4, 1] == 0).all()
        assert torch.isfinite(masked[:4]).all()
        assert torch.isnan(masked[4]).all()
    assert padded_nan_seen > 0  # the draws did put the NaN image into padded slots


@pytest.mark.parametrize(
    "keep,n_kept,dropped",
    [
        ("all", 192, []),
        ("no_dc", 189, [0, 64, 128]),
        ("partialface", 162, [f + 64 * c for c in range(3) for f in PARTIALFACE]),
        ([5, 1, 70], 3, None),
    ],
    ids=["all", "no_dc", "partialface", "explicit"],
)
def test_keep_presets(gen, keep, n_kept, dropped):
    ids = keep_ids(keep, 3)
    if keep == "all":
        assert ids is None
    elif dropped is not None:
        assert ids == [ch for ch in range(192) if ch not in dropped]
    else:
        assert sorted(ids) == [1, 5, 70]
    x = randn(gen, 3, 3, 8, 8)
    mask = HybridMask(k=1, upsample=None, keep=keep, sign_flip=False)
    masked, _, _ = mask(x, labels_for(3))
    assert masked.shape == (3, n_kept, 1, 1)
    full = fastmix.to_channels(fastmix.block_dct(x))
    want = full if ids is None else full[:, sorted(ids)]
    torch.testing.assert_close(masked, want, rtol=1e-6, atol=1e-5)


def test_keep_in_the_forms_the_ops_take(gen):
    """None, a bool mask, an id tensor and a one-shot iterable: as freq_mix takes them (None failed at
    forward with "'NoneType' object is not iterable", a mask with "duplicate channel ids", a generator
    worked once)."""
    x = randn(gen, 3, 3, 8, 8)
    full = fastmix.to_channels(fastmix.block_dct(x))
    mask64 = torch.zeros(64, dtype=torch.bool)
    mask64[[1, 9]] = True
    for keep, ids in [(None, list(range(192))), (mask64, [1, 9, 65, 73, 129, 137]),
                      (torch.tensor([70, 5]), [5, 70]), ((i for i in [3, 4]), [3, 4])]:
        m = HybridMask(k=1, upsample=None, keep=keep, sign_flip=False)
        for _ in range(2):
            torch.testing.assert_close(m(x, labels_for(3))[0], full[:, ids], rtol=1e-6, atol=1e-5)
        assert "keep=" in repr(m)
    with pytest.raises(TypeError, match="keep must be a preset"):
        HybridMask(k=2, keep=3)
    with pytest.raises(TypeError, match="got bools"):
        HybridMask(k=1, upsample=None, keep=[True, False])(x, labels_for(3))


def test_weights_mixed_are_the_weights_returned(gen):
    """freq_mix gets the float32 weights the loss gets, also for 16-bit images (they were rounded to the
    image dtype for the mix only)."""
    x = randn(gen, 4, 3, 8, 8)
    m = HybridMask(k=3, upsample=None, keep="all", sign_flip=False, generator=torch.Generator().manual_seed(1))
    plan = m.plan(4)
    got = m.apply(x.to(torch.bfloat16), plan).float()
    want = fastmix.freq_mix(x.to(torch.bfloat16).float(), plan.index, plan.weight)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (fastmix.freq_mix(x.to(torch.bfloat16), plan.index, plan.weight).float() == got).all()


def test_partialface_per_colour():
    assert keep_ids("partialface", 1) == [f for f in range(64) if f not in PARTIALFACE]
    ids4 = keep_ids("partialface", 4)
    assert len(ids4) == 4 * 54 and all(ch % 64 not in PARTIALFACE for ch in ids4)
    assert fastmix.nn.PARTIALFACE_DROP == tuple(PARTIALFACE)


def test_reproducible_with_a_generator(gen):
    x = rand_faces(gen, 6, 3, 4, 4)
    y = labels_for(6)

    def run(seed):
        return HybridMask(k=3, generator=torch.Generator().manual_seed(seed))(x, y)

    a, b, c = run(11), run(11), run(12)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_fresh_key_per_call(gen):
    """k = 1 fixes the partners and weights, so two calls differ only through the key."""
    x = rand_faces(gen, 3, 3, 4, 4)
    mask = HybridMask(k=1, generator=torch.Generator().manual_seed(4))
    z1, l1, w1 = mask(x, labels_for(3))
    z2, l2, w2 = mask(x, labels_for(3))
    assert torch.equal(l1, l2) and torch.equal(w1, w2)
    assert torch.equal(z1.abs(), z2.abs()) and not torch.equal(z1, z2)
    unsigned = HybridMask(k=1, sign_flip=False)(x, labels_for(3))[0]
    assert torch.equal(z1.abs(), unsigned.abs())


def test_gradient_reaches_the_input(backend, gen):
    x = rand_faces(gen, 4, 3, 4, 4).requires_grad_()
    masked, _, weights = HybridMask(k=2, generator=torch.Generator().manual_seed(5))(x, labels_for(4))
    (masked**2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_extra_repr():
    m = HybridMask(k=3, law="dirichlet", keep="partialface", sign_flip=False, upsample=8, color="ycbcr")
    assert m.extra_repr() == (
        "k=3, law=dirichlet, upper=0.65, keep=partialface, sign_flip=False, "
        "op=frontend(upsample=8, color=ycbcr), out=channels"
    )
    assert repr(m) == f"HybridMask({m.extra_repr()})"
    r = HybridMask(k=2, upsample=None, keep=[1, 2, 3], out="pixels").extra_repr()
    assert "keep=3 ids" in r and "op=freq_mix" in r and "out=pixels" in r


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be an int >= 1"),
        (dict(k=2.0), "k must be an int >= 1"),
        (dict(k=True), "k must be an int >= 1"),
        (dict(law="uniform"), "law must be one of"),
        (dict(out="image"), "out must be"),
        (dict(out="pixels", upsample=8), "out='pixels' needs upsample=None"),
        (dict(keep="most"), "keep must be one of"),
        (dict(noise="uniform", noise_scale=1.0), "noise must be None or one of"),
        (dict(noise="gaussian"), "needs noise_scale"),
        (dict(noise_scale=0.5), "noise_scale is given but noise is None"),
        (dict(noise="laplace", noise_scale=-1.0), "noise_scale must be a finite number >= 0"),
        (dict(noise="laplace", noise_scale=float("nan")), "noise_scale must be a finite number >= 0"),
        (dict(noise="laplace", noise_scale="0.1"), "noise_scale must be a finite number >= 0"),
        (dict(noise="gaussian", noise_scale=torch.tensor([0.1, -0.1])), "finite and >= 0 everywhere"),
        (dict(noise="gaussian", noise_scale=torch.ones(2, 64)), "1-D float tensor"),
    ],
    ids=["k0", "k_float", "k_bool", "law", "out", "pixels_with_frontend", "keep_preset", "noise_kind",
         "noise_no_scale", "scale_no_noise", "scale_negative", "scale_nan", "scale_str", "scale_tensor_negative",
         "scale_tensor_2d"],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridMask(**kwargs)


def test_bad_forward_arguments(gen):
    x = rand_faces(gen, 4, 3, 4, 4)
    m = HybridMask(k=2)
    with pytest.raises(ValueError, match="labels must have shape"):
        m(x, torch.arange(3))
    with pytest.raises(ValueError, match="k must be an integer tensor"):
        m(x, labels_for(4), k=torch.tensor([1.0, 2.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="k must be an integer tensor"):
        m(x, labels_for(4), k=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"k values must be in \[1, 2\]"):
        m(x, labels_for(4), k=torch.tensor([1, 0, 2, 2]))
    with pytest.raises(ValueError, match=r"k values must be in \[1, 2\]"):  # above the module's k
        m(x, labels_for(4), k=torch.tensor([1, 3, 2, 2]))


def test_plan_then_apply_is_forward(gen):
    # the same draws from the same stream: forward == apply(plan), and the plan exposes the partner index
    x = rand_faces(gen, 6, 3, 4, 4)
    y = labels_for(6)
    a = HybridMask(3, generator=torch.Generator().manual_seed(5))
    b = HybridMask(3, generator=torch.Generator().manual_seed(5))
    masked, plabels, w = a(x, y)
    p = b.plan(6)
    assert p.index.shape == (6, 3) and p.weight.shape == (6, 3) and isinstance(p.seed, int)
    torch.testing.assert_close(b.apply(x, p), masked, rtol=0, atol=0)
    assert torch.equal(y[p.index], plabels) and torch.equal(p.weight, w)


def test_plan_with_an_external_index_computes_only_those_rows(gen):
    # partners chosen by the caller (e.g. one global-batch permutation, this rank's slice): M != N outputs
    x = rand_faces(gen, 8, 3, 4, 4)
    mask = HybridMask(4, generator=torch.Generator().manual_seed(1))
    index = fastmix.sample_partners(8, 4, generator=torch.Generator().manual_seed(2))[2:5]
    k = torch.tensor([2, 4, 3])
    p = mask.plan(index=index, k=k)
    assert torch.equal(p.index, index) and p.weight.shape == (3, 4)
    assert torch.equal((p.weight != 0).sum(1), k)
    out = mask.apply(x, p)
    ref = fastmix.frontend(x, upsample=8, keep=keep_ids("no_dc", 3), index=index, weight=p.weight, seed=p.seed)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    masked, plabels, w = mask(x, labels_for(8), plan=p)
    assert masked.shape[0] == 3 and torch.equal(partners_from(plabels), index)


def test_bad_plan_arguments(gen):
    mask = HybridMask(3)
    with pytest.raises(ValueError, match="index must be an int64"):
        mask.plan(index=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at most k=3"):
        mask.plan(index=torch.zeros(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="n must be an int"):
        mask.plan()
    with pytest.raises(ValueError, match=r"k values must be in \[1, 2\]"):
        mask.plan(index=torch.zeros(2, 2, dtype=torch.int64), k=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="pass k to plan"):
        mask(rand_faces(gen, 2, 3, 4, 4), labels_for(2), k=torch.tensor([1, 2]), plan=mask.plan(2))


def test_generator_state_travels_in_state_dict(gen):
    x = rand_faces(gen, 4, 3, 4, 4)
    a = HybridMask(2, generator=torch.Generator().manual_seed(3))
    a(x, labels_for(4))  # move the stream
    sd = a.state_dict()
    want = a(x, labels_for(4))
    b = HybridMask(2, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(sd)
    got = b(x, labels_for(4))
    for u, v in zip(want, got):
        assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------------
# One-time keys across DataLoader workers
# ----------------------------------------------------------------------------------------------------


class _PlansPerItem(Dataset):
    """Each item is a plan drawn by the dataset's own seeded HybridMask (as a masking dataset would)."""

    def __init__(self, items=8):
        self.mask = HybridMask(3, generator=torch.Generator().manual_seed(7))
        self.items = items

    def __len__(self):
        return self.items

    def __getitem__(self, i):
        p = self.mask.plan(6)
        info = torch.utils.data.get_worker_info()
        return info.id if info else -1, p.seed, p.index, p.weight


def _draw_in_workers(ds, workers=2):
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context="fork")
    return list(loader)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_seeded_mask_in_dataloader_workers_never_repeats_keys():
    """Forked workers copy the generator's state: every worker drew the same seeds and partners (4 of 8 seeds
    duplicated with 2 workers). Each worker's copy is re-keyed now; the main process's stream is untouched,
    and a run seeded with torch.manual_seed draws the same keys again."""
    ds = _PlansPerItem()
    before = ds.mask.generator.get_state()
    torch.manual_seed(123)
    items = _draw_in_workers(ds)
    assert {w for w, *_ in items} == {0, 1}
    seeds = [s for _, s, _, _ in items]
    assert len(set(seeds)) == len(seeds), seeds
    by_worker = {w: [(idx, wt) for ww, _, idx, wt in items if ww == w] for w in (0, 1)}
    pairs = list(zip(by_worker[0], by_worker[1]))
    assert all(not torch.equal(w0, w1) for (_, w0), (_, w1) in pairs)  # continuous draws: equal only if copied
    assert not all(torch.equal(i0, i1) for (i0, _), (i1, _) in pairs)
    assert torch.equal(ds.mask.generator.get_state(), before)
    # reproducible: the worker seeds come from the main process's RNG
    torch.manual_seed(123)
    again = _draw_in_workers(ds)
    assert [s for _, s, _, _ in again] == seeds
    # another epoch (new worker seeds) gets new keys
    third = _draw_in_workers(ds)
    assert not set(s for _, s, _, _ in third) & set(seeds)


def test_outside_workers_the_stream_is_the_generators():
    # the main process draws exactly what the seeded generator gives (no re-keying there)
    a = HybridMask(2, generator=torch.Generator().manual_seed(11)).plan(5)
    b = HybridMask(2, generator=torch.Generator().manual_seed(11)).plan(5)
    assert a.seed == b.seed and torch.equal(a.index, b.index) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("bad", ["x", 3, torch.tensor(3)], ids=["str", "int", "tensor"])
def test_generator_of_the_wrong_type_names_the_argument(bad):
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got"):
        HybridMask(2, generator=bad)
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got"):
        HybridMask(2).plan(4, generator=bad)
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got"):
        fastmix.sample_partners(4, 2, generator=bad)
    for law in ("instahide", "dirichlet"):
        with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got"):
            fastmix.sample_weights(4, 2, law=law, generator=bad)


# ----------------------------------------------------------------------------------------------------
# torch.compile: the plan is drawn outside, the rest compiles with fullgraph=True
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_STEPS = 10  # more fresh plans than Dynamo's recompile limit (8): a recompile per key would show
# compiled vs eager: the traced reference may reorder float32 sums (front-end values ~1e3)
COMPILE_TOL = dict(rtol=1e-4, atol=1e-3)


def test_compiled_step_with_a_plan_drawn_outside(backend, gen, fresh_dynamo):
    """The documented pattern: mask.plan() eagerly, the masked forward and the loss in one fullgraph compile.
    Matches eager on every step with a fresh key each, compiled at most twice (the first call specialises the
    seed, the second makes it a symbolic int)."""
    import torch._dynamo.testing

    mask = HybridMask(3, generator=torch.Generator().manual_seed(4))
    head = torch.nn.Linear(189, 5)

    def step(x, labels, plan):
        z, partner_labels, w = mask(x, labels, plan=plan)
        logp = head(z.mean((2, 3))).log_softmax(1)
        return -(w * logp.gather(1, partner_labels)).sum(1).mean()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x, labels = rand_faces(gen, 4, 3, 4, 4), labels_for(4) % 5
    seeds = set()
    for _ in range(COMPILE_STEPS):
        p = mask.plan(4)
        seeds.add(p.seed)
        torch.testing.assert_close(compiled(x, labels, p), step(x, labels, p), **COMPILE_TOL)
    assert len(seeds) == COMPILE_STEPS
    assert counter.frame_count <= 2, counter.frame_count
    # mask.apply compiles the same way
    apply = torch.compile(mask.apply, fullgraph=True, backend="aot_eager")
    p = mask.plan(4)
    torch.testing.assert_close(apply(x, p), mask.apply(x, p), **COMPILE_TOL)


def test_compiling_the_module_without_a_plan(gen, fresh_dynamo):
    """fullgraph=True without a plan: an error that says what to do (it failed inside PyTorch on .item()
    and the generator). Without fullgraph the draws run eagerly: a fresh key per call."""
    mask = HybridMask(2, generator=torch.Generator().manual_seed(6))
    x, labels = rand_faces(gen, 4, 3, 4, 4), labels_for(4)
    with pytest.raises(Exception, match=r"outside torch.compile: call p = mask.plan"):
        torch.compile(mask, fullgraph=True, backend="aot_eager")(x, labels)
    relaxed = torch.compile(mask, backend="aot_eager")
    a, b = relaxed(x, labels)[0], relaxed(x, labels)[0]
    assert a.shape == (4, 189, 4, 4) and not torch.equal(a, b)


@pytest.mark.parametrize("name", ["frontend_default", "freq_mix_channels", "freq_mix_pixels"])
def test_noise_is_the_fused_ops_noise_from_a_fresh_seed(backend, gen, name):
    """noise= adds the fused op's noise drawn from the plan's noise_seed: the output is the op with that seed,
    each call draws a new one, and the partners, weights and sign keys are those of the same mask without
    noise (the noise seed is drawn last)."""
    kwargs, shape, _ = _CONFIGS[name]
    n, c = shape[0], shape[1]
    x = rand_faces(gen, *shape) if kwargs.get("upsample", 8) else randn(gen, *shape)
    scale = torch.linspace(0.0, 0.3, 64)  # per frequency
    noisy = HybridMask(**kwargs, noise="gaussian", noise_scale=scale, generator=torch.Generator().manual_seed(5))
    clean = HybridMask(**kwargs, generator=torch.Generator().manual_seed(5))
    p1, p2 = noisy.plan(n), noisy.plan(n)
    q1 = clean.plan(n)
    assert torch.equal(p1.index, q1.index) and torch.equal(p1.weight, q1.weight) and p1.seed == q1.seed
    assert q1.noise_seed is None and p1.noise_seed is not None and p1.noise_seed != p2.noise_seed
    z = noisy.apply(x, p1)
    ids = keep_ids(noisy.keep, c)
    args = dict(seed=p1.seed, noise="gaussian", noise_seed=p1.noise_seed, noise_scale=scale)
    if noisy.upsample is None:
        want = fastmix.freq_mix(x, p1.index, p1.weight.to(x.dtype), keep=ids, out=noisy.out, **args)
    else:
        want = fastmix.frontend(x, upsample=noisy.upsample, color=noisy.color, keep=ids, index=p1.index,
                                weight=p1.weight, **args)
    assert torch.equal(z, want)
    assert not torch.equal(z, clean.apply(x, q1))  # the noise is there
    assert not torch.equal(z, noisy.apply(x, p2))
    with pytest.raises(ValueError, match="needs a noise_seed"):
        noisy.apply(x, q1)
    assert "noise=gaussian, noise_scale=tensor(64,)" in noisy.extra_repr()
