"""Victim / attacker / judge splits (training/privacy/data.py): identity-disjoint for every set, folder sets
in any Pillow format, a clear error for sets too small to split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.privacy.data import JUDGE_MIN_IDS, folder_split, get_split


def _write_folder(root: Path, counts: list[int], fmt_of=lambda i, j: "png") -> Path:
    """root/id<i>/<j>.<fmt>: 20x24 grey images, each identity its own brightness pattern."""
    rng = np.random.default_rng(0)
    for i, n in enumerate(counts):
        d = root / f"id{i}"
        d.mkdir(parents=True)
        base = rng.integers(0, 256, (24, 20))
        for j in range(n):
            arr = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            fmt = fmt_of(i, j)
            Image.fromarray(arr, "L").save(d / f"{j}.{fmt}", format="GIF" if fmt == "gif" else fmt.upper())
    return root


def _ids(faces) -> set[str]:
    return {Path(n).parent.name for n in faces.names}


def _check_disjoint(s):
    vic = _ids(s.victim_train) | _ids(s.victim_val) | _ids(s.victim_test)
    att = _ids(s.attacker)
    assert vic and att and not vic & att
    assert set(s.info["victims"]) == vic and set(s.info["attackers"]) == att
    if s.judge is not None:
        assert not set(s.judge.identities) & (vic | att)
        # by file too: no victim or attacker image is in the judge pool
        files = set(s.judge.files)
        for part in (s.victim_train, s.victim_val, s.victim_test, s.attacker):
            assert not files & set(part.names)
    # enrollment: templates from the victims' training images, probes held out
    assert s.enrollment.gallery is s.victim_train and s.enrollment.probe is s.victim_test
    assert not set(s.victim_train.names) & set(s.victim_test.names)


def test_folder_split_with_its_own_judge_pool(tmp_path):
    # enough people for the folder's own judge pool; PNG and GIF mixed (training.data's scanner skips GIF)
    counts = [6] * 30 + [2] * (JUDGE_MIN_IDS + 40)
    root = _write_folder(tmp_path / "faces", counts, lambda i, j: "gif" if (i + j) % 2 else "png")
    for seed in (0, 1):
        s = folder_split(root, seed, attacker_images=60)  # get_split's 600 would take most of this small set
        assert s.num_victims == 20 and s.victim_train.images.shape[1:] == (1, 56, 56)
        assert s.info["judge_pool"] == f"folder_s{seed}"
        _check_disjoint(s)
        assert set(s.judge.identities) | set(s.info["victims"]) | set(s.info["attackers"]) == {f"id{i}" for i in range(len(counts))}
        assert any(f.endswith(".gif") for f in s.victim_train.names)
    # per seed: another draw of victims
    assert get_split(f"folder:{root}", 0).info["victims"] != get_split(f"folder:{root}", 1).info["victims"]


def test_small_folder_judge_pool_is_lfw_without_the_folders_names(tmp_path):
    root = _write_folder(tmp_path / "faces", [5] * 8)
    (root / "id0").rename(root / "George_W_Bush")  # a name LFW has: excluded from the judge pool
    s = get_split(f"folder:{root}", 0)
    assert s.num_victims == 4 and len(s.info["attackers"]) == 4
    assert s.info["victim_train"] == 4 * 3 and s.info["victim_test"] == 4  # 5 images: 3 / 1 / 1
    if s.judge is None:
        with pytest.raises(FileNotFoundError, match="LFW"):
            s.judge_pool
        return
    assert "George_W_Bush" not in s.judge.identities and s.info["judge_pool"] == "lfw_judge_excl"
    _check_disjoint(s)


@pytest.mark.parametrize("counts, what", [([10, 10, 10], "3 identities"), ([3] * 10, "0 with >= 4 images"),
                                          ([4, 1, 1], "1 with >= 4 images")])
def test_too_small_folder_raises_one_clear_line(tmp_path, counts, what):
    root = _write_folder(tmp_path / "f", counts)
    with pytest.raises(ValueError, match="too small to split") as e:
        get_split(f"folder:{root}", 0)
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg and what in msg and "needs" in msg


def test_unknown_set_and_empty_folder_name():
    with pytest.raises(ValueError, match="unknown face set"):
        get_split("celeba", 0)
    with pytest.raises(ValueError, match="names no folder"):
        get_split("folder:", 0)


def test_orl_and_lfw_splits_are_three_way_disjoint(orl_root):
    from training.data import data_root

    if not (data_root() / "lfw").is_dir():
        pytest.skip("LFW not found (see DATA.md)")
    lfws = [get_split("lfw", seed) for seed in (0, 1, 7)]
    for lfw in lfws:
        assert lfw.num_victims == 40 and lfw.info["victim_train"] == 240 and lfw.info["attacker_images"] >= 600
        _check_disjoint(lfw)
        assert lfw.judge.num_identities > 3000
    # one judge pool for the standard seeds (the judges train once); it holds none of their victims or
    # attackers, so each standard seed's split is disjoint from it (checked above for 0 and 1)
    assert lfws[0].judge.key() == lfws[1].judge.key() and lfws[0].info["judge_pool"] == "lfw_judge"
    from training.privacy.data import JUDGE_SEEDS
    taken = set()
    for seed in JUDGE_SEEDS:
        sp = get_split("lfw", seed)
        taken |= set(sp.info["victims"]) | set(sp.info["attackers"])
    assert not taken & set(lfws[0].judge.identities)
    # a seed outside them also keeps its own people out: another pool
    assert lfws[2].judge.key() != lfws[0].judge.key() and lfws[2].info["judge_pool"] == "lfw_judge_s7"
    orl = get_split("orl", 0)
    assert orl.num_victims == 20 and orl.info["attacker_images"] == 200
    _check_disjoint(orl)
    # the ORL judge is cross-dataset: LFW people only, the same pool for every seed, and LFW's
    assert Path(orl.judge.root).name == "lfw" and all("orl_faces" not in f for f in orl.judge.files)
    assert orl.judge.key() == get_split("orl", 1).judge.key() == lfws[0].judge.key()
