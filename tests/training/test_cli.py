"""The one-command entry point and the shipped configs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from training import train as cli
from training.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg["name"] == path.stem and cfg["defence"]["name"] in ("adaptive", "hybrid", "none")


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {stepz: 3}\n")
    with pytest.raises(KeyError, match="train.stepz"):
        load_config(p)
    with pytest.raises(KeyError):
        load_config(sets=["nope.x=1"])
    assert load_config(sets=["train.steps=7", "defence.k_choices=[2,4]"])["defence"]["k_choices"] == [2, 4]


def test_config_values_take_their_defaults_type(tmp_path):
    """A value of another type than the key's default names the key (it would otherwise train something else:
    int(1.5) is a seed of 1); ints pass for floats, and YAML 1.1's string "5e-4" is read as the float."""
    with pytest.raises(TypeError, match=r"'defence.k' must be int, got 'abc'"):
        load_config(sets=["defence.k=abc"])
    with pytest.raises(TypeError, match=r"'seed' must be int, got 1.5"):
        load_config(sets=["seed=1.5"])
    with pytest.raises(TypeError, match=r"'train.amp_cpu' must be bool"):
        load_config(sets=["train.amp_cpu=1"])
    with pytest.raises(TypeError, match=r"'defence.k_choices' must be list"):
        load_config(sets=["defence.k_choices=3"])
    with pytest.raises(TypeError, match=r"'train.threads' must be int, got 'two'"):  # a None default: optional
        load_config(sets=["train.threads=two"])
    assert load_config(sets=["train.threads=2", "data.crop=null"])["train"]["threads"] == 2
    p = tmp_path / "c.yaml"
    p.write_text("train: {weight_decay: 5e-4, lr: 1}\ndefence: {keep: [1, 2, 3]}\n")
    cfg = load_config(p)
    assert cfg["train"]["weight_decay"] == 5e-4 and cfg["train"]["lr"] == 1
    assert cfg["defence"]["keep"] == [1, 2, 3]


