"""One command trains and evaluates from a YAML config.

    python -m training.train --config training/configs/orl_cpu.yaml
    python -m training.train --config training/configs/orl_cpu.yaml --set defence.name=hybrid --set defence.k=4 --out out/orl_hybrid4
    torchrun --nproc_per_node 8 -m training.train --config training/configs/ms1m_gpu.yaml

A run resumes from <out_dir>/ckpt.pt when it exists (``--fresh`` starts over); a checkpoint of another
config is an error (training.loop.RESUME_MAY_CHANGE lists the keys a resumed run may change). Results go to
<out_dir>/results.json, the curves to metrics.jsonl and metrics.png.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from .config import CONFIG_ERRORS, error_text, load_config
from .data import DataError
from .loop import CheckpointError, ResumeMismatch, train

# Errors of the run that the user resolves (a folder without faces, a checkpoint of another config or a damaged
# one): one line naming the setting or file and what to do, exit 2 like a config error; a full disk exit 1.
RUN_ERRORS = (DataError, ResumeMismatch, CheckpointError)


def summary(res: dict) -> str:
    lines = [f"{res['name']} / {res['defence']}: {res['steps']} steps in {res['wall_s']:.0f} s; held-out val accuracy {res['val_accuracy']:.4f}"]
    for t in res["tests"]:
        extra = f", TAR@FAR={t['far']:g}: {t['tar_at_far']:.4f}" if t["task"] == "verification" else ""
        if "accuracy_flip" in t:  # arcface_torch reports both: "Accuracy" and "Accuracy-Flip"
            extra += f" (plain {t['accuracy_plain']:.4f}, flip TTA {t['accuracy_flip']:.4f})"
        if t.get("pairs_note"):
            extra += f"; {t['pairs_note']}"
        lines.append(f"  {t['set']} ({t['task']}): accuracy {t['accuracy']:.4f}{extra}")
    lines.append(f"  mean k {res['k_mean']:.2f} (last 20% of steps: {res['k_mean_last20']:.2f}); k histogram {res['k_hist']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (training/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=50")
    ap.add_argument("--out", help="output folder (default: the config's out_dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except CONFIG_ERRORS as e:
        ap.error(error_text(e))  # exit 2 with the usage line, no traceback
    if args.out:
        cfg["out_dir"] = args.out
    try:
        res = train(cfg, resume=not args.fresh)
    except RUN_ERRORS as e:
        if isinstance(e, CheckpointError) and "no space left" in str(e):
            print(f"{ap.prog}: error: {e}", file=sys.stderr)  # not a usage error: the machine's disk
            return 1
        ap.error(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if res and "tests" in res:
        print(summary(res))
        print(json.dumps({"results": f"{cfg['out_dir']}/results.json"}))
    elif res and res.get("stopped_early"):
        print(f"stopped at step {res['step']} of {cfg['train']['steps']}; checkpoint {cfg['out_dir']}/ckpt.pt "
              "(the same command resumes from it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
