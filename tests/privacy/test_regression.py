"""On real faces (ORL): the attack works (no defence: the U-Net recovers faces) and the defence works
(hybrid mask, k = 6, signs on: it does not), with a fixed seed and a margin measured to hold."""
from __future__ import annotations

import time

import pytest
import torch

from training.data import to_float
from training.privacy import attacks as A
from training.privacy import metrics as M
from training.privacy.data import orl_split

from conftest import defence_for, work_with_judges


def _s1_ssim(split, name, **over) -> float:
    d = defence_for(name, **over)
    dec = A.train_decoder(d, split.attacker.images, steps=60, batch=16, width=8, seed=0)
    _, rec, tg = A.reconstruct(dec, split.victim_train.images[:40], seed=0)
    return float(M.ssim(rec, to_float(split.victim_train.images[:40][tg])).mean())


def test_reconstruction_ssim_no_defence_far_above_hybrid_k6_with_signs(orl_root):
    t = time.time()
    split = orl_split(0, root=orl_root)
    plain = _s1_ssim(split, "none")
    hybrid = _s1_ssim(split, "hybrid", k=6, sign_flip=True)
    print(f"S1 SSIM: no defence {plain:.3f}, hybrid k=6 + signs {hybrid:.3f} ({time.time() - t:.0f} s)")
    # measured with this seed: about 0.69 vs 0.2 (60 decoder steps); the bounds leave room for BLAS noise
    assert plain > 0.55, "the U-Net attack no longer recovers undefended faces"
    assert plain - hybrid > 0.25, "the hybrid mask no longer stops the U-Net attack"


def test_split_is_identity_disjoint(orl_root):
    s = orl_split(1, root=orl_root)
    assert not set(s.info["victims"]) & set(s.info["attackers"])
    assert s.info["victim_train"] == 120 and s.info["attacker_images"] == 200
    assert s.victim_train.images.shape[1:] == (1, 56, 56)


def test_pipeline_and_cli_smoke(orl_root, tmp_path, smoke_judges):
    """The whole command on a smoke budget (a few steps of everything) writes every report file."""
    from training.privacy.__main__ import main

    work = work_with_judges(tmp_path, smoke_judges)
    assert main(["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--defences", "none,instahide,hybrid_k2,hybrid_k3,adaptive",
                 "--out", str(tmp_path / "res"), "--work", str(work)]) == 0
    d = tmp_path / "res" / "orl"
    for f in ("table.md", "table.json", "frontier.png", "grid.png"):
        assert (d / f).stat().st_size > 0, f
    html = (tmp_path / "res" / "report.html").read_text()
    assert "frontier.png" in html and "grid.png" in html and "S5" in html
    import json

    t = json.loads((d / "table.json").read_text())
    rows = {a["defence"]: a for a in t["aggregate"]}
    assert set(rows) == {"none", "instahide", "hybrid_k2", "hybrid_k3", "adaptive"}
    assert rows["instahide"]["scenarios"]["S2"].get("same_as") is None  # signs: S2 is its own attack
    assert rows["none"]["scenarios"]["S2"]["same_as"] == "S1"
    for a in rows.values():
        assert 0 <= a["score_pp"] <= 1 and 0 <= a["score_cls"][0] <= 1 and 0 <= a["tradeoff"] <= 1
        leak = a["identity_leak"]
        assert leak["lo"] <= leak["mean"] <= leak["hi"]
        assert set(a["scenarios"]) == {"S1", "S2", "S3", "S4", "S5"}
    s5 = rows["hybrid_k2"]["scenarios"]["S5"]
    assert s5["method"] == "linear_unmixing" and "recovered@0.9" in s5["blind"] and "recovered@0.9" in s5["informed"]
    assert rows["instahide"]["scenarios"]["S5"]["method"] == "sign_clusters"
    run = t["runs"][0]
    assert {"judge", "judge2"} <= set(run["info"]["judges"])
    assert len(run["rows"][0]["scenarios"]["S1"]["per_victim"]) == run["info"]["victims"]
    assert "verdict" in t["claim"]

    # --rescore re-grades from the stored attacked images: with the same judges, the same numbers
    before = json.loads((work / "orl_s0" / "run.json").read_text())
    assert main(["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--defences", "none,instahide,hybrid_k2,hybrid_k3,adaptive",
                 "--out", str(tmp_path / "res"), "--work", str(work), "--reuse", "--rescore"]) == 0
    after = json.loads((work / "orl_s0" / "run.json").read_text())
    assert after["info"]["rescored"]["judges"]
    for rb, ra in zip(before["rows"], after["rows"]):
        assert ra["identity_leak"] == pytest.approx(rb["identity_leak"], abs=1e-6), rb["defence"]
        for sc in rb["scenarios"]:
            assert ra["scenarios"][sc]["per_victim"] == pytest.approx(rb["scenarios"][sc]["per_victim"], abs=1e-6), (rb["defence"], sc)
    # a run made before images were stored cannot be re-graded: exit 2 naming what to do
    (work / "orl_s0" / "rows" / "none.attacked.pt").unlink()
    assert main(["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--defences", "none,instahide,hybrid_k2,hybrid_k3,adaptive",
                 "--out", str(tmp_path / "res"), "--work", str(work), "--reuse", "--rescore"]) == 2


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    """Unknown defence labels or scenarios, and negative seeds, end the command before any work with exit 2
    naming the option (an unknown label used to match nothing, and nothing meant every defence)."""
    from training.privacy.__main__ import main

    for argv, msg in ((["--defences", "foo"], "--defences: unknown label(s) ['foo']"),
                      (["--defences", "none,hybrid_k9"], "['hybrid_k9']"),
                      (["--scenarios", "S1,S9"], "--scenarios: expected a comma-separated subset"),
                      (["--seeds", "-1"], "--seeds: each seed must be in")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "res"), "--work", str(tmp_path / "work")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