@pytest.mark.parametrize("setting,msg", [
    ("train.steps=0", "'train.steps' must be >= 1"),
    ("train.log_every=0", "'train.log_every' must be >= 1"),  # a modulo by zero in the loop before
    ("policy.update_every=0", "'policy.update_every' must be >= 1"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1"),
    ("train.schedule=step", "'train.schedule' must be one of"),  # silently cosine before
    ("train.device=tpu", "'train.device' must be one of"),  # silently the CPU before
    ("defence.k_choices=[1,7]", "'defence.k_choices' must list distinct ints in 1..6"),
    ("defence.k_choices=[]", "'defence.k_choices'"),
    ("defence.k_choices=[2,2]", "'defence.k_choices'"),
    ("eval.folds=1", "'eval.folds' must be >= 2"),
    ("eval.far=2", "'eval.far' must be in [0, 1]"),
    ("policy.explore=-0.1", "'policy.explore' must be in [0, 1)"),
    ("policy.explore=1.0", "'policy.explore' must be in [0, 1)"),  # the policy refused it at run time
    # choices of the modules that read them: a traceback after the data had loaded before
    ("defence.name=bogus", "'defence.name' must be one of"),
    ("model.arch=resnet", "'model.arch' must be one of"),
    ("head.type=softmax", "'head.type' must be one of"),
    ("defence.law=beta", "'defence.law' must be one of"),
    ("data.kind=csv", "'data.kind' must be one of"),
    ("data.color=bgr", "'data.color' must be one of"),
    # values that passed these checks and failed later (numpy's seed, Pillow's crop, the op's keep) or trained
    # something meaningless (a NaN learning rate, a margin of 50)
    ("seed=-1", "'seed' must be in [0, 2**31)"),
    ("seed=4294967296", "'seed' must be in [0, 2**31)"),
    ("train.lr=nan", "'train.lr' must be a finite number, got nan"),
    ("train.lr=.inf", "'train.lr' must be a finite number"),
    ("head.s=.nan", "'head.s' must be a finite number"),
    ("train.lr=0", "'train.lr' must be > 0"),
    ("train.momentum=1", "'train.momentum' must be in [0, 1)"),
    ("defence.keep=[]", "'defence.keep' must be a preset or a non-empty list of distinct channel ids in 0..63"),
    ("defence.keep=[1,1]", "'defence.keep' must be a preset or a non-empty list"),
    ("defence.keep=[64]", "channel ids in 0..63 (data.color='grey')"),
    ("defence.keep=[1.5]", "'defence.keep' must be a preset or a non-empty list"),
    ("defence.keep=everything", "'defence.keep' must be one of ('all', 'no_dc', 'partialface')"),
    ("data.crop=-5", "'data.crop' must be >= 1 pixel or null"),
    ("data.crop=0", "'data.crop' must be >= 1 pixel or null"),
    ("head.m=50", "'head.m' must be in [0, 1) for head.type='cosface'"),
    ("defence.k=0", "'defence.k' must be >= 1"),
    ("data.val_identities=-1", "'data.val_identities' must be >= 0"),
])
def test_config_values_in_range(setting, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_config(sets=[setting])


def test_config_ranges_that_depend_on_other_keys():
    with pytest.raises(ValueError, match=re.escape("'head.m' must be in [0, 1.571) for head.type='arcface'")):
        load_config(sets=["head.type=arcface", "head.m=2"])
    assert load_config(sets=["head.type=arcface", "head.m=0.5"])["head"]["m"] == 0.5
    assert load_config(sets=["data.color=rgb", "defence.keep=[0,100,191]"])["defence"]["keep"] == [0, 100, 191]
    with pytest.raises(TypeError, match="'seed' must be int, got '2\\*\\*64'"):  # YAML reads 2**64 as a string
        load_config(sets=["seed=2**64"])


def test_a_yaml_file_whose_top_level_is_not_a_mapping(tmp_path, capsys):
    """A config file written as a list ("- name: x") was an AttributeError traceback with exit 1."""
    p = tmp_path / "list.yaml"
    p.write_text("- name: x\n- train: {steps: 3}\n")
    with pytest.raises(ValueError, match=r"list.yaml must hold a mapping of keys at its top level.*got a list"):
        load_config(p)
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(p)])
    assert e.value.code == 2 and "must hold a mapping" in capsys.readouterr().err
    p.write_text("")  # an empty file is the defaults
    assert load_config(p)["name"] == "run"


