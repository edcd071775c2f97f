"""Loaders: a RecordIO pack and a .bin set written here, ImageFolder with corrupt files, real ORL / LFW
(skipped with the reason when ../shared/data is absent)."""
from __future__ import annotations

import io
import json
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from training import data as D
from training.loop import train


def _encode(arr: torch.Tensor, fmt="PNG") -> bytes:
    """(C, H, W) uint8 -> encoded bytes."""
    a = arr.permute(1, 2, 0).numpy()
    im = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _faces(ids, per_id, c=3, size=64):
    f = D.synthetic_faces(ids, per_id, c, size, seed=3)
    return f.images, f.labels


def test_recordio_encode_decode_roundtrip():
    magic = struct.pack("<I", D.RECORDIO_MAGIC)
    payloads = [b"", b"a", b"abcd", b"abcde" * 3, magic, b"xyzw" + magic + b"12", magic + magic + b"q", b"12" + magic + b"34"]
    blob = b"".join(D.recordio_encode(p) for p in payloads)
    off = 0
    for p in payloads:
        got, off = D.recordio_decode_at(blob, off)
        assert got == p
        assert off % 4 == 0
    assert off == len(blob)
    # an aligned magic splits the record into flagged parts (dmlc-core's writer)
    enc = D.recordio_encode(b"xyzw" + magic + b"12")
    assert struct.unpack_from("<II", enc, 0)[1] >> 29 == 1
    with pytest.raises(ValueError, match="magic"):
        D.recordio_decode_at(b"\0" * 16, 0)


def test_irheader_scalar_and_vector_labels():
    flag, lab, id_, _, payload = D.unpack_irheader(D.pack_irheader(7.0, id=3) + b"IMG")
    assert (flag, lab, id_, payload) == (0, 7.0, 3, b"IMG")
    flag, lab, _, _, payload = D.unpack_irheader(D.pack_irheader([5, 2]) + b"IMG")
    assert flag == 2 and lab.tolist() == [5.0, 2.0] and payload == b"IMG"


def test_recordio_pack_loader_and_training(tmp_path, tiny):
    imgs, labels = _faces(4, 4)
    items = [(_encode(im, "JPEG" if i % 2 else "PNG"), int(y) + 100) for i, (im, y) in enumerate(zip(imgs, labels))]
    items.append((b"not an image at all", 103))  # a corrupt record
    pack = tmp_path / "pack"
    pack.mkdir()
    D.write_recordio_pack(pack / "train", items)
    # a .bin verification set beside it
    pairs, same = [], []
    for p in range(8):
        a, b = (2 * p) % 16, (2 * p + (1 if p % 2 == 0 else 5)) % 16
        pairs += [_encode(imgs[a]), _encode(imgs[b])]
        same.append(bool(labels[a] == labels[b]))
    D.write_bin(pack / "lfw.bin", pairs, same)

    ds = D.RecordIOFaces(pack / "train.rec", pack / "train.idx", color="rgb", size=112)
    assert len(ds) == 17 and ds.num_classes == 4
    assert ds.raw_labels[:4].tolist() == [100, 100, 100, 100]
    im, y = ds[1]
    assert im.shape == (3, 112, 112) and im.dtype == torch.uint8 and y == 0
    before = D.SKIPS.count
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        bad = ds[16]
    assert bad[0] is None and D.SKIPS.count == before + 1
    x, yb = D.collate_skipping([ds[0], bad, ds[2]])
    assert x.shape == (3, 3, 112, 112) and yb.tolist() == [0, 0, 0]  # the stand-in brings its label

    cfg = tiny(tmp_path / "run", **{"data.kind": "recordio", "data.root": str(pack), "data.color": "rgb",
                                   "data.bin_sets": ["lfw.bin"], "defence.name": "hybrid", "defence.k": 2,
                                   "train.steps": 2, "train.batch_size": 6, "data.num_workers": 0})
    with pytest.warns(UserWarning):
        res = train(cfg, resume=False)
    assert res["tests"][0]["task"] == "verification" and res["tests"][0]["set"] == "lfw" and res["tests"][0]["pairs"] == 8


