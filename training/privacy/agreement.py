"""The paired judge agreement (report.paired_judge_agreement) of finished reports, from their table.json files,
without re-running anything: ``python -m training.privacy.agreement OUT.md NAME=TABLE.json [NAME=TABLE.json ...]``
writes OUT.md (the command first, then per set the verdict counts and the per-cell table) and OUT.json beside it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import report as R


def agreement(tables: dict) -> dict:
    """{set name: table.json path} -> {set name: {"table", "seeds", "victims", "judge_agreement"}}; a ValueError
    naming a file that holds no runs."""
    out = {}
    for name, path in tables.items():
        t = json.loads(Path(path).read_text())
        if not isinstance(t, dict) or not t.get("runs"):
            raise ValueError(f"{path}: no runs in this file (expected a privacy report's <set>/table.json)")
        runs = sorted(t["runs"], key=lambda r: r["info"]["seed"])
        info = runs[0]["info"]
        out[name] = {"table": str(path), "seeds": [r["info"]["seed"] for r in runs],
                     "victims": info.get("victims") or len(info["split"]["victims"]),
                     "judge_agreement": R.paired_judge_agreement(runs)}
    return out


def markdown(sets: dict, command: str) -> str:
    lines = ["# Judge agreement, paired (issue 14: a second judge agrees within 0.05 on every defence's leak)", "",
             f"Produced by `{command}` from the committed table.json files (no evaluation re-run).", "",
             "| set | seeds x victims | judges | worst-case leaks: agree / differ / unresolved "
             "| cells: agree / differ / unresolved | largest difference (where, verdict) | largest 'differ' |",
             "|---|---|---|---|---|---|---|"]
    for name, s in sets.items():
        for p in s["judge_agreement"]["pairs"].values():
            cw, cc, big, bd = p["counts"]["worst"], p["counts"]["cells"], p["largest"], p["largest_differ"]
            if big is None:
                lines.append(f"| {name} | {len(s['seeds'])} x {s['victims']} | {p['label']} | not measured | not measured | - | - |")
                continue
            lines.append(f"| {name} | {len(s['seeds'])} x {s['victims']} | {p['label']} "
                         f"| {cw['agree']} / {cw['differ']} / {cw['unresolved']} of {len(p['worst'])} "
                         f"| {cc['agree']} / {cc['differ']} / {cc['unresolved']} of {len(p['cells'])} "
                         f"| {R._diff(big)} ({big['defence']} {big['scenario']}, {big['verdict']}) "
                         f"| {(R._diff(bd) + ' (' + bd['defence'] + ' ' + bd['scenario'] + ')') if bd else 'none'} |")
    for name, s in sets.items():
        lines += ["", f"## {name}: {s['table']}, seeds {s['seeds']}, {s['victims']} victims", ""]
        lines += R.judge_markdown(s["judge_agreement"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.privacy.agreement", description=__doc__)
    ap.add_argument("out", type=Path, help="the markdown file to write (its .json beside it)")
    ap.add_argument("tables", nargs="+", help="NAME=TABLE.json, one per set")
    a = ap.parse_args(argv)
    bad = [x for x in a.tables if "=" not in x]
    if bad:
        print(f"[privacy agreement] expected NAME=TABLE.json, got {bad}", file=sys.stderr)
        return 2
    try:
        sets = agreement(dict(x.split("=", 1) for x in a.tables))
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"[privacy agreement] {e}", file=sys.stderr)
        return 2
    command = "python -m training.privacy.agreement " + " ".join(sys.argv[1:] if argv is None else argv)
    a.out.write_text(markdown(sets, command))
    a.out.with_suffix(".json").write_text(json.dumps({"command": command, "sets": sets}, indent=1, default=str))
    print(a.out.read_text().split("\n## ")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