def test_cli_one_defence_one_scenario_and_reuse(orl_root, tmp_path, capsys, smoke_judges):
    """A single defence (the image grid has one row) and scenarios without S1 (S2 then runs its own attack)
    make a report; --reuse takes a saved run only for the same request."""
    from training.privacy.__main__ import main

    common = ["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--out", str(tmp_path / "res"),
              "--work", str(work_with_judges(tmp_path, smoke_judges))]
    assert main(common + ["--defences", "hybrid_k2", "--scenarios", "S2,S3"]) == 0
    import json

    t = json.loads((tmp_path / "res" / "orl" / "table.json").read_text())
    assert set(t["runs"][0]["rows"][0]["scenarios"]) == {"S2", "S3"}
    assert (tmp_path / "res" / "orl" / "grid.png").stat().st_size > 0
    capsys.readouterr()
    assert main(common + ["--defences", "hybrid_k2", "--scenarios", "S2,S3", "--reuse"]) == 0
    assert "[privacy] reusing" in capsys.readouterr().out
    assert main(common + ["--defences", "hybrid_k2", "--scenarios", "S3", "--reuse"]) == 0
    assert "not reusing" in capsys.readouterr().out
    t = json.loads((tmp_path / "res" / "orl" / "table.json").read_text())
    assert set(t["runs"][0]["rows"][0]["scenarios"]) == {"S3"}


def test_cli_stopped_training_says_how_to_resume(orl_root, tmp_path, capsys, smoke_judges, monkeypatch):
    """Ctrl-C / SIGTERM while a target trains (the loop returns stopped_early): exit 130 with a line naming
    --reuse and the kept defences, not a KeyError traceback; the rerun with --reuse keeps the finished ones."""
    from training.privacy import run as R
    from training.privacy.__main__ import main

    common = ["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--out", str(tmp_path / "res"),
              "--work", str(work_with_judges(tmp_path, smoke_judges)), "--defences", "none,hybrid_k2",
              "--scenarios", "S1", "--reuse"]
    real = R.train

    def stop_at_second(cfg, **kw):
        if cfg["name"].startswith("privacy_orl_hybrid_k2"):
            return {"step": 3, "stopped_early": True}
        return real(cfg, **kw)

    monkeypatch.setattr(R, "train", stop_at_second)
    capsys.readouterr()
    assert main(common) == 130
    err = capsys.readouterr().err
    assert "stopped while training 'hybrid_k2'" in err and "--reuse" in err, err
    monkeypatch.setattr(R, "train", real)
    assert main(common) == 0
    assert "[privacy] none: reusing" in capsys.readouterr().out