def test_bin_loader_drops_pairs_with_unreadable_images(tmp_path):
    imgs, _ = _faces(2, 3, c=1)
    bins = [_encode(imgs[i]) for i in range(6)]
    bins[3] = b"\x89PNG\r\n\x1a\n truncated"
    D.write_bin(tmp_path / "x.bin", bins, [True, False, True])
    before = D.SKIPS.count
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        ps = D.load_bin(tmp_path / "x.bin", color="grey", size=112)
    assert ps.images.shape == (4, 1, 112, 112) and ps.issame.tolist() == [True, True]
    assert D.SKIPS.count == before + 1


def test_corrupt_images_are_skipped_and_counted(tmp_path, tiny):
    root = tmp_path / "faces"
    imgs, labels = _faces(8, 4, c=1, size=80)
    for i, (im, y) in enumerate(zip(imgs, labels)):
        d = root / f"person{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(_encode(im))
    (root / "person0" / "bad.jpg").write_bytes(b"garbage")
    good = _encode(imgs[0], "JPEG")
    (root / "person1" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (root / "person2" / "empty.png").write_bytes(b"")
    cfg = tiny(tmp_path / "run", **{"data.kind": "imagefolder", "data.root": str(root), "data.min_images": 2,
                                   "data.val_identities": 2, "data.test_identities": 2, "data.val_pairs": 10,
                                   "data.test_pairs": 10, "defence.name": "ppfr", "train.steps": 2})
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        bundle = D.load_data(cfg)
    assert bundle.info["skipped_images"] == 3
    assert len(bundle.train) == 16 and bundle.num_classes == 4  # 8 identities: 2 val, 2 test, 4 train
    res = train(cfg, resume=False, data=bundle)
    assert res["tests"][0]["task"] == "verification" and res["tests"][0]["pairs"] == 10


def test_image_folder_without_images_names_the_layout(tmp_path):
    (tmp_path / "person0").mkdir()
    (tmp_path / "person0" / "notes.txt").write_text("no faces here")
    (tmp_path / "person0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(D.DataError, match=r"holds no images: expected <root>/<identity>/<image>"):
        D.scan_image_folder(tmp_path)
    with pytest.raises(D.DataError, match="does not exist"):
        D.scan_image_folder(tmp_path / "missing")


def test_image_folder_without_images_is_a_one_line_error(tmp_path, capsys):
    """An image folder set without faces ended the command with a FileNotFoundError traceback after the config
    had been accepted; now one line naming the folder, exit 2 like a config error."""
    from training import train as cli

    (tmp_path / "faces" / "person0").mkdir(parents=True)
    (tmp_path / "faces" / "person0" / "notes.txt").write_text("no faces here")
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{kind: imagefolder, root: {tmp_path / 'faces'}}}\ntrain: {{progress: false, threads: 1}}\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(p), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds no images" in err and "Traceback" not in err


def _gif(frames: list[torch.Tensor]) -> bytes:
    """(1, H, W) uint8 frames -> an (animated when several) grey GIF."""
    ims = [Image.fromarray(f[0].numpy()) for f in frames]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=len(ims) > 1, append_images=ims[1:], duration=100, loop=0)
    return buf.getvalue()


def test_image_folder_reads_every_format_pillow_decodes(tmp_path):
    """A classic face set of grey GIFs (one folder per person) was refused: the loader took a fixed list of
    extensions. Now every format Pillow opens counts, an animation by its first frame, and a face without an
    extension too (identified by Pillow); files that are not images are left out, not counted as broken."""
    root = tmp_path / "faces"
    imgs, labels = _faces(3, 4, c=1, size=48)
    for i, (im, y) in enumerate(zip(imgs, labels)):
        d = root / f"subject{int(y) + 1:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.gif").write_bytes(_gif([im, 255 - im]))  # the second frame is the negative
    (root / "subject01" / "scan_noext").write_bytes(_encode(imgs[0], "BMP"))
    (root / "subject01" / "face.tga").write_bytes(_encode(imgs[0], "TGA"))
    (root / "subject02" / "Readme.txt").write_text("not a face")
    people = D.scan_image_folder(root)
    assert [n for n, _ in people] == ["subject01", "subject02", "subject03"]
    assert [len(f) for _, f in people] == [6, 4, 4]
    first = D.read_image(root / "subject01" / "0.gif", "grey", 48)
    assert torch.equal(first, imgs[0])  # the first frame, not the negative
    assert D.read_image(root / "subject01" / "face.tga", "grey", 48).equal(imgs[0])
    assert D.read_image(root / "subject01" / "scan_noext", "grey", 48).equal(imgs[0])
    assert ".gif" in D.image_extensions() and ".jp2" in D.image_extensions()


