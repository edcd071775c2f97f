"""The one-command entry point and the shipped configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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
