"""The results table: accuracy per defence (and the mean k of the adaptive policy), measured, with the machine.

    python -m training.results --configs training/configs/orl_cpu.yaml --out training/results/orl_cpu
    python -m training.results --configs training/configs/lfw_cpu.yaml --defences none,hybrid:4,adaptive

Each defence of ``--defences`` (``name`` or ``name:k``) trains the config from scratch with that defence
(``defence.name=name``, ``defence.k=k``) and is evaluated on the config's test sets. The data set is
loaded once and shared. Writes <out>.md and <out>.json: per run the test accuracy (identification top-1,
or 10-fold verification accuracy and TAR@FAR), the held-out validation accuracy, the mean k over training
and over its last 20% of steps, and the wall time; with the CPU model, core count, torch version, the
load average at the start (the machine may be shared) and the total wall time. ``--reuse`` picks up runs
that finished before an interruption (same config), keeping the wall time they were measured with;
``--reuse --reeval`` evaluates their final checkpoints again (after a change to the metrics).

    python -m training.results --summarize training/results/orl_cpu.json training/results/orl_cpu_seed1.json \
        training/results/orl_cpu_seed2.json --out training/results/orl_cpu_seeds

``--summarize`` trains nothing: it reads tables written by earlier invocations (one seed each) and writes the
mean and spread per defence over the seeds, and per seed the adaptive run's accuracy against the fixed-k
curve of the same seed at the same mean k (linear interpolation between the neighbouring k).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import CONFIG_ERRORS, error_text, load_config
from .data import load_data
from .loop import train
from .train import RUN_ERRORS

DEFAULT_DEFENCES = "none,freq,ppfr,partialface,dctdp,instahide:3,hybrid:2,hybrid:3,hybrid:4,hybrid:5,hybrid:6,adaptive"


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "load_avg_start": os.getloadavg(),
    }


def parse_defences(spec: str) -> list[tuple[str, int | None]]:
    """``name`` or ``name:k`` items, checked before anything trains (ValueError naming the item)."""
    from .defences import NAMES

    out = []
    for item in spec.split(","):
        name, colon, k = item.strip().partition(":")
        if name not in NAMES:
            raise ValueError(f"--defences: unknown defence {name!r} in {spec!r}; choose from {', '.join(NAMES)}")
        if colon:
            top = {"hybrid": 6, "instahide": None}  # build_defence's bound on the hybrid mask's k
            if name not in top or not k.isdigit() or int(k) < 1 or (top[name] and int(k) > top[name]):
                raise ValueError(f"--defences: {item.strip()!r}: name:k takes hybrid (k in 1..6) or instahide (k >= 1)")
        out.append((name, int(k) if colon else None))
    return out


def label(name, k):
    return f"{name} (k={k})" if k else name


def run_table(config: str, defences, sets, out_root: Path, curves_prefix: Path | None = None, reuse: bool = False,
              reeval: bool = False) -> dict:
    base = load_config(config, sets)
    base["train"]["progress"] = False
    data = load_data(base)
    rows = []
    for name, k in defences:
        cfg = copy.deepcopy(base)
        cfg["defence"]["name"] = name
        if k:
            cfg["defence"]["k"] = k
        tag = name + (f"_k{k}" if k else "")
        cfg["out_dir"] = str(out_root / "runs" / f"{cfg['name']}_{tag}")
        done = Path(cfg["out_dir"]) / "results.json"
        res = json.loads(done.read_text()) if reuse and done.exists() else None
        if res is not None and json.dumps(res["config"], sort_keys=True, default=str) == json.dumps(cfg, sort_keys=True, default=str):
            wall = res["wall_s"]  # measured when that run trained
            print(f"[results] reusing {done}", flush=True)
            if reeval:
                # evaluate the finished checkpoint again (the loop resumes at its last step and only evaluates);
                # the wall time stays the one measured when it trained
                res = train(cfg, resume=True, data=data)
                res["wall_s"] = wall
                done.write_text(json.dumps(res, indent=1, default=str))
        else:
            t0 = time.time()
            res = train(cfg, resume=False, data=data)
            wall = time.time() - t0
        test = res["tests"][0] if res["tests"] else {}
        row = {
            "defence": label(name, k), "test_set": test.get("set"), "task": test.get("task"),
            "test_accuracy": test.get("accuracy"), "test_accuracy_std": test.get("accuracy_std"),
            # both conventions (arcface_torch's "Accuracy" and "Accuracy-Flip"); absent from runs reused from
            # before they were reported
            "test_accuracy_plain": test.get("accuracy_plain"), "test_accuracy_flip": test.get("accuracy_flip"),
            "pairs_note": test.get("pairs_note"),
            "tar_at_far": test.get("tar_at_far"), "far": test.get("far"),
            "val_accuracy": res["val_accuracy"], "k_mean": res["k_mean"], "k_mean_last20": res["k_mean_last20"],
            "k_hist_last20": res["k_hist_last20"], "wall_s": wall, "steps": res["steps"], "input": res["input"],
        }
        if "policy_probs_final" in res:
            row["policy_probs_final"] = res["policy_probs_final"]
            row["k_choices"] = res["k_choices"]
        rows.append(row)
        png = Path(cfg["out_dir"]) / "metrics.png"
        if curves_prefix is not None and name == "adaptive" and png.exists():
            # the adaptive run's curves (loss, held-out accuracy, mean k, k distribution) beside the table
            # named after the output (orl_cpu_seed1_adaptive_curves.png), and the config when they differ
            stem = curves_prefix.name if curves_prefix.name.startswith(cfg["name"]) else f"{curves_prefix.name}_{cfg['name']}"
            shutil.copyfile(png, curves_prefix.parent / f"{stem}_{tag}_curves.png")
        print(f"[results] {cfg['name']} {label(name, k)}: test {row['test_accuracy']:.4f}, k {row['k_mean_last20']:.2f}, {wall:.0f} s", flush=True)
    return {"config": config, "overrides": sets, "name": base["name"], "data": data.info, "rows": rows, "base_config": base}


def to_markdown(tables: list[dict], info: dict) -> str:
    m = info["machine"]
    lines = [
        "# fastmix training results",
        "",
        f"Measured by `{info['command']}` on {info['date']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), torch {m['torch']}, "
        f"Python {m['python']}; load average at the start of this invocation {', '.join(f'{v:.1f}' for v in m['load_avg_start'])} "
        "(a shared machine: wall times include other users' load). Training + evaluation wall time summed over "
        f"the runs: {sum(r['wall_s'] for t in tables for r in t['rows']) / 60:.1f} min (this invocation: "
        f"{info['wall_s'] / 60:.1f} min).",
        "",
    ]
    for t in tables:
        b = t["base_config"]
        lines += [
            f"## {t['name']} ({t['config']})",
            "",
            f"Data: {json.dumps(t['data'])}. Backbone {b['model']['arch']}, {b['head']['type']} head, "
            f"{b['train']['steps']} steps of batch {b['train']['batch_size']}, defence upsample {b['defence']['upsample']}, "
            f"data colour {b['data']['color']}.",
            "",
        ]
        verif = any(r["task"] == "verification" for r in t["rows"])
        flip = bool(b["eval"]["tta_flip"])
        hdr = (f"| defence | input | test accuracy ({'flip TTA' if flip else 'plain'}) | "
               f"{'plain' if flip else 'flip TTA'} | " + ("TAR@FAR=1e-3 | " if verif else "")
               + "val accuracy | mean k (all / last 20%) | wall s |")
        lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for r in t["rows"]:
            acc = f"{r['test_accuracy']:.4f}" + (f" ± {r['test_accuracy_std']:.4f}" if r["task"] == "verification" else "")
            other = r.get("test_accuracy_plain" if flip else "test_accuracy_flip")
            other = "-" if other is None else f"{other:.4f}"
            tar = f"{r['tar_at_far']:.4f} | " if verif else ""
            lines.append(
                f"| {r['defence']} | {r['input'][0]}x{r['input'][1]}x{r['input'][1]} | {acc} | {other} | {tar}{r['val_accuracy']:.4f} | "
                f"{r['k_mean']:.2f} / {r['k_mean_last20']:.2f} | {r['wall_s']:.0f} |"
            )
        task = t["rows"][0]["task"] if t["rows"] else "?"
        lines += ["", f"Test task: {task} on `{t['rows'][0]['test_set'] if t['rows'] else '?'}`. Flip TTA: the embeddings "
                  "of a face and its mirror image summed (arcface_torch's \"Accuracy-Flip\"); plain: the face alone "
                  "(its \"Accuracy\"); eval.tta_flip picks the first accuracy column."]
        notes = sorted({r["pairs_note"] for r in t["rows"] if r.get("pairs_note")})
        lines += [f"Pairs: {n}." for n in notes]
        for r in t["rows"]:
            if "policy_probs_final" in r:
                lines.append(f"Adaptive policy: final pi(k) over k={r['k_choices']}: {r['policy_probs_final']}; "
                             f"k histogram over the last 20% of steps: {r['k_hist_last20']}.")
        lines.append("")
    return "\n".join(lines)


def interpolate(points, x: float) -> float | None:
    """Piecewise-linear y(x) through ``points`` [(x, y), ...] (any order); None outside their x range.
    Used for the fixed-k curves: accuracy at a fractional k here, identity leak at an accuracy in
    training/privacy/report.py."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if len(pts) == 1 and pts[0][0] == x else None


