"""CLI: every scenario against every defence, then the report.

    python -m training.privacy                                  # ORL and LFW, seeds 0-4, full budget -> training/privacy/results/
    python -m training.privacy --sets orl --seeds 0 1           # a subset
    python -m training.privacy --sets folder:/path/to/faces     # your own faces: one sub-folder per identity
    python -m training.privacy --reuse                          # the report from out/privacy/<set>_s<seed>/run.json (runs what is missing)
    python -m training.privacy --budget smoke --sets orl --seeds 0 --out /tmp/p --work /tmp/pw   # minutes: the whole pipeline
    python -m training.privacy --jobs 2                         # (set, seed) runs in 2 processes (one per core)
    python -m training.privacy --reuse --rescore                # re-grade finished runs with the current judges

Each (set, seed) is one run.json under --work: an interrupted evaluation resumes with --reuse, per set and seed.
Every attacked image is stored beside it (rows/<label>.attacked.pt), so a changed judge re-grades the runs
(--rescore, seconds per run) without re-training or re-attacking anything.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

from training.config import project_root
from training.results import machine

from . import report
from .run import BUDGETS, DEFENCES, JUDGES, SCENARIOS, VARIANTS, rescore, run, run_logged


def _same_request(r: dict, defs, scenarios: tuple, budget: dict, size: int = 56) -> bool:
    """Whether a saved run.json answers this command (its rows, scenarios, budget and face size), so --reuse
    never mixes a report from runs of another request."""
    return ([x["defence"] for x in r["rows"]] == [d for d, _ in defs] and r["info"].get("size", 56) == size
            and tuple(r["info"].get("scenarios", SCENARIOS)) == scenarios and r["info"]["budget"] == budget)


def _tag(name: str, size: int = 56) -> str:
    """A file-name-safe name of a set: orl, lfw, or folder_<folder name> for folder:PATH; _<size> appended for
    faces of another size than the default 56."""
    if name.startswith("folder:"):
        name = "folder_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name[7:]).expanduser().resolve().name)
    return name if size == 56 else f"{name}_{size}"


def _pretrain_judges(todo, budget: str, work: Path) -> None:
    """Train (or find cached) every judge the runs need, once, before the worker processes start: two workers
    must not train the same judge side by side (ORL and LFW's standard seeds share one judge pool)."""
    from .data import get_split
    from .judge import load_judge

    seen = set()
    for s, seed in todo:
        split = get_split(s, seed)
        if split.judge is None or split.judge.key() in seen:
            continue
        seen.add(split.judge.key())
        for _, kind in JUDGES:
            load_judge(split, kind, budget, 0, work)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.privacy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["orl", "lfw"], help="orl, lfw and/or folder:PATH (an image folder, "
                    "one sub-folder per identity, any format Pillow reads)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", default="full", choices=sorted(BUDGETS))
    ap.add_argument("--defences", default=None, help="comma-separated labels (default: every defence of training/): " + ",".join(d for d, _ in DEFENCES)
                    + "; or the stream-option variants of issue 15 (DEFENCES.md): " + ",".join(VARIANTS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--out", default=None, help="report folder (default training/privacy/results)")
    ap.add_argument("--work", default=None, help="per-run folder (default out/privacy)")
    ap.add_argument("--reuse", action="store_true", help="reuse <work>/<set>_s<seed>/run.json where it exists, and "
                    "the finished defences of an interrupted seed (<work>/<set>_s<seed>/rows/)")
    ap.add_argument("--report-only", action="store_true", help="with --reuse: the report from the finished seeds' run.json "
                    "only (a seed without one is left out and named), running nothing")
    ap.add_argument("--size", type=int, default=56, help="face size (a multiple of 8; default 56; 112 is the training "
                    "layer's geometry): runs go to <work>/<set>_<size>_s<seed> for sizes other than 56, the report "
                    "section is <set>_<size>; the judges grade at 56 (probes area-resampled)")
    ap.add_argument("--jobs", type=int, default=1, help="run (set, seed) pairs in this many processes (one thread "
                    "each; 2 on the 2-core machine); the judges train once, first")
    ap.add_argument("--rescore", action="store_true", help="with --reuse: re-grade the finished runs with the current "
                    "judges from their stored attacked images (nothing retrained), then the report")
    a = ap.parse_args(argv)
    if a.report_only and not a.reuse:
        ap.error("--report-only needs --reuse")
    if a.rescore and not a.reuse:
        ap.error("--rescore needs --reuse (it re-grades finished runs)")
    if a.jobs < 1:
        ap.error(f"--jobs: expected a process count >= 1, got {a.jobs}")
    if a.size < 16 or a.size % 8:
        ap.error(f"--size: expected a multiple of 8 (the 8x8 block DCT) of at least 16, got {a.size}")
    for s_ in a.sets:
        if s_ not in ("orl", "lfw") and not (s_.startswith("folder:") and len(s_) > len("folder:")):
            ap.error(f"--sets: unknown set {s_!r}; use orl, lfw or folder:PATH")
        if s_.startswith("folder:") and not Path(s_[len("folder:"):]).expanduser().is_dir():
            ap.error(f"--sets: {s_!r}: {s_[len('folder:'):]} is not a folder (expected PATH/<identity>/<image>)")
    everything = DEFENCES + list(VARIANTS.items())  # the variants only when named
    labels = [d for d, _ in everything]
    wanted = [d for d, _ in DEFENCES] if not a.defences else [x.strip() for x in a.defences.split(",") if x.strip()]
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
    defs = [d for d in everything if d[0] in wanted]
    mach = machine()
    mach["torch_threads"] = 1
    tm = (Path(__file__).parent / "THREAT_MODEL.md").read_text()
    command = "python -m training.privacy " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    sections, summary = [], {"command": command, "machine": mach, "sets": {}}
    t_all = 0.0

    def rdir_of(s, seed) -> Path:
        return work / f"{_tag(s, a.size)}_s{seed}"

    def saved(s, seed):
        """The finished run.json of (set, seed) when --reuse may take it and it answers this request; None when
        there is none to take, False when it answers another request (defences, scenarios, budget, size)."""
        rdir = rdir_of(s, seed)
        if not (a.reuse and (rdir / "run.json").exists()):
            return None
        r = json.loads((rdir / "run.json").read_text())
        return r if _same_request(r, defs, scenarios, BUDGETS[a.budget], a.size) else False

    t_start = time.time()
    # Phase 1: run what is missing (serially, or in --jobs worker processes)
    todo = []
    for s in a.sets:
        for seed in a.seeds:
            r = saved(s, seed)
            if r is False:
                print(f"[privacy] not reusing {rdir_of(s, seed) / 'run.json'}: it ran other defences, "
                      f"scenarios or budget; running it again")
            if not r and not a.report_only:
                todo.append((s, seed))
    if a.reuse and todo:
        print(f"[privacy] --reuse: running {', '.join(f'{s} seed {seed}' for s, seed in todo)} (no finished run.json)")
    if a.rescore:
        for s in a.sets:
            for seed in a.seeds:
                if (s, seed) not in todo and saved(s, seed):
                    rdir = rdir_of(s, seed)
                    try:
                        rescore(rdir, s, seed, a.budget, work)
                        print(f"[privacy] re-graded {rdir / 'run.json'} with the current judges")
                    except FileNotFoundError as e:
                        print(f"[privacy] --rescore: {e}", file=sys.stderr)
                        return 2
    failed = []
    if todo and a.jobs > 1 and len(todo) > 1:
        _pretrain_judges(todo, a.budget, work)
        with ProcessPoolExecutor(max_workers=min(a.jobs, len(todo)), mp_context=get_context("spawn")) as ex:
            futs = {ex.submit(run_logged, s, _tag(s, a.size), seed, a.budget, rdir_of(s, seed), defs, scenarios, work, a.reuse, a.size):
                    (s, seed) for s, seed in todo}
            for f in as_completed(futs):
                try:
                    print(f"[privacy] {f.result()}", flush=True)
                except Exception as e:  # noqa: BLE001 -- one failed run must not lose the others; named below
                    failed.append(futs[f])
                    print(f"[privacy] {futs[f][0]} seed {futs[f][1]} failed: {type(e).__name__}: {e}", file=sys.stderr)
    else:
        for s, seed in todo:
            try:
                run(s, seed, a.budget, rdir_of(s, seed), defs, scenarios, work=work, resume=a.reuse,
                    size=a.size)
            except ValueError as e:  # a set too small to split, unreadable folder: one line, exit 2
                print(f"[privacy] {s}: {e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: what is finished is on disk; say how to go on
                print(f"[privacy] stopped: {e}" if str(e) else "[privacy] interrupted: rerun with --reuse to resume",
                      file=sys.stderr)
                return 130
    elapsed = time.time() - t_start

    # Phase 2: the report from the finished runs
    for s in a.sets:
        runs = []
        tag = _tag(s, a.size)
        for seed in a.seeds:
            rdir = rdir_of(s, seed)
            if not (rdir / "run.json").exists():
                print(f"[privacy] no {rdir / 'run.json'}; {s} seed {seed} left out of the report")
                continue
            r = json.loads((rdir / "run.json").read_text())
            if not _same_request(r, defs, scenarios, BUDGETS[a.budget], a.size):
                print(f"[privacy] {rdir / 'run.json'} answers another request; {s} seed {seed} left out of the report")
                continue
            r["images"] = torch.load(rdir / "images.pt", weights_only=False)
            if (s, seed) not in todo:
                print(f"[privacy] reusing {rdir / 'run.json'} ({r['info']['wall_s'] / 60:.1f} min when it ran)")
            runs.append(r)
        if not runs:
            print(f"[privacy] {s}: no finished seed to report", file=sys.stderr)
            return 2
        wall = sum(r["info"]["wall_s"] for r in runs)
        t_all += wall
        md, agg, cl = report.write_set(out / tag, tag, runs, command, mach)
        sections.append((tag, md))
        pja = report.paired_judge_agreement(runs)
        summary["sets"][tag] = {"wall_s": wall, "claim": cl["verdict"], "judge_agreement": report.judge_agreement(agg),
                                # the paired criterion's verdict counts (agree / differ / unresolved) per judge pair
                                "judge_agreement_paired": {n: pr["counts"] for n, pr in pja["pairs"].items()}}
        print(md)
    info = {"command": command, "machine": mach, "wall_s": t_all}
    pages = [(s, md, {"frontier": f"{s}/frontier.png", "grid": f"{s}/grid.png", "json": f"{s}/table.json", "md": f"{s}/table.md"})
             for s, md in sections]
    (out / "report.html").write_text(report.html_page(pages, info, tm))
    summary["command_elapsed_s"] = elapsed  # what this command took (runs in parallel with --jobs)
    summary["jobs"] = a.jobs
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[privacy] report: {out / 'report.html'}  (runs' total {t_all / 60:.1f} min; this command "
          f"{elapsed / 60:.1f} min with --jobs {a.jobs})")
    if failed:
        print(f"[privacy] failed runs (left out of the report): {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
