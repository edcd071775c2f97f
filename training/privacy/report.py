"""The report: aggregate per-seed runs into a table (markdown + JSON), the frontier plot, the image grid
and an HTML page tying them together; and the test of the claim "adaptive gives more privacy than every
fixed k at equal accuracy".

``python -m training.privacy.report OUT TABLE.json [TABLE.json ...]`` combines one set's seeds run apart
(other sessions, machines or --work folders: each table.json holds its runs' per-victim numbers) into one
report, as if one command had run them (``combine``)."""
from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from training.results import interpolate

from . import stats as ST

SCEN = ("S1", "S2", "S3", "S4", "S5")


def _ms(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _per_victim(row: dict, sc: str, judge: str = "") -> np.ndarray | None:
    r = row["scenarios"].get(sc)
    if r is None:
        return None
    return np.nan_to_num(np.asarray(r.get(f"per_victim{judge}", []), dtype=np.float64), nan=0.0)


def _worst(leaks: dict) -> float:
    return max(leaks.values()) if leaks else float("nan")


# Scalars reported per scenario (mean ± std over seeds) besides the bootstrapped leak.
EXTRAS = {"S1": ("ssim", "psnr", "tar@far1%"), "S2": ("ssim", "tar@far1%"), "S3": ("target_top1", "top5", "wall_s"),
          "S4": ("target_top1", "top5", "queries"), "S5": ()}
S5_EXTRAS = ("recovered@0.9", "recovered@0.95", "rank1", "leak", "wall_s")


def aggregate(runs: list[dict]) -> list[dict]:
    """Per defence (rows in the order of the first run): FR accuracy (mean ± std over seeds), and per scenario
    the leak with its 95% bootstrap interval over seeds x victims (stats.bootstrap), the second judge's leak,
    and the scenario's own numbers (mean ± std); the worst-case leak over scenarios with a paired interval."""
    out = []
    v = runs[0]["info"].get("victims") or len(runs[0]["info"]["split"]["victims"])
    for i, row in enumerate(runs[0]["rows"]):
        same = [r["rows"][i] for r in runs]
        agg = {"defence": row["defence"], "sign_flip": row["sign_flip"], "seeds": [r["info"]["seed"] for r in runs]}
        for key in ("accuracy", "score_cls", "k_mean"):
            agg[key] = _ms([s.get(key) for s in same])
        agg["scenarios"] = {}
        per_sc = {}
        for sc in SCEN:
            if sc not in row["scenarios"]:
                continue
            if row["scenarios"][sc].get("same_as"):
                agg["scenarios"][sc] = {"same_as": row["scenarios"][sc]["same_as"]}
                continue
            per = [_per_victim(s, sc) for s in same]
            per_sc[sc] = per
            d = {"leak": ST.bootstrap(per, v), "leak_judge2": _ms([s["scenarios"][sc].get("leak_judge2") for s in same]),
                 "rank1": _ms([s["scenarios"][sc].get("rank1") for s in same])}
            for key in EXTRAS[sc]:
                d[key] = _ms([s["scenarios"][sc].get(key) for s in same])
            if sc == "S5":
                for variant in ("blind", "informed", "test_time"):
                    d[variant] = {key: _ms([(s["scenarios"][sc].get(variant) or {}).get(key) for s in same]) for key in S5_EXTRAS}
                d["method"] = row["scenarios"][sc].get("method")
            agg["scenarios"][sc] = d
        agg["identity_leak"] = (ST.paired_bootstrap(per_sc, lambda m: _worst({k: ST.leak_of(x, v) for k, x in m.items()}))
                                if per_sc else {"mean": float("nan")})
        agg["identity_leak_judge2"] = _ms([s.get("identity_leak_judge2") for s in same])
        agg["worst_scenario"] = max(((sc, d["leak"]["mean"]) for sc, d in agg["scenarios"].items() if "leak" in d),
                                    key=lambda t: t[1], default=(None, None))[0]
        pp = 1 - agg["identity_leak"]["mean"]
        agg["score_pp"] = pp
        cls = agg["score_cls"][0]
        agg["tradeoff"] = 0.0 if pp + cls <= 0 else 2 * pp * cls / (pp + cls)
        out.append(agg)
    return out


def judge_agreement(agg: list[dict]) -> dict:
    """Largest difference between the two judges' leaks over every defence and scenario (target <= 0.05)."""
    diffs = []
    for a in agg:
        for sc, d in a["scenarios"].items():
            if "leak" in d and not math.isnan(d["leak_judge2"][0]):
                diffs.append((abs(d["leak"]["mean"] - d["leak_judge2"][0]), a["defence"], sc))
    if not diffs:
        return {"max_diff": float("nan")}
    m = max(diffs)
    return {"max_diff": m[0], "where": f"{m[1]} {m[2]}", "mean_diff": statistics.fmean(d[0] for d in diffs),
            "within_0.05": sum(d[0] <= 0.05 for d in diffs), "cells": len(diffs)}


JUDGE_MARGIN = 0.05  # issue 14: a second, differently built judge agrees within 0.05 on every defence's leak
JUDGE_NAMES = ("judge", "judge2", "judge3")  # run.JUDGES: "judge" is the reported one


def paired_judge_agreement(runs: list[dict], margin: float = JUDGE_MARGIN) -> dict:
    """The reported judge against every other judge, paired: per defence and scenario (the cells of
    ``aggregate``: ``same_as`` scenarios left out) and on the defence's worst-case leak (the max over its
    scenarios, taken per judge inside every resample), the difference reported judge - other judge of the
    leaks the report shows (stats.leak_of of the mean per-victim success, ``_per_victim``), with its 95%
    interval over seeds x victims resampling the same seeds and victims for both judges (stats.paired_means,
    the plan of stats.paired_bootstrap) and stats.equivalence's verdict at ``margin``.
    A run without another judge's per-victim arrays (a table.json written before they were kept) leaves
    that pair's cells "not measured", with the reason in ``missing``.
    Returns {"margin", "seeds", "judges": {name: kind}, "pairs": {other: {"label", "cells", "worst",
    "counts", "largest", "largest_differ", "missing"}}}."""
    v = runs[0]["info"].get("victims") or len(runs[0]["info"]["split"]["victims"])
    kinds = {n: j.get("kind", n) for n, j in runs[0]["info"].get("judges", {}).items()} or {n: n for n in JUDGE_NAMES}
    others = [n for n in kinds if n != "judge"] or list(JUDGE_NAMES[1:])
    out = {"margin": margin, "seeds": [r["info"]["seed"] for r in runs], "judges": kinds, "pairs": {}}
    for o in others:
        out["pairs"][o] = {"label": f"{kinds.get('judge', 'judge')} - {kinds.get(o, o)}", "cells": [], "worst": [], "missing": None}
    for i, row in enumerate(runs[0]["rows"]):
        same = [r["rows"][i] for r in runs]
        scs = [sc for sc in SCEN if sc in row["scenarios"] and not row["scenarios"][sc].get("same_as")]
        if not scs:
            continue
        per = {f"judge|{sc}": [_per_victim(s, sc) for s in same] for sc in scs}
        measured = []
        for o in others:
            arrs = {sc: [_per_victim(s, sc, f"_{o}") for s in same] for sc in scs}
            if all(len(a) == len(b) > 0 for sc in scs for a, b in zip(arrs[sc], per[f"judge|{sc}"])):
                per.update({f"{o}|{sc}": arrs[sc] for sc in scs})
                measured.append(o)
            elif out["pairs"][o]["missing"] is None:
                out["pairs"][o]["missing"] = (f"no per-victim results of {o} ({kinds.get(o, o)}) beside the reported judge's "
                                              f"in every run (first: {row['defence']}); a table.json written before "
                                              f"per_victim_{o} was kept")
        point, boot = ST.paired_means(per)
        leak = {k: ST.leak_of(m, v) for k, m in point.items()}
        lboot = {k: np.array([ST.leak_of(m, v) for m in b]) for k, b in boot.items()}
        for o in others:
            pair = out["pairs"][o]
            if o not in measured:
                for sc in scs:
                    pair["cells"].append({"defence": row["defence"], "scenario": sc, "verdict": "not measured"})
                pair["worst"].append({"defence": row["defence"], "scenario": "worst", "verdict": "not measured"})
                continue
            for sc in scs:
                e = ST.equivalence(leak[f"judge|{sc}"] - leak[f"{o}|{sc}"], lboot[f"judge|{sc}"] - lboot[f"{o}|{sc}"],
                                   len(runs), margin)
                pair["cells"].append({"defence": row["defence"], "scenario": sc, **e})
            w = {j: _worst({sc: leak[f"{j}|{sc}"] for sc in scs}) for j in ("judge", o)}
            wb = {j: np.max([lboot[f"{j}|{sc}"] for sc in scs], axis=0) for j in ("judge", o)}
            e = ST.equivalence(w["judge"] - w[o], wb["judge"] - wb[o], len(runs), margin)
            pair["worst"].append({"defence": row["defence"], "scenario": "worst", **e})
    for pair in out["pairs"].values():
        pair["counts"] = {part: {k: sum(c["verdict"] == k for c in pair[part])
                                 for k in ("agree", "differ", "unresolved", "not measured")} for part in ("cells", "worst")}
        done = [c for c in pair["cells"] + pair["worst"] if c["verdict"] != "not measured"]
        pair["largest"] = max(done, key=lambda c: abs(c["mean"]), default=None)
        pair["largest_differ"] = max((c for c in done if c["verdict"] == "differ"), key=lambda c: abs(c["mean"]), default=None)
    return out


def _diff(c: dict, nd: int = 3) -> str:
    if c is None or c["verdict"] == "not measured" or math.isnan(c.get("lo", float("nan"))):
        return "-"
    return f"{c['mean']:+.{nd}f} [{c['lo']:+.{nd}f}, {c['hi']:+.{nd}f}]"


def _verdict(c: dict) -> str:
    if c["verdict"] == "unresolved":
        return f"unresolved (~{c['seeds_needed']} seeds)" if c.get("seeds_needed") else "unresolved"
    return c["verdict"]


def judge_markdown(ja: dict, cells: bool = True) -> list[str]:
    """The paired judge agreement (``paired_judge_agreement``) as markdown lines: per judge pair the verdict
    counts on worst-case leaks and on cells and the largest difference; with ``cells`` the per-cell table."""
    m = ja["margin"]
    lines = [f"**Judge agreement, paired** (reported judge's leak minus another judge's, 95% interval over seeds x victims "
             f"resampling the same seeds and victims for both; agree = the interval lies inside ±{m:.2f}, differ = it "
             f"excludes 0 and the difference exceeds {m:.2f}, else unresolved, with the seeds its width implies to decide):",
             "",
             "| judges | worst-case leaks: agree / differ / unresolved | cells: agree / differ / unresolved "
             "| largest difference (where, verdict) | largest 'differ' |",
             "|---|---|---|---|---|"]
    notes = []
    for o, p in ja["pairs"].items():
        cw, cc = p["counts"]["worst"], p["counts"]["cells"]
        if p["missing"] and not (cw["agree"] + cw["differ"] + cw["unresolved"]):
            lines.append(f"| {p['label']} | not measured | not measured | - | - |")
            notes.append(f"{p['label']}: not measured: {p['missing']}.")
            continue
        if p["missing"]:
            notes.append(f"{p['label']}: {cc['not measured']} cells not measured: {p['missing']}.")
        big, bd = p["largest"], p["largest_differ"]
        lines.append(f"| {p['label']} | {cw['agree']} / {cw['differ']} / {cw['unresolved']} of {len(p['worst'])} "
                     f"| {cc['agree']} / {cc['differ']} / {cc['unresolved']} of {len(p['cells'])} "
                     f"| {_diff(big)} ({big['defence']} {big['scenario']}, {big['verdict']}) "
                     f"| {(_diff(bd) + ' (' + bd['defence'] + ' ' + bd['scenario'] + ')') if bd else 'none'} |")
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if cells and ja["pairs"]:
        ps = list(ja["pairs"].values())
        lines += ["| defence | leak | " + " | ".join(f"{p['label']} | verdict" for p in ps) + " |",
                  "|---|---|" + "---|---|" * len(ps)]
        def by_defence(p):  # a defence's cells, then its worst case (every pair lists the same cells in the same order)
            return [c for w in p["worst"] for c in [x for x in p["cells"] if x["defence"] == w["defence"]] + [w]]

        for rows in zip(*(by_defence(p) for p in ps)):
            lines.append(f"| {rows[0]['defence']} | {rows[0]['scenario']} | "
                         + " | ".join(f"{_diff(c)} | {_verdict(c)}" for c in rows) + " |")
        lines.append("")
    return lines


def claim(runs: list[dict]) -> dict:
    """"Adaptive gives more privacy than every fixed k at equal accuracy": the margin = the fixed-k curve's
    worst-case leak interpolated at adaptive's accuracy minus adaptive's worst-case leak (> 0 favours
    adaptive), with a paired bootstrap interval over seeds x victims (the same victims resampled for every
    defence; accuracies move with the resampled seeds). Supported only when the interval excludes 0."""
    rows0 = {x["defence"]: j for j, x in enumerate(runs[0]["rows"])}
    fixed = [f"hybrid_k{k}" for k in range(2, 7) if f"hybrid_k{k}" in rows0]
    if "adaptive" not in rows0 or len(fixed) < 2:
        return {"verdict": "not measured (needs adaptive and at least two fixed k)", "per_seed": []}
    v = runs[0]["info"].get("victims") or len(runs[0]["info"]["split"]["victims"])
    per, names = {}, ["adaptive"] + fixed
    for n in names:
        scs = [sc for sc in SCEN if sc in runs[0]["rows"][rows0[n]]["scenarios"]
               and not runs[0]["rows"][rows0[n]]["scenarios"][sc].get("same_as")]
        for sc in scs:
            per[f"{n}|{sc}"] = [_per_victim(r["rows"][rows0[n]], sc) for r in runs]
        # accuracy as a per-victim constant: victims resample nothing, seeds resample it
        per[f"{n}|acc"] = [np.full(v, r["rows"][rows0[n]]["accuracy"]) for r in runs]

    def leak(m, n):
        return _worst({k.split("|")[1]: ST.leak_of(x, v) for k, x in m.items() if k.startswith(n + "|") and not k.endswith("|acc")})

    def margin(m):
        curve = interpolate([(m[f"{f}|acc"], leak(m, f)) for f in fixed], m["adaptive|acc"])
        return None if curve is None else curve - leak(m, "adaptive")

    r = ST.paired_bootstrap(per, margin)
    per_seed = []
    for i, run in enumerate(runs):
        rows = {x["defence"]: x for x in run["rows"]}
        m = {key: float(arr[i].mean()) for key, arr in per.items()}
        per_seed.append({"seed": run["info"]["seed"], "adaptive_accuracy": rows["adaptive"]["accuracy"],
                         "adaptive_leak": leak(m, "adaptive"), "adaptive_k_mean": rows["adaptive"].get("k_mean"),
                         "margin": margin(m)})
    if math.isnan(r["lo"]):
        verdict = "not testable: adaptive's accuracy lies outside the fixed-k accuracy range (no equal-accuracy point)"
    elif r["lo"] > 0:
        verdict = f"supported: margin {r['mean']:+.3f}, 95% interval [{r['lo']:+.3f}, {r['hi']:+.3f}] excludes 0"
    elif r["hi"] < 0:
        verdict = f"refuted: adaptive leaks more than the fixed-k curve, margin {r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
    else:
        verdict = (f"not supported: margin {r['mean']:+.3f}, 95% interval [{r['lo']:+.3f}, {r['hi']:+.3f}] contains 0 "
                   f"(half-width {r['half_width']:.3f}; about {ST.seeds_needed(r['half_width'], len(runs))} seeds for 0.02 at this spread)")
    return {"margin": r, "per_seed": per_seed, "verdict": verdict}


def _f(ms, pct=False, nd=3):
    m, s = ms
    if isinstance(m, float) and math.isnan(m):
        return "-"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def _ci(d, nd=2):
    if not d or math.isnan(d.get("mean", float("nan"))):
        return "-"
    return f"{d['mean']:.{nd}f} [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]"


def markdown(agg: list[dict], info: dict, cl: dict, ja: dict | None = None) -> str:
    j = info.get("judges", {})
    jt = "; ".join(f"{n}: {x.get('kind')} on {x.get('pool')} ({x.get('pool_people')} people), clean rank-1 {_f(x['rank1'], True)} %"
                   for n, x in j.items()) if j else "-"
    ag = judge_agreement(agg)
    lines = [
        f"### {info['split_name'].upper()}: {info['victims']} victim identities, seeds {info['seeds']}",
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores (shared with other jobs; load average at start "
        f"{', '.join(f'{x:.1f}' for x in info['machine']['load_avg_start'])}), torch {info['machine']['torch']}, 1 thread. "
        f"Wall time: {info['wall_s'] / 60:.1f} min for {len(info['seeds'])} seed(s).",
        "",
        f"Judges (never the victims' classifier; victims enrolled from held-out images, attacked images are probes only): {jt}. "
        f"Largest difference between the two judges' leaks: {ag.get('max_diff', float('nan')):.3f} ({ag.get('where', '-')}); "
        f"{ag.get('within_0.05', 0)} of {ag.get('cells', 0)} cells within 0.05.",
        "",
        "Leak = chance-normalised share of victims' attacked images the judge identifies at rank 1 (0 = chance, 1 = all), "
        "with its 95% bootstrap interval over seeds x victims. S5 = the training server's stream attack (the stronger of "
        "blind and informed per victim); rec@0.9 = share of victim training faces recovered at cosine >= 0.9.",
        "",
        "| defence | FR acc % | S1 leak | S2 leak | S3 leak | S3 target's own top-1 % | S4 leak | S5 leak | S5 blind rec@0.9 % | "
        "S5 informed rec@0.9 % | S5 method | deployed-input leak | worst leak (scenario) | worst, judge 2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in agg:
        sc = a["scenarios"]
        name = a["defence"] + (" (signs)" if a["sign_flip"] else "")
        if a["defence"] == "adaptive" and not math.isnan(a["k_mean"][0]):
            name += f" (mean k {a['k_mean'][0]:.2f})"
        cell = lambda k: "= S1" if sc.get(k, {}).get("same_as") else _ci(sc.get(k, {}).get("leak"))  # noqa: E731
        s5 = sc.get("S5", {})
        tt = s5.get("test_time", {}).get("leak", (float("nan"), 0))
        lines.append(
            f"| {name} | {_f(a['accuracy'], True)} | {cell('S1')} | {cell('S2')} | {cell('S3')} "
            f"| {_f(sc.get('S3', {}).get('target_top1', (float('nan'), 0)), True)} | {cell('S4')} | {cell('S5')} "
            f"| {_f(s5.get('blind', {}).get('recovered@0.9', (float('nan'), 0)), True)} "
            f"| {_f(s5.get('informed', {}).get('recovered@0.9', (float('nan'), 0)), True)} | {s5.get('method', '-')} "
            f"| {_f(tt, nd=2)} | {_ci(a['identity_leak'])} ({a['worst_scenario']}) | {_f(a['identity_leak_judge2'], nd=2)} |")
    lines += ["", f"**Claim under test** (adaptive gives more privacy than every fixed k at equal accuracy): {cl['verdict']}.", ""]
    for p in cl.get("per_seed", []):
        mg = "outside the fixed-k accuracy range" if p["margin"] is None else f"{p['margin']:+.3f}"
        lines.append(f"- seed {p['seed']}: adaptive accuracy {100 * p['adaptive_accuracy']:.1f} %, worst-case leak "
                     f"{p['adaptive_leak']:.3f} (mean k {p['adaptive_k_mean'] if p['adaptive_k_mean'] is None else round(p['adaptive_k_mean'], 2)}); "
                     f"margin {mg}")
    if ja is not None:
        lines += [""] + judge_markdown(ja)
    return "\n".join(lines) + "\n"


def _xerr(rows):
    """Asymmetric x error bars (2, n) from the leaks' bootstrap intervals (0 where undefined)."""
    lo = [max(0.0, a["identity_leak"]["mean"] - a["identity_leak"].get("lo", a["identity_leak"]["mean"])) for a in rows]
    hi = [max(0.0, a["identity_leak"].get("hi", a["identity_leak"]["mean"]) - a["identity_leak"]["mean"]) for a in rows]
    return [[0.0 if math.isnan(x) else x for x in lo], [0.0 if math.isnan(x) else x for x in hi]]


def frontier_plot(agg: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    fixed = [a for a in agg if a["defence"].startswith("hybrid_k")]
    if fixed:
        xs = [a["identity_leak"]["mean"] for a in fixed]
        ys = [100 * a["accuracy"][0] for a in fixed]
        ax.errorbar(xs, ys, xerr=_xerr(fixed), yerr=[100 * a["accuracy"][1] for a in fixed],
                    fmt="-o", color="C0", capsize=3, label="fixed-k hybrid (k = 2..6)")
        for a, x, y in zip(fixed, xs, ys):
            ax.annotate(a["defence"][-2:], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color="C0")
    for i, a in enumerate(x for x in agg if not x["defence"].startswith("hybrid_k")):
        ad = a["defence"] == "adaptive"
        ax.errorbar(a["identity_leak"]["mean"], 100 * a["accuracy"][0], xerr=_xerr([a]), yerr=100 * a["accuracy"][1],
                    fmt="*" if ad else "s", ms=14 if ad else 7, color="C3" if ad else f"C{(i % 7) + 1 if (i % 7) + 1 != 3 else 9}",
                    capsize=3, label=a["defence"])
    ax.set_xlabel("identity leak, worst case over S1-S5 (0 = chance), 95% bootstrap interval")
    ax.set_ylabel("FR accuracy on held-out faces (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(images: dict, path: Path) -> None:
    """Per defence one row: for 2 victim faces [target, protected (pseudo-inverse), S1, S2]; then one victim
    identity's real face, its S3 and S4 inversions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defs = list(images["defences"])
    cols = ["target", "protected", "S1 recon", "S2 recon", "victim face", "S5 recovered"] * 2 + ["real (id 0)", "S3 inversion", "S4 inversion"]
    fig, axes = plt.subplots(len(defs), len(cols), figsize=(len(cols) * 0.95, len(defs) * 1.05), squeeze=False)
    blank = torch.zeros_like(images["original"][0])
    for r, d in enumerate(defs):
        im = images["defences"][d]
        cells = []
        for j in range(2):
            cells += [im.get("S1_target", images["original"])[j], im.get("protected", images["original"])[j],
                      im["S1"][j] if "S1" in im else blank, im["S2"][j] if "S2" in im else None,
                      images["original"][j], im["S5"][j] if "S5" in im else blank]
        cells += [images["mi_real"][0], im["S3"][0] if "S3" in im else blank, im["S4"][0] if "S4" in im else blank]
        for c, x in enumerate(cells):
            ax = axes[r, c]
            ax.axis("off")
            if x is None:
                ax.text(0.5, 0.5, "= S1\n(no signs)", ha="center", va="center", fontsize=6, transform=ax.transAxes)
                continue
            x = x.float()
            if cols[c] == "protected":  # pseudo-inverses of DC-free representations: show with their own range
                x = (x - x.min()) / (x.max() - x.min() + 1e-8) * 2 - 1
            ax.imshow(((x[0].clamp(-1, 1) + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)
        if r == 0:
            for c, name in enumerate(cols):
                axes[0, c].set_title(name, fontsize=6)
        axes[r, 0].text(-0.15, 0.5, d, rotation=90, ha="right", va="center", fontsize=7, transform=axes[r, 0].transAxes)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def html_page(sections: list[tuple[str, str, dict]], info: dict, threat_model: str) -> str:
    """One page for every set: ``sections`` is [(set name, its markdown table, its file names)]."""
    import re

    def table(rows):
        cell = lambda i, c: f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"  # noqa: E731
        return "<table>" + "".join("<tr>" + "".join(cell(i, c) for c in r) + "</tr>" for i, r in enumerate(rows)) + "</table>"

    def md_table(text):
        out, rows = [], []
        for ln in text.splitlines():
            if ln.startswith("|"):
                if set(ln.replace("|", "").strip()) <= {"-"}:
                    continue
                rows.append(ln.strip("|").split("|"))
                continue
            if rows:
                out.append(table(rows))
                rows = []
            if ln.startswith("### "):
                out.append(f"<h3>{html.escape(ln[4:])}</h3>")
            elif ln.startswith("- "):
                out.append(f"<li>{html.escape(ln[2:])}</li>")
            elif ln.strip():
                out.append("<p>" + re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(ln)) + "</p>")
        if rows:
            out.append(table(rows))
        return "\n".join(out)

    body = []
    grid_note = """<h3>Originals, protected representations and attacks</h3>
<p>Per defence, twice: the S1 target (for mixing defences the dominant partner of the mix), the protected
representation shown through the attacker's pseudo-inverse (fastmix.frontend_inverse, contrast-stretched), the S1 and S2 U-Net reconstructions,
a victim training face and what the S5 stream attack recovered for it; then a real face of victim identity 0 and the S3 (white-box) and S4
(black-box) model inversions for that identity.</p>"""
    for name, md, files in sections:
        # no grid for a report combined from table.json files (they do not keep the images)
        grid = f"""{grid_note}\n<img src="{files['grid']}">\n""" if "grid" in files else ""
        body.append(f"""<h2>{html.escape(name.upper())}</h2>{md_table(md)}
<h3>Frontier: FR accuracy vs identity leak</h3><img src="{files['frontier']}">
{grid}<p>Raw numbers: <a href="{files['json']}">{files['json']}</a>, table: <a href="{files['md']}">{files['md']}</a>.</p>""")
    sets = ", ".join(n.upper() for n, _, _ in sections)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fastmix privacy report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #bbb;padding:3px 5px;text-align:right}} th{{background:#eee}} img{{max-width:100%}} pre{{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:1em}}</style></head><body>
<h1>fastmix privacy under attack ({html.escape(sets)})</h1>
<p>Produced by <code>{html.escape(info['command'])}</code>. Machine: {html.escape(str(info['machine']))}. Total wall time {info['wall_s'] / 60:.1f} min.</p>
{"".join(body)}
<h2>Threat model, metrics and scores</h2><pre>{html.escape(threat_model)}</pre>
</body></html>"""


def write_set(d: Path, tag: str, runs: list[dict], command, machine: dict | None = None) -> tuple[str, list[dict], dict]:
    """One set's report files in ``d``: table.md, table.json (the aggregate, the claim and every run without its
    images), frontier.png, and grid.png when the first run carries its images. Returns (markdown, aggregate, claim)."""
    agg, cl, ja = aggregate(runs), claim(runs), paired_judge_agreement(runs)
    # the machine as the first run saw it (load average at its start); runs written before that field: ``machine``
    judges = {n: {**j, "rank1": _ms([r["info"]["judges"][n]["rank1"] for r in runs])}
              for n, j in runs[0]["info"].get("judges", {}).items()}
    info = {"split_name": tag, "victims": runs[0]["info"].get("victims", len(runs[0]["info"]["split"]["victims"])),
            "seeds": [r["info"]["seed"] for r in runs], "machine": runs[0]["info"].get("machine", machine),
            "wall_s": sum(r["info"]["wall_s"] for r in runs), "judges": judges, "budget": runs[0]["info"]["budget"],
            "split": runs[0]["info"]["split"]}
    md = markdown(agg, info, cl, ja)
    d.mkdir(parents=True, exist_ok=True)
    (d / "table.md").write_text(md)
    (d / "table.json").write_text(json.dumps({"info": info, "command": command, "aggregate": agg, "claim": cl,
                                              "judge_agreement": ja, "runs": [{k: v for k, v in r.items() if k != "images"} for r in runs]},
                                             indent=1, default=str))
    frontier_plot(agg, d / "frontier.png", f"{tag.upper()}: FR accuracy vs worst-case identity leak (seeds {info['seeds']})")
    if "images" in runs[0]:
        image_grid(runs[0]["images"], d / "grid.png")
    return md, agg, cl


def _request(run: dict) -> dict:
    """What a run answered: its set, face size, defences (with their settings), scenarios, budget and judges."""
    i = run["info"]
    return {"set": i["split"].get("set"), "size": i.get("size", 56), "scenarios": list(i.get("scenarios", SCEN)),
            "budget": i["budget"], "defences": [(r["defence"], r.get("config")) for r in run["rows"]],
            "judges": {n: (j.get("kind"), j.get("pool")) for n, j in i.get("judges", {}).items()}}


def combine(tables, out: Path) -> tuple[str, list[dict], dict]:
    """One report (``write_set`` into ``out``) from the runs of several table.json files of the same set, each
    seed once, all answering the same request (``_request``); a ValueError naming the file otherwise. No new
    grid.png: table.json does not keep the images (one already in ``out``, of an earlier report, is left there)."""
    runs, sources = [], []
    for path in tables:
        t = json.loads(Path(path).read_text())
        if not isinstance(t, dict) or not t.get("runs"):
            raise ValueError(f"{path}: no runs in this file (expected a privacy report's <set>/table.json)")
        for r in t["runs"]:
            try:
                _request(r)
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}: a run without its info / rows ({type(e).__name__}: {e}): not a privacy "
                                 f"report's table.json") from None
            if _request(r) != _request((runs or [r])[0]):
                raise ValueError(f"{path}: seed {r['info']['seed']} answers another request than {sources[0][0]} "
                                 f"(set, size, defences, scenarios, budget or judges differ): not combined")
            if any(r["info"]["seed"] == x["info"]["seed"] for x in runs):
                raise ValueError(f"{path}: seed {r['info']['seed']} is already in {sources[[x['info']['seed'] for x in runs].index(r['info']['seed'])][0]}")
            runs.append(r)
            sources.append((str(path), t.get("command")))
    order = sorted(range(len(runs)), key=lambda i: runs[i]["info"]["seed"])
    runs = [runs[i] for i in order]
    tag = Path(out).name
    command = {"combined": [{"table": src, "seed": runs[j]["info"]["seed"], "command": cmd}
                            for j, (src, cmd) in enumerate(sources[i] for i in order)]}
    return write_set(Path(out), tag, runs, command)


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m training.privacy.report", description=combine.__doc__)
    ap.add_argument("out", type=Path, help="the combined report's folder (its name is the set's tag, e.g. lfw)")
    ap.add_argument("tables", type=Path, nargs="+", help="table.json files of one set")
    a = ap.parse_args(argv)
    try:
        md, _, _ = combine(a.tables, a.out)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"[privacy report] {e}", file=sys.stderr)
        return 2
    print(md)
    # the page beside it: every set folder there (this one and any other set's table), as the command writes it
    root = Path(a.out).parent
    sections, wall, mach = [], 0.0, None
    for d in sorted(x for x in root.iterdir() if (x / "table.md").is_file() and (x / "table.json").is_file()):
        t = json.loads((d / "table.json").read_text())
        wall += t["info"].get("wall_s", 0.0)
        mach = mach or t["info"].get("machine")
        files = {"frontier": f"{d.name}/frontier.png", "json": f"{d.name}/table.json", "md": f"{d.name}/table.md"}
        if (d / "grid.png").is_file():
            files["grid"] = f"{d.name}/grid.png"
        sections.append((d.name, (d / "table.md").read_text(), files))
    command = "python -m training.privacy.report " + " ".join(sys.argv[1:] if argv is None else argv)
    tm = (Path(__file__).parent / "THREAT_MODEL.md").read_text()
    (root / "report.html").write_text(html_page(sections, {"command": command, "machine": mach, "wall_s": wall}, tm))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