def test_cli_jobs_runs_seeds_in_worker_processes(orl_root, tmp_path, smoke_judges):
    """--jobs 2: two (set, seed) runs in spawned worker processes, the report from both; the same per-victim
    numbers as the serial command (each run is seeded by its own seed, not by its process)."""
    import json

    from training.privacy.__main__ import main

    work = work_with_judges(tmp_path, smoke_judges)
    common = ["--budget", "smoke", "--sets", "orl", "--defences", "none", "--scenarios", "S1", "--out", str(tmp_path / "res")]
    assert main(common + ["--seeds", "0", "1", "--jobs", "2", "--work", str(work)]) == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["jobs"] == 2 and summary["command_elapsed_s"] > 0
    # the paired judge criterion's verdict counts, per judge pair: one defence, one scenario
    counts = summary["sets"]["orl"]["judge_agreement_paired"]["judge2"]
    assert sum(counts["worst"].values()) == 1 and sum(counts["cells"].values()) == 1
    t = json.loads((tmp_path / "res" / "orl" / "table.json").read_text())
    assert [r["info"]["seed"] for r in t["runs"]] == [0, 1]
    serial = work_with_judges(tmp_path / "serial", smoke_judges)
    assert main(common + ["--seeds", "1", "--work", str(serial)]) == 0
    a = json.loads((work / "orl_s1" / "run.json").read_text())["rows"][0]["scenarios"]["S1"]["per_victim"]
    b = json.loads((serial / "orl_s1" / "run.json").read_text())["rows"][0]["scenarios"]["S1"]["per_victim"]
    assert a == b

    # combining seeds run apart (report.combine: one table.json per seed) gives the report of the one command
    from training.privacy import report

    parts = []
    for i, r in enumerate(t["runs"]):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps({**t, "runs": [r]}))
    assert report.main([str(tmp_path / "combined" / "orl"), str(parts[1]), str(parts[0])]) == 0
    c = json.loads((tmp_path / "combined" / "orl" / "table.json").read_text())
    assert c["aggregate"] == t["aggregate"] and [r["info"]["seed"] for r in c["runs"]] == [0, 1]
    assert (tmp_path / "combined" / "orl" / "frontier.png").stat().st_size > 0
    # the same seed twice, or a run of another request, is refused with exit 2, naming the file
    assert report.main([str(tmp_path / "c2"), str(parts[0]), str(parts[0])]) == 2
    other = json.loads(parts[1].read_text())
    other["runs"][0]["info"]["budget"] = {**other["runs"][0]["info"]["budget"], "fr_steps": 999}
    parts[1].write_text(json.dumps(other))
    assert report.main([str(tmp_path / "c3"), str(parts[0]), str(parts[1])]) == 2


def test_cli_size_112_runs_at_that_geometry_and_is_judged_at_56(orl_root, tmp_path, smoke_judges):
    """--size 112 (the training layer's geometry): the target trains on 112x112 faces, its runs and report
    section carry the size, and the same 56x56 judges grade the attacked images (area-resampled)."""
    import json

    from training.privacy.__main__ import main

    work = work_with_judges(tmp_path, smoke_judges)
    assert main(["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--defences", "none", "--scenarios", "S1",
                 "--size", "112", "--out", str(tmp_path / "res"), "--work", str(work)]) == 0
    r = json.loads((work / "orl_112_s0" / "run.json").read_text())
    assert r["info"]["size"] == 112 and r["info"]["split"]["size"] == 112
    att = torch.load(work / "orl_112_s0" / "rows" / "none.attacked.pt", weights_only=False)
    assert att["S1"]["images"].shape[-2:] == (112, 112)
    # the 56x56 judge sees a 112x112 face as its own 56x56 decode (area-resampled): about the same hits
    from training.privacy.data import get_split
    from training.privacy.judge import load_judge
    from training.privacy.run import _AtJudgeSize

    s56, s112 = get_split("orl", 0, 56), get_split("orl", 0, 112)
    j = load_judge(s56, "cnn", "smoke", 0, work, log=lambda *_: None).enroll(s56.victim_test.images, s56.victim_test.labels)
    h56 = j.hits(s56.victim_train.images, s56.victim_train.labels).mean()
    h112 = _AtJudgeSize(j).hits(s112.victim_train.images, s112.victim_train.labels).mean()
    assert abs(float(h56 - h112)) <= 0.1, (h56, h112)
    assert (tmp_path / "res" / "orl_112" / "table.md").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--size", "60", "--out", str(tmp_path / "res"), "--work", str(work)])
    assert e.value.code == 2


