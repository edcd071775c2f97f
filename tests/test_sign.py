"""The sign-flip key: the hash spec (fastmix/ops/sign.py), its pinned values, and the kernels' signs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmix
from fastmix.ops.sign import MAX_SEED, mix32, mix32_tensor, seed_key, sign_ref
from _fastmix_testing import rand_index, rand_weight, randn, run_on

# ----------------------------------------------------------------------------------------------------
# The specification, pinned. Computed once from fastmix/ops/sign.py; a change here changes every key
# ever drawn, on every backend, so these values must never move.
# ----------------------------------------------------------------------------------------------------

MIX32_VECTORS = {
    0x00000000: 0x00000000,
    0x00000001: 0x688990C0,
    0x00000002: 0xD1132181,
    0x075BCD15: 0xA8F1DB88,
    0x7FFFFFFF: 0x8D29FFB8,
    0x80000000: 0xCC4B4124,
    0x9E3779B9: 0x01FCE552,
    0xDEADBEEF: 0xE628C683,
    0xFFFFFFFF: 0x6768824A,
}
SEED_KEY_VECTORS = {0: 0xAE6F80F1, 1: 0xA07C7A97, 1234: 0x16B272E8, 2**32: 0x8E374FE0, 2**63 - 1: 0xA3945386}
# (seed, m, channel, block row, block col) -> the 32-bit word whose top bit is the sign
HASH_VECTORS = {
    (0, 0, 0, 0, 0): 0x0EAA7511,
    (42, 0, 0, 0, 1): 0x1473DE54,
    (1234, 1, 65, 3, 7): 0xF8E23F98,
    (2**32 + 5, 7, 255, 1000, 2): 0xCE67E558,
    (2**63 - 1, 2**31, 191, 65535, 65535): 0xAF572192,
}
# sign_ref(1234, m=2, channels=3, hb=2, wb=3), flattened
SIGN_REF_1234 = [
    -1, 1, 1, 1, -1, -1, 1, -1, 1, 1, -1, 1, 1, -1, 1, -1, -1, 1,
    -1, 1, -1, 1, -1, -1, -1, 1, -1, 1, -1, -1, 1, 1, -1, 1, -1, 1,
]  # fmt: skip
SIGN_REF_MAXSEED = [-1, -1, 1, -1, -1, 1, -1, -1]  # sign_ref(2**63 - 1, 1, 2, 1, 4)


def coef_hash(seed, m, ch, i, j):
    """The documented formula, written out from the spec with the scalar mix32."""
    plane = mix32(mix32(seed_key(seed) ^ m) ^ ch)
    return mix32(plane ^ ((i << 16) | j))


def mix32_numpy(h: np.ndarray) -> np.ndarray:
    """An independent twin of mix32 in wrapping uint32 arithmetic."""
    h = h.astype(np.uint32)
    with np.errstate(over="ignore"):
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    return h


def test_mix32_pinned_vectors():
    for h, want in MIX32_VECTORS.items():
        assert mix32(h) == want, hex(h)
    keys = np.array(list(MIX32_VECTORS), dtype=np.uint32)
    assert mix32_numpy(keys).tolist() == list(MIX32_VECTORS.values())


def test_mix32_tensor_matches_scalar_spec(gen):
    # Random words plus the edges of the int64 "multiply by 16-bit halves" trick.
    edges = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
    words = torch.cat([torch.tensor(edges), torch.randint(0, 2**32, (4096,), generator=gen)])
    got = mix32_tensor(words).tolist()
    assert got == [mix32(int(w)) for w in words]
    assert got == mix32_numpy(words.numpy().astype(np.uint32)).tolist()


def test_seed_key_and_hash_pinned_vectors():
    for seed, want in SEED_KEY_VECTORS.items():
        assert seed_key(seed) == want, seed
    for args, want in HASH_VECTORS.items():
        assert coef_hash(*args) == want, args


def test_sign_ref_pinned_and_follows_the_formula():
    s = sign_ref(1234, 2, 3, 2, 3)
    assert s.shape == (2, 3, 2, 3) and s.dtype == torch.float32
    assert s.flatten().int().tolist() == SIGN_REF_1234
    assert sign_ref(2**63 - 1, 1, 2, 1, 4).flatten().int().tolist() == SIGN_REF_MAXSEED
    s = sign_ref(2**40 + 17, 3, 5, 2, 4, dtype=torch.float64)
    for m, ch, i, j in [(0, 0, 0, 0), (2, 4, 1, 3), (1, 3, 0, 2)]:
        assert s[m, ch, i, j] == (-1.0 if coef_hash(2**40 + 17, m, ch, i, j) >> 31 else 1.0)


# ----------------------------------------------------------------------------------------------------
# Statistics of the key (deterministic: fixed seeds, so no flakiness)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**63 - 1])
def test_mean_sign_near_zero(seed):
    s = sign_ref(seed, 16, 192, 14, 14)  # 602112 signs
    n = s.numel()
    assert abs(s.mean().item()) < 5 / n**0.5
    # no structure along any axis: every (m), (channel) and (block) slice is balanced too
    assert s.mean(dim=(1, 2, 3)).abs().max() < 5 / (n / 16) ** 0.5
    assert s.mean(dim=(0, 2, 3)).abs().max() < 5 / (n / 192) ** 0.5
    assert s.mean(dim=(0, 1)).abs().max() < 5 / (16 * 192) ** 0.5


def test_other_seeds_give_other_signs():
    base = sign_ref(1000, 8, 64, 8, 8)
    n = base.numel()
    for other in [1001, 1000 + 2**32, 0, 2**62]:
        agree = (sign_ref(other, 8, 64, 8, 8) == base).float().mean().item()
        assert abs(agree - 0.5) < 5 * 0.5 / n**0.5, (other, agree)


# ----------------------------------------------------------------------------------------------------
# The kernels' signs
# ----------------------------------------------------------------------------------------------------


def _problem(gen, n=3, c=3, h=16, w=24, m=5, k=2, wkind="freq"):
    x = randn(gen, n, c, h, w)
    return x, rand_index(gen, n, m, k), rand_weight(gen, wkind, m, k, c)


@pytest.mark.parametrize("wkind", ["img", "freq"])
def test_seeded_output_is_unseeded_output_times_sign_ref(backend, gen, wkind):
    """The sign is a pure function of (seed, m, channel id, i, j): independent of the data, the partners,
    the weights and the keep set. Negation is exact, so the comparison is bitwise."""
    seed = 2**33 + 99
    x, index, weight = _problem(gen, wkind=wkind)
    s = sign_ref(seed, 5, 192, 2, 3)
    plain = fastmix.freq_mix(x, index, weight)
    assert torch.equal(fastmix.freq_mix(x, index, weight, seed=seed), plain * s)
    ids = [0, 7, 64, 100, 191]
    assert torch.equal(fastmix.freq_mix(x, index, weight, keep=ids, seed=seed), (plain * s)[:, ids])
    # other data, partners and weights: the same signs
    x2, index2, weight2 = _problem(gen, wkind=wkind)
    assert torch.equal(fastmix.freq_mix(x2, index2, weight2, seed=seed), fastmix.freq_mix(x2, index2, weight2) * s)


def test_kernel_hash_is_the_spec_bit_for_bit(backend, gen):
    """24 rows, all 256 channel ids of C = 4, 130 block columns, seeds with high bits set.

    Positive pixels make every DC positive, so the signed DC channels *are* the key; for the other
    channels sign(seeded) * sign(unseeded) is the key wherever the unseeded coefficient is non-zero."""
    m, ones = 24, torch.ones(24, 1)
    index = torch.zeros(m, 1, dtype=torch.int64)
    x_pos = torch.rand(1, 4, 8, 8 * 130, generator=gen) + 1.0
    x_gen = randn(gen, 1, 4, 8, 8 * 130)
    dc = [0, 64, 128, 192]
    for seed in [77, 2**32 + 1, 2**63 - 1]:
        key = sign_ref(seed, m, 256, 1, 130)
        y = fastmix.freq_mix(x_pos, index, ones, keep=dc, seed=seed)
        assert torch.equal(torch.sign(y), key[:, dc]), seed
        plain = fastmix.freq_mix(x_gen, index, ones)
        signed = fastmix.freq_mix(x_gen, index, ones, seed=seed)
        nz = plain != 0
        assert nz.float().mean() > 0.99
        assert torch.equal((torch.sign(signed) * torch.sign(plain))[nz], key[nz]), seed


def test_same_seed_bit_identical_other_seed_different(backend, gen):
    x, index, weight = _problem(gen)
    a = fastmix.freq_mix(x, index, weight, seed=31337)
    b = fastmix.freq_mix(x, index, weight, seed=31337)
    assert torch.equal(a, b)
    c = fastmix.freq_mix(x, index, weight, seed=31338)
    assert torch.equal(a.abs(), c.abs())
    flipped = (torch.sign(a) != torch.sign(c)).float().mean().item()
    assert 0.4 < flipped < 0.6, flipped
    # seed 0 is a key too (not "no key")
    z = fastmix.freq_mix(x, index, weight, seed=0)
    assert not torch.equal(z, fastmix.freq_mix(x, index, weight))


def test_signs_identical_across_backends(gen):
    """Every backend present draws the same key bits (torch is the spec)."""
    x, index, weight = _problem(gen)
    plain = run_on("torch", fastmix.freq_mix, x.double(), index, weight.double())
    for name in fastmix.available_backends("cpu"):
        signed = run_on(name, fastmix.freq_mix, x.double(), index, weight.double(), seed=2**50 + 3)
        ratio = torch.sign(signed) * torch.sign(plain)
        assert torch.equal(ratio, sign_ref(2**50 + 3, 5, 192, 2, 3, dtype=torch.float64)), name


def test_frontend_uses_the_same_key(backend, gen):
    x = torch.rand(4, 3, 4, 6, generator=gen) * 2 - 1
    plain = fastmix.frontend(x, upsample=4, keep=list(range(1, 192)))
    signed = fastmix.frontend(x, upsample=4, keep=list(range(1, 192)), seed=555)
    assert torch.equal(signed, plain * sign_ref(555, 4, 192, 2, 3)[:, 1:])


def test_seed_range_edges(backend, gen):
    x, index, weight = _problem(gen)
    top = fastmix.freq_mix(x, index, weight, seed=MAX_SEED - 1)
    assert torch.equal(top, fastmix.freq_mix(x, index, weight) * sign_ref(MAX_SEED - 1, 5, 192, 2, 3))
    # numpy and 0-d torch integers are accepted as seeds
    assert torch.equal(fastmix.freq_mix(x, index, weight, seed=np.int64(12)), fastmix.freq_mix(x, index, weight, seed=12))