def _png16(value: int, mode="I;16") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30), value, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_high_bit_depth_images_are_scaled_not_clipped():
    """convert("L") clips 16-bit samples at 255: a 16-bit PNG of 100 * 257 read as white everywhere (a face was
    all white, neither skipped nor counted). 16-bit, 32-bit integer and float images are scaled to 8 bits."""
    im = D.decode_image(_png16(100 * 257), "grey", 16)
    assert im.shape == (1, 16, 16) and int(im.min()) == int(im.max()) == 100
    assert D.decode_image(_png16(65535), "rgb", 16).eq(255).all()
    assert D.decode_image(_png16(0), "grey", 16).eq(0).all()

    def tiff(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")
        return buf.getvalue()

    grad = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    got = D.decode_image(tiff(grad), "grey", 30)  # float in [0, 1]
    want = D.decode_image(_encode(torch.from_numpy(np.rint(grad * 255).astype(np.uint8))[None]), "grey", 30)
    assert (got.int() - want.int()).abs().max() <= 1 and int(got.max()) == 255
    assert int(D.decode_image(tiff(np.full((8, 8), 0.5, np.float32)), "grey", 8).max()) == 128
    assert int(D.decode_image(tiff(np.full((8, 8), 200.0, np.float32)), "grey", 8).max()) == 200  # [0, 255] floats
    assert int(D.decode_image(tiff(np.full((8, 8), 100 * 257, np.uint16)), "grey", 8).max()) == 100  # I;16 TIFF
    assert int(D.decode_image(tiff(np.full((8, 8), 2**31 - 1, np.int32)), "grey", 8).max()) == 255  # 32-bit TIFF
    pgm = b"P5\n4 3\n65535\n" + np.full(12, 100 * 257, ">u2").tobytes()  # 16-bit PGM (Pillow: mode I)
    assert int(D.decode_image(pgm, "grey", 4).max()) == 100
    before = D.SKIPS.count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SKIPS warns for the first few skips of the process only
        assert D.decode_image(tiff(np.full((8, 8), np.nan, np.float32)), "grey", 8, where="nan.tif") is None
    assert D.SKIPS.count == before + 1
    assert len(D.SKIPS.examples) == 20 or "non-finite" in D.SKIPS.examples[-1]  # examples: the first 20 only


def _assert_distinct(idx, same, labels):
    keys = [tuple(sorted(p)) for p in idx.tolist()]
    assert len(set(keys)) == len(keys), "a pair repeats"
    assert all(a != b for a, b in keys)
    assert all(bool(labels[a] == labels[b]) == s for (a, b), s in zip(idx.tolist(), same.tolist()))


def test_verification_pairs_are_distinct_and_never_repeated():
    """make_pairs drew with replacement: 1000 pairs "500 genuine" from 5 identities x 11 images, which hold 275
    distinct genuine pairs, so pairs repeated (and a repeat could sit in a threshold fold and the test fold).
    Now every pair is distinct; a class short of pairs gives all of its pairs, once."""
    labels = torch.arange(5).repeat_interleave(11)
    idx, same = D.make_pairs(labels, 1000, torch.Generator().manual_seed(0))
    _assert_distinct(idx, same, labels)
    assert D.pair_capacity(labels) == (275, 1210)
    assert int(same.sum()) == 275 and int((~same).sum()) == 500  # every genuine pair, the impostors asked
    # plenty of pairs: exactly the count asked, half and half, alternating (contiguous folds hold both classes)
    big = torch.arange(30).repeat_interleave(20)
    idx, same = D.make_pairs(big, 600, torch.Generator().manual_seed(1))
    _assert_distinct(idx, same, big)
    assert idx.shape == (600, 2) and int(same.sum()) == 300 and same[0::2].all() and not same[1::2].any()
    # few impostor pairs (2 identities of 3): all 9 of them; the 6 genuine pairs all used too
    two = torch.tensor([0, 0, 0, 1, 1, 1])
    idx, same = D.make_pairs(two, 40, torch.Generator().manual_seed(2))
    _assert_distinct(idx, same, two)
    assert int(same.sum()) == 6 and int((~same).sum()) == 9
    # deterministic for a seed
    a = D.make_pairs(labels, 100, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, D.make_pairs(labels, 100, torch.Generator().manual_seed(3))[0])


def test_pair_shortfall_is_reported_in_results_and_the_log(tmp_path, tiny):
    """The classic-set run of the issue: 5 test identities of 11 images, 1000 test pairs asked. The run uses
    the 775 distinct pairs there are and says so: a warning, results.json (data and the test's entry), and
    the validation lines of metrics.jsonl for validation pairs."""
    root = tmp_path / "faces"
    imgs, labels = _faces(9, 11, c=1, size=40)
    for i, (im, y) in enumerate(zip(imgs, labels)):
        d = root / f"s{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.gif").write_bytes(_gif([im]))
    cfg = tiny(tmp_path / "run", **{"data.kind": "imagefolder", "data.root": str(root), "data.min_images": 5,
                                   "data.val_identities": 2, "data.test_identities": 5, "data.val_pairs": 300,
                                   "data.test_pairs": 1000, "defence.name": "hybrid", "defence.k": 2,
                                   "train.steps": 2, "train.eval_every": 1})
    with pytest.warns(UserWarning) as caught:
        res = train(cfg, resume=False)
    said = [str(w.message) for w in caught]
    assert any("imagefolder_test: 775 distinct pairs instead of the 1000 asked (275 genuine of 275" in m for m in said)
    assert any("imagefolder_val: 231 distinct pairs instead of the 300 asked" in m for m in said)
    t = res["tests"][0]
    assert t["pairs"] == 775 and t["genuine"] == 275 and t["pairs_requested"] == 1000 and t["repeated_pairs"] == 0
    assert "every distinct pair is used once" in t["pairs_note"]
    notes = res["data"]["pair_shortfall"]
    assert any(n.startswith("imagefolder_test: 775 distinct pairs") for n in notes)
    # validation: 2 identities x 11 images = 110 genuine + 121 impostor pairs < 300 asked
    assert any(n.startswith("imagefolder_val: 231 distinct pairs") for n in notes)
    vals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert vals and all(v["pairs"] == 231 and v["pairs_requested"] == 300 for v in vals)


