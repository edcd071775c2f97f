"""Loaders: a RecordIO pack and a .bin set written here, ImageFolder with corrupt files, real ORL / LFW
(skipped with the reason when ../shared/data is absent)."""
from __future__ import annotations

import io
import struct

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
    with pytest.raises(FileNotFoundError, match=r"holds no images: expected <root>/<identity>/<image>"):
        D.scan_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.scan_image_folder(tmp_path / "missing")


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
