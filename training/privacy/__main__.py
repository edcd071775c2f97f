"""CLI: every scenario against every defence, then the report.

    python -m training.privacy                                  # ORL and LFW, seeds 0-4, full budget -> training/privacy/results/
    python -m training.privacy --sets orl --seeds 0 1           # a subset
    python -m training.privacy --sets folder:/path/to/faces     # your own faces: one sub-folder per identity
    python -m training.privacy --reuse                          # the report from out/privacy/<set>_s<seed>/run.json (runs what is missing)
    python -m training.privacy --budget smoke --sets orl --seeds 0 --out /tmp/p --work /tmp/pw   # minutes: the whole pipeline

Each (set, seed) is one run.json under --work: an interrupted evaluation resumes with --reuse, per set and seed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from training.config import project_root
from training.results import machine

from . import report
from .run import BUDGETS, DEFENCES, SCENARIOS, run


def _same_request(r: dict, defs, scenarios: tuple, budget: dict) -> bool:
    """Whether a saved run.json answers this command (its rows, scenarios and budget), so --reuse never mixes
    a report from runs of another request."""
    return ([x["defence"] for x in r["rows"]] == [d for d, _ in defs]
            and tuple(r["info"].get("scenarios", SCENARIOS)) == scenarios and r["info"]["budget"] == budget)


def _tag(name: str) -> str:
    """A file-name-safe name of a set: orl, lfw, or folder_<folder name> for folder:PATH."""
    if name.startswith("folder:"):
        return "folder_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name[7:]).expanduser().resolve().name)
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.privacy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["orl", "lfw"], help="orl, lfw and/or folder:PATH (an image folder, "
                    "one sub-folder per identity, any format Pillow reads)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", default="full", choices=sorted(BUDGETS))
    ap.add_argument("--defences", default=None, help="comma-separated labels (default: all): " + ",".join(d for d, _ in DEFENCES))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--out", default=None, help="report folder (default training/privacy/results)")
    ap.add_argument("--work", default=None, help="per-run folder (default out/privacy)")
    ap.add_argument("--reuse", action="store_true", help="reuse <work>/<set>_s<seed>/run.json where it exists, and "
                    "the finished defences of an interrupted seed (<work>/<set>_s<seed>/rows/)")
    ap.add_argument("--report-only", action="store_true", help="with --reuse: the report from the finished seeds' run.json "
                    "only (a seed without one is left out and named), running nothing")
    a = ap.parse_args(argv)
    if a.report_only and not a.reuse:
        ap.error("--report-only needs --reuse")
    for s_ in a.sets:
        if s_ not in ("orl", "lfw") and not (s_.startswith("folder:") and len(s_) > len("folder:")):
            ap.error(f"--sets: unknown set {s_!r}; use orl, lfw or folder:PATH")
        if s_.startswith("folder:") and not Path(s_[len("folder:"):]).expanduser().is_dir():
            ap.error(f"--sets: {s_!r}: {s_[len('folder:'):]} is not a folder (expected PATH/<identity>/<image>)")
    labels = [d for d, _ in DEFENCES]
    wanted = labels if not a.defences else [x.strip() for x in a.defences.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in labels]
    if unknown or not wanted:
        ap.error(f"--defences: unknown label(s) {unknown or [a.defences]}; choose from {','.join(labels)}")
    scenarios = [x.strip() for x in a.scenarios.split(",") if x.strip()]
    if not scenarios or any(x not in SCENARIOS for x in scenarios):
        ap.error(f"--scenarios: expected a comma-separated subset of {','.join(SCENARIOS)}, got {a.scenarios!r}")
    scenarios = tuple(x for x in SCENARIOS if x in scenarios)  # report order, no duplicates
    if any(not 0 <= sd < 2**32 for sd in a.seeds):
        ap.error(f"--seeds: each seed must be in [0, 2**32), got {a.seeds}")
    root = project_root()
    out = Path(a.out) if a.out else root / "training" / "privacy" / "results"
    work = Path(a.work) if a.work else root / "out" / "privacy"
    out.mkdir(parents=True, exist_ok=True)
    defs = [d for d in DEFENCES if d[0] in wanted]
    mach = machine()
    mach["torch_threads"] = 1
    tm = (Path(__file__).parent / "THREAT_MODEL.md").read_text()
    command = "python -m training.privacy " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    sections, summary = [], {"command": command, "machine": mach, "sets": {}}
    t_all = 0.0
    for s in a.sets:
        runs = []
        tag = _tag(s)
        for seed in a.seeds:
            rdir = work / f"{tag}_s{seed}"
            r = json.loads((rdir / "run.json").read_text()) if a.reuse and (rdir / "run.json").exists() else None
            if a.report_only and r is None:
                print(f"[privacy] --report-only: no {rdir / 'run.json'}; {s} seed {seed} left out of the report")
                continue
            if a.reuse and r is None:
                print(f"[privacy] --reuse: no {rdir / 'run.json'}; running {s} seed {seed}")
            if r is not None and not _same_request(r, defs, scenarios, BUDGETS[a.budget]):
                print(f"[privacy] not reusing {rdir / 'run.json'}: it ran other defences, scenarios or budget; running it again")
                r = None
            if r is not None:
                r["images"] = torch.load(rdir / "images.pt", weights_only=False)
                print(f"[privacy] reusing {rdir / 'run.json'} ({r['info']['wall_s'] / 60:.1f} min when it ran)")
            else:
                try:
                    r = run(s, seed, a.budget, rdir, defs, scenarios, work=work, resume=a.reuse)
                except ValueError as e:  # a set too small to split, unreadable folder: one line, exit 2
                    print(f"[privacy] {s}: {e}", file=sys.stderr)
                    return 2
            runs.append(r)
        if not runs:
            print(f"[privacy] {s}: no finished seed to report", file=sys.stderr)
            return 2
        wall = sum(r["info"]["wall_s"] for r in runs)
        t_all += wall
        agg = report.aggregate(runs)
        cl = report.claim(runs)
        # the machine as the first run saw it (load average at its start); runs written before that field: now
        run_mach = runs[0]["info"].get("machine", mach)
        judges = {n: {**j, "rank1": report._ms([r["info"]["judges"][n]["rank1"] for r in runs])}
                  for n, j in runs[0]["info"].get("judges", {}).items()}
        info = {"split_name": tag, "victims": runs[0]["info"].get("victims", len(runs[0]["info"]["split"]["victims"])),
                "seeds": [r["info"]["seed"] for r in runs], "machine": run_mach, "wall_s": wall, "judges": judges, "budget": runs[0]["info"]["budget"],
                "split": runs[0]["info"]["split"]}
        md = report.markdown(agg, info, cl)
        d = out / tag
        d.mkdir(exist_ok=True)
        (d / "table.md").write_text(md)
        (d / "table.json").write_text(json.dumps({"info": info, "command": command, "aggregate": agg, "claim": cl,
                                                  "runs": [{k: v for k, v in r.items() if k != "images"} for r in runs]}, indent=1, default=str))
        report.frontier_plot(agg, d / "frontier.png", f"{tag.upper()}: FR accuracy vs worst-case identity leak (seeds {info['seeds']})")
        report.image_grid(runs[0]["images"], d / "grid.png")
        sections.append((tag, md))
        summary["sets"][tag] = {"wall_s": wall, "claim": cl["verdict"], "judge_agreement": report.judge_agreement(agg)}
        print(md)
    info = {"command": command, "machine": mach, "wall_s": t_all}
    pages = [(s, md, {"frontier": f"{s}/frontier.png", "grid": f"{s}/grid.png", "json": f"{s}/table.json", "md": f"{s}/table.md"})
             for s, md in sections]
    (out / "report.html").write_text(report.html_page(pages, info, tm))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[privacy] report: {out / 'report.html'}  (total {t_all / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