def test_repeated_pairs_stay_in_one_fold(tmp_path):
    """A pair list or .bin set may list a pair twice: its copies share a fold, so no copy chooses the threshold
    applied to another (across-fold leakage); the result counts them."""
    from training.eval import assign_folds, verification

    same = torch.tensor([True, False] * 10)
    keys = torch.arange(20)
    keys[15] = keys[2]  # pair 15 is pair 2 again
    keys[19] = keys[0]
    fold, _, repeated = assign_folds(same, 10, keys)
    assert repeated == 2 and fold[15] == fold[2] and fold[19] == fold[0]
    assert torch.equal(assign_folds(same, 10)[0], torch.arange(20) // 2)
    assert verification(torch.rand(20), same, 10, keys=keys)["repeated_pairs"] == 2
    # a pair file with a repeated line, and a .bin set with a repeated pair: equal keys
    imgs, labels = _faces(2, 3, c=1)
    bins = [_encode(imgs[i]) for i in (0, 1, 0, 3, 1, 0)]  # pair 2 = pair 0 reversed
    D.write_bin(tmp_path / "x.bin", bins, [True, False, True])
    ps = D.load_bin(tmp_path / "x.bin", color="grey", size=32)
    assert ps.keys.tolist() == [0, 1, 0]
    root = tmp_path / "lfw"
    for name in ("Ann", "Bob"):
        (root / name).mkdir(parents=True)
        for i in (1, 2):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(_encode(imgs[i], "JPEG"))
    (tmp_path / "pairs.txt").write_text("Ann 1 2\nAnn 1 Bob 2\nAnn 2 1\nBob 2 Ann 1\nBob 1 2\n")
    ps = D._load_pairs_file("pairs", root, tmp_path / "pairs.txt", "grey", 32, None)
    assert ps.keys.tolist() == [0, 1, 0, 1, 2]


def test_decode_variants():
    im = D.decode_image(_encode(torch.full((3, 50, 40), 200, dtype=torch.uint8)), "grey", 112, crop=40)
    assert im.shape == (1, 112, 112) and int(im[0, 5, 5]) == 200
    im = D.decode_image(_encode(torch.full((1, 50, 40), 9, dtype=torch.uint8)), "rgb", 112)
    assert im.shape == (3, 112, 112) and torch.equal(im[0], im[2])  # grey replicated
    with pytest.raises(ValueError, match="color"):
        D.channels_of("ycbcr")
    x = D.to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


def test_sampler_positions_and_ranks():
    s = D.ResumableBatchSampler(10, 4, seed=0)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    assert s.position_after(5) == (2, 1)
    again = iter(D.ResumableBatchSampler(10, 4, seed=0, start=s.position_after(3)))
    assert next(again) == first[3]
    r0 = next(iter(D.ResumableBatchSampler(10, 4, 0, rank=0, world=2)))
    r1 = next(iter(D.ResumableBatchSampler(10, 4, 0, rank=1, world=2)))
    assert r0 + r1 == first[0]


def _need(path):
    if not path.exists():
        reason = f"real face data not found at {path} (set FASTMIX_DATA to the folder of DATA.md)"
        print(reason)
        pytest.skip(reason)


def test_orl_loader_real():
    _need(D.data_root() / "orl_faces")
    from training.config import load_config

    b = D.load_data(load_config(overrides={"data": {"kind": "orl", "crop": 92}}))
    assert b.num_classes == 40 and len(b.train) == 240 and b.channels == 1
    assert len(b.val.probe) == 40 and len(b.tests[0].probe) == 120
    assert b.train.images.shape[1:] == (1, 112, 112)
    tr, te = set(b.train.names), set(b.tests[0].probe.names) | set(b.val.probe.names)
    assert not tr & te  # held-out images


def test_lfw_split_is_identity_disjoint_real():
    _need(D.data_root() / "lfw")
    from training.config import load_config

    cfg = load_config(overrides={"data": {"kind": "lfw", "min_images": 40, "max_identities": 3, "val_identities": 2,
                                          "val_pairs": 20, "crop": 128}})
    b = D.load_data(cfg)
    test_names = {n for a, _, c, _, _ in D.parse_pairs(D.data_root() / "lfw_pairsDevTest.txt") for n in (a, c)}
    train_names = {D.Path(n).parent.name for n in b.train.names}
    assert len(train_names) == 3 and not train_names & test_names
    t = b.tests[0]
    assert t.name == "lfw_pairsDevTest" and len(t.issame) == 1000 and t.issame.sum() == 500
    assert t.images.shape == (2000, 1, 112, 112)


def test_shipped_gpu_config_runs_scaled_down_on_a_pack(tmp_path):
    """training/configs/ms1m_gpu.yaml as shipped (RecordIO + .bin sets, rgb, upsample 8 -> 189 channels at
    112x112, IResNet, ArcFace, per-sample adaptive k with global-batch partners, bf16 AMP), only scaled down
    to run on the CPU: 2 steps, a narrow IResNet-18, bf16 autocast on the CPU (train.amp_cpu)."""
    from training.config import load_config, project_root

    imgs, labels = _faces(4, 4)
    pack = tmp_path / "pack"
    pack.mkdir()
    D.write_recordio_pack(pack / "train", [(_encode(im), int(y)) for im, y in zip(imgs, labels)])
    for name in ("lfw", "cfp_fp", "agedb_30", "cfp_ff"):
        pairs = [_encode(imgs[i]) for i in range(8)]
        D.write_bin(pack / f"{name}.bin", pairs, [bool(labels[2 * p] == labels[2 * p + 1]) for p in range(4)])
    cfg = load_config(project_root() / "training" / "configs" / "ms1m_gpu.yaml", sets=[
        f"data.root={pack}", f"out_dir={tmp_path / 'run'}", "data.num_workers=0", "data.val_pairs=4",
        "model.arch=iresnet18", "model.width=0.125", "model.embedding=32", "train.steps=2", "train.batch_size=4",
        "train.device=cpu", "train.amp_cpu=true", "train.progress=false", "train.threads=1", "eval.batch_size=8",
        "policy.update_every=1"])
    assert cfg["defence"]["upsample"] == 8 and cfg["train"]["amp"] == "bf16" and cfg["defence"]["global_partners"]
    res = train(cfg, resume=False)
    assert res["steps"] == 2 and res["input"] == [189, 112] and res["defence"] == "adaptive"
    assert sum(res["k_hist"].values()) == 2 * 4 and set(map(int, res["k_hist"])) <= {2, 3, 4, 5, 6}
    assert [t["set"] for t in res["tests"]] == ["lfw", "cfp_fp", "agedb_30"]
    assert cfg["data"]["val_bin"] == "cfp_ff.bin"  # the policy's validation pairs: a set not reported
    assert all(0.0 <= t["accuracy"] <= 1.0 for t in res["tests"])


def test_recordio_validation_is_never_a_reported_test_set(tmp_path, tiny):
    """The policy steers k by its validation accuracy, so the validation pairs must not be a reported test set
    (they were the first .bin set's pairs, reported in full as that set). Without data.val_bin there is no
    validation: the policy's accuracy term is off (warned), not fed an accuracy of 0 (which drove k to its
    smallest choice)."""
    from training.config import load_config

    imgs, labels = _faces(4, 4)
    pack = tmp_path / "pack"
    pack.mkdir()
    D.write_recordio_pack(pack / "train", [(_encode(im), int(y)) for im, y in zip(imgs, labels)])
    for name in ("lfw", "cfp_ff"):
        D.write_bin(pack / f"{name}.bin", [_encode(imgs[i]) for i in range(8)],
                    [bool(labels[2 * p] == labels[2 * p + 1]) for p in range(4)])
    over = {"data.kind": "recordio", "data.root": str(pack), "data.color": "rgb", "data.bin_sets": ["lfw.bin"],
            "train.steps": 4, "train.eval_every": 2, "train.batch_size": 8, "data.num_workers": 0}

    with pytest.warns(UserWarning, match="without a validation set"):
        train(tiny(tmp_path / "noval", **over), resume=False)
    ck = torch.load(tmp_path / "noval" / "ckpt.pt", weights_only=False)
    assert int(ck["policy"]["val_seen"]) == 0 and float(ck["policy"]["lam"]) == tiny("x")["policy"]["penalty"]

    res = train(tiny(tmp_path / "val", **over, **{"data.val_bin": "cfp_ff.bin", "data.val_pairs": 3}), resume=False)
    ck = torch.load(tmp_path / "val" / "ckpt.pt", weights_only=False)
    assert int(ck["policy"]["val_seen"]) >= 1 and [t["set"] for t in res["tests"]] == ["lfw"]
    vals = [line for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in line]
    assert vals and all('"pairs": 3' in line for line in vals)

    with pytest.raises(ValueError, match="data.val_bin.*must not be one of data.bin_sets"):
        load_config(sets=["data.kind=recordio", f"data.root={pack}", "data.bin_sets=[lfw.bin]", "data.val_bin=lfw.bin"])
    with pytest.raises(ValueError, match="data.val_bin.*recordio only"):
        load_config(sets=["data.val_bin=cfp_ff.bin"])