def test_cli_variant_meets_the_adapted_stream_attack(orl_root, tmp_path, smoke_judges, capsys):
    """An issue-15 variant named in --defences (per-frequency weights) runs through the same pipeline, and S5
    meets it with its adaptation (stream.adapted_attacks) besides the standard attack."""
    import json

    from training.privacy.__main__ import main

    work = work_with_judges(tmp_path, smoke_judges)
    assert main(["--budget", "smoke", "--sets", "orl", "--seeds", "0", "--defences", "freqw_k2", "--scenarios", "S5",
                 "--out", str(tmp_path / "res"), "--work", str(work)]) == 0
    assert "S5 adapted to mix_weights" in capsys.readouterr().out
    row = json.loads((work / "orl_s0" / "run.json").read_text())["rows"][0]
    assert row["defence"] == "freqw_k2" and row["config"]["mix_weights"] == "frequency"
    assert {"recovered@0.9", "per_victim"} <= set(row["scenarios"]["S5"]["informed"])


def test_lfw_split_is_identity_disjoint():
    from training.data import data_root
    from training.privacy.data import lfw_split

    root = data_root() / "lfw"
    if not root.is_dir():
        import pytest

        pytest.skip(f"LFW not found at {root} (set FASTMIX_DATA or provide ../shared/data, see DATA.md)")
    s = lfw_split(0, victims=5, per_victim=10, attacker_images=30, root=root)
    assert s.num_victims == 5 and s.info["victim_train"] == 30 and s.info["attacker_images"] >= 30
    vic = {n.split("/")[-2] for n in s.victim_train.names}
    att = {n.split("/")[-2] for n in s.attacker.names}
    assert vic and att and not vic & att


def _folder_of_orl(orl_root, dest, people: int, fmt: str = "GIF"):
    """A user's face folder: ORL people re-saved as another format, one sub-folder per identity."""
    from PIL import Image

    for d in sorted(p for p in orl_root.iterdir() if p.is_dir())[:people]:
        (dest / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir()):
            Image.open(f).save(dest / d.name / (f.stem + "." + fmt.lower()), fmt)
    return dest


def test_cli_on_a_users_image_folder(orl_root, tmp_path):
    """--sets folder:PATH runs the same splits, attacks and report on a folder of GIFs; a folder too small to
    split is one line on stderr and exit 2."""
    import json

    from training.privacy.__main__ import main

    folder = _folder_of_orl(orl_root, tmp_path / "my faces", 12)
    out = tmp_path / "res"
    assert main(["--budget", "smoke", "--sets", f"folder:{folder}", "--seeds", "0", "--defences", "none,hybrid_k2",
                 "--scenarios", "S1,S5", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    t = json.loads((out / "folder_my_faces" / "table.json").read_text())
    run = t["runs"][0]
    assert run["info"]["victims"] >= 2 and {r["defence"] for r in run["rows"]} == {"none", "hybrid_k2"}
    assert set(run["rows"][1]["scenarios"]) == {"S1", "S5"}
    small = _folder_of_orl(orl_root, tmp_path / "tiny", 2, "PNG")
    assert main(["--budget", "smoke", "--sets", f"folder:{small}", "--seeds", "0", "--out", str(out),
                 "--work", str(tmp_path / "work")]) == 2


def test_report_combine_refuses_files_that_are_not_tables(tmp_path, capsys):
    """python -m training.privacy.report on a file that is not a report's table.json (another JSON, a missing
    file): exit 2 with one line naming the file, not a traceback."""
    import json

    from training.privacy import report

    (tmp_path / "runs.json").write_text(json.dumps({"runs": [{"rows": []}]}))
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, msg in (("runs.json", "not a privacy report's table.json"), ("list.json", "no runs in this file"),
                      ("missing.json", "No such file")):
        assert report.main([str(tmp_path / "out" / "orl"), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert name in err and msg in err, err
    assert not (tmp_path / "out").exists()