def test_loop_rechecks_values_and_the_device(tmp_path, tiny):
    """train() takes dicts edited after load_config: it checks them again; a CUDA device asked for on a
    machine without one is named instead of failing inside torch.cuda."""
    from training.loop import train

    with pytest.raises(ValueError, match="'train.log_every' must be >= 1"):
        train(tiny(tmp_path / "a", **{"train.log_every": 0}), resume=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device is 'cuda' but"):
            train(tiny(tmp_path / "b", **{"train.device": "cuda"}), resume=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Config mistakes end the command with exit 2 and a message naming the key, not a traceback."""
    for argv, msg in ((["--set", "defence.k=abc"], "'defence.k' must be int"),
                      (["--set", "seed=-1"], "'seed' must be in [0, 2**31)"),
                      (["--set", "head.m=50"], "'head.m' must be in [0, 1)"),
                      (["--set", "nosuch=1"], "unknown config key 'nosuch'"),
                      (["--set", "novalue"], "--set expects key=value")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--config", str(CONFIGS[0])] + argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, tiny, capsys):
    """Re-running with a changed --set in the same out_dir must not report the old run under the new config
    (it used to: the finished checkpoint resumed, evaluated and was labelled with the new defence). Keys in
    RESUME_MAY_CHANGE (logging, threads, final evaluation) may change."""
    from training.loop import ResumeMismatch, train

    cfg = tiny(tmp_path / "out", **{"train.steps": 2})
    train(cfg, resume=False)
    other = tiny(tmp_path / "out", **{"train.steps": 2, "defence.name": "hybrid", "defence.k": 4})
    with pytest.raises(ResumeMismatch, match=r"defence.k: 3 -> 4; defence.name: 'adaptive' -> 'hybrid'"):
        train(other, resume=True)
    assert train(other, resume=False)["defence"] == "hybrid"  # starting over is fine
    same = tiny(tmp_path / "out", **{"train.steps": 2, "defence.name": "hybrid", "defence.k": 4,
                                     "train.log_every": 5, "eval.tta_flip": True})
    assert train(same, resume=True)["steps"] == 2
    # the command line turns the refusal into one line and exit 2
    del same["out_dir"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(same))
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(p), "--out", str(tmp_path / "out"), "--set", "defence.k=5"])
    assert e.value.code == 2 and "defence.k: 4 -> 5" in capsys.readouterr().err


def test_results_cli_checks_every_argument_before_training(tmp_path, capsys):
    """training.results trains many runs: a bad defence spec, config or override anywhere on its command line
    ends it with exit 2 before the first run (not after hours of earlier runs)."""
    from training import results
    from training.results import parse_defences

    assert parse_defences("none,hybrid:4,instahide:8,adaptive") == [("none", None), ("hybrid", 4), ("instahide", 8),
                                                                   ("adaptive", None)]
    for spec in ("foo", "hybrid:x", "hybrid:9", "none:3", "hybrid:0"):
        with pytest.raises(ValueError, match="--defences"):
            parse_defences(spec)
    for argv, msg in ((["--configs", str(CONFIGS[0]), "--defences", "hybrid:x"], "'hybrid:x'"),
                      (["--configs", str(CONFIGS[0]), str(tmp_path / "nope.yaml")], "nope.yaml"),
                      (["--configs", str(CONFIGS[0]), "--set", "seed=x"], "'seed' must be int"),
                      (["--summarize", str(tmp_path / "nope.json")], "--summarize: no such file")):
        with pytest.raises(SystemExit) as e:
            results.main(argv + ["--out", str(tmp_path / "r")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_cli_trains_and_evaluates(tmp_path, tiny, capsys):
    cfg = tiny(tmp_path / "out")
    del cfg["out_dir"]
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert cli.main(["--config", str(p), "--out", str(tmp_path / "out"), "--set", "train.steps=2", "--fresh"]) == 0
    out = capsys.readouterr().out
    assert "identification" in out and "mean k" in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["steps"] == 2 and res["defence"] == "adaptive"


def test_results_summary_over_seeds(tmp_path):
    from training.results import interpolate, summarize

    assert interpolate({2: 0.9, 3: 0.8, 4: 0.6}.items(), 3.5) == pytest.approx(0.7)
    assert interpolate({2: 0.9, 3: 0.8}.items(), 2.0) == pytest.approx(0.9) and interpolate({2: 0.9, 3: 0.8}.items(), 3.5) is None
    paths = []
    for seed, (a2, a4, ad, km) in enumerate([(0.9, 0.7, 0.75, 3.0), (0.8, 0.6, 0.75, 2.5)]):
        rows = [{"defence": "hybrid (k=2)", "test_accuracy": a2, "k_mean": 2.0, "k_mean_last20": 2.0},
                {"defence": "hybrid (k=4)", "test_accuracy": a4, "k_mean": 4.0, "k_mean_last20": 4.0},
                {"defence": "adaptive", "test_accuracy": ad, "k_mean": km, "k_mean_last20": km}]
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps({"tables": [{"name": "t", "base_config": {"seed": seed}, "rows": rows}]}))
        paths.append(str(p))
    data, md = summarize(paths)
    cmp = {c["seed"]: c for c in data["adaptive_vs_fixed"]}
    assert cmp[0]["fixed_curve"] == pytest.approx(0.8) and cmp[0]["difference"] == pytest.approx(-0.05)
    assert cmp[1]["fixed_curve"] == pytest.approx(0.75) and cmp[1]["difference"] == pytest.approx(0.0)
    ad = next(a for a in data["aggregate"] if a["defence"] == "adaptive")
    assert ad["test_accuracy"][0] == pytest.approx(0.75) and ad["k_mean"][0] == pytest.approx(2.75)
    assert "Mean difference -0.0250" in md