def summarize(paths: list[str], out: str | None = None) -> tuple[dict, str]:
    """Mean / std per defence over the tables in ``paths`` (one seed each), and the adaptive-vs-curve test;
    ``out`` (the --out given) completes the command quoted in the table."""
    import statistics

    per: dict[str, list] = {}
    seeds, cmp_rows, names = [], [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        for t in d["tables"]:
            names.add(t["name"])
            seed = int(t["base_config"]["seed"])
            seeds.append(seed)
            fixed, ad = {}, None
            for r in t["rows"]:
                per.setdefault(r["defence"], []).append((seed, r))
                if r["defence"].startswith("hybrid (k="):
                    fixed[int(r["defence"][10:-1])] = r["test_accuracy"]
                if r["defence"] == "adaptive":
                    ad = r
            if ad is not None:
                ref = interpolate(fixed.items(), ad["k_mean"])
                cmp_rows.append({"seed": seed, "adaptive": ad["test_accuracy"], "k_mean": ad["k_mean"],
                                 "k_mean_last20": ad["k_mean_last20"], "fixed_curve": ref,
                                 "difference": None if ref is None else ad["test_accuracy"] - ref})

    def ms(v):
        return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)

    agg = []
    for name, runs in per.items():
        acc = [r["test_accuracy"] for _, r in runs]
        km = [r["k_mean"] for _, r in runs]
        agg.append({"defence": name, "seeds": [s for s, _ in runs], "test_accuracy": ms(acc), "k_mean": ms(km),
                    "k_mean_last20": ms([r["k_mean_last20"] for _, r in runs])})
    lines = [f"# {', '.join(sorted(names))}: test accuracy over seeds {sorted(set(seeds))}", "",
             f"Summarised by `python -m training.results --summarize {' '.join(paths)}{f' --out {out}' if out else ''}` "
             "from the tables of those runs "
             "(each file names the command, machine and date it was measured with).", "",
             "| defence | seeds | test accuracy (mean ± std) | mean k (all) | mean k (last 20%) |", "|---|---|---|---|---|"]
    for a in agg:
        lines.append(f"| {a['defence']} | {len(a['seeds'])} | {a['test_accuracy'][0]:.4f} ± {a['test_accuracy'][1]:.4f} | "
                     f"{a['k_mean'][0]:.2f} ± {a['k_mean'][1]:.2f} | {a['k_mean_last20'][0]:.2f} ± {a['k_mean_last20'][1]:.2f} |")
    if cmp_rows:
        lines += ["", "Adaptive against the fixed-k curve of the same seed, at the adaptive run's mean k over training "
                  "(linear interpolation between the neighbouring fixed k):", "",
                  "| seed | adaptive accuracy | its mean k (all / last 20%) | fixed-k curve there | difference |", "|---|---|---|---|---|"]
        for c in cmp_rows:
            ref = "-" if c["fixed_curve"] is None else f"{c['fixed_curve']:.4f}"
            dif = "-" if c["difference"] is None else f"{c['difference']:+.4f}"
            lines.append(f"| {c['seed']} | {c['adaptive']:.4f} | {c['k_mean']:.2f} / {c['k_mean_last20']:.2f} | {ref} | {dif} |")
        difs = [c["difference"] for c in cmp_rows if c["difference"] is not None]
        if difs:
            m, sd = ms(difs)
            lines += ["", f"Mean difference {m:+.4f} ± {sd:.4f} over {len(difs)} seeds."]
    return {"paths": paths, "aggregate": agg, "adaptive_vs_fixed": cmp_rows}, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.results", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+")
    ap.add_argument("--summarize", nargs="+", metavar="TABLE.json", help="summarise earlier tables over seeds (trains nothing)")
    ap.add_argument("--defences", default=DEFAULT_DEFENCES, help=f"comma-separated name or name:k (default {DEFAULT_DEFENCES})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--out", default="training/results/results",
                    help="output path without extension (.md and .json, curves beside them); each run's own folder "
                         "(checkpoint, metrics) goes to out/<basename of --out>/runs/ under the current directory")
    ap.add_argument("--reuse", action="store_true", help="reuse a run whose results.json exists with the same config (an interrupted table)")
    ap.add_argument("--reeval", action="store_true", help="with --reuse: evaluate the reused runs' final checkpoints again")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        missing = [p for p in args.summarize if not Path(p).is_file()]
        if missing:
            ap.error(f"--summarize: no such file(s): {', '.join(missing)}")
        data, md = summarize(args.summarize, args.out)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(md)
        print(md)
        return 0
    if not args.configs:
        ap.error("--configs is required (or --summarize)")
    info = {"command": "python -m training.results " + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    try:  # every argument checked before the first run trains (a later mistake must not waste the earlier runs)
        defences = parse_defences(args.defences)
        for c in args.configs:
            load_config(c, args.set)
    except CONFIG_ERRORS as e:
        ap.error(error_text(e))
    t0 = time.time()
    try:
        tables = [run_table(c, defences, args.set, Path("out") / out.name, out.parent / out.name, args.reuse, args.reeval)
                  for c in args.configs]
    except RUN_ERRORS as e:  # a folder without faces, a damaged checkpoint of a reused run, a full disk
        ap.error(str(e))
    info["wall_s"] = time.time() - t0
    out.with_suffix(".json").write_text(json.dumps({**info, "tables": tables}, indent=1, default=str))
    out.with_suffix(".md").write_text(to_markdown(tables, info))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
