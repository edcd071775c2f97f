"""The report: aggregate per-seed runs into a table (markdown + JSON), the frontier plot, the image grid
and an HTML page tying them together; and the test of the claim "adaptive gives more privacy than every
fixed k at equal accuracy"."""
from __future__ import annotations

import html
import math
import statistics
from pathlib import Path

import torch

from training.results import interpolate

SCEN = ("S1", "S2", "S3", "S4")


def _ms(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds of every number, per defence (rows in the order of the first run)."""
    out = []
    for i, row in enumerate(runs[0]["rows"]):
        same = [r["rows"][i] for r in runs]
        agg = {"defence": row["defence"], "sign_flip": row["sign_flip"], "seeds": [r["info"]["seed"] for r in runs]}
        for key in ("accuracy", "score_pp", "score_cls", "tradeoff", "identity_leak", "k_mean"):
            agg[key] = _ms([s.get(key) for s in same])
        agg["scenarios"] = {}
        for sc in SCEN:
            if sc not in row["scenarios"]:
                continue
            d = {}
            for key in row["scenarios"][sc]:
                if key == "same_as":
                    d["same_as"] = row["scenarios"][sc]["same_as"]
                    continue
                d[key] = _ms([s["scenarios"][sc].get(key) for s in same])
            agg["scenarios"][sc] = d
        out.append(agg)
    return out


def claim(runs: list[dict]) -> dict:
    """Per seed: adaptive's identity leak vs the fixed-k curve's leak at adaptive's accuracy, and the fixed k
    that are at least as accurate and leak no more (which would refute "more privacy than every fixed k")."""
    per = []
    for r in runs:
        rows = {x["defence"]: x for x in r["rows"]}
        if "adaptive" not in rows:
            continue
        ad = rows["adaptive"]
        fixed = {k: rows[f"hybrid_k{k}"] for k in range(2, 7) if f"hybrid_k{k}" in rows}
        # the fixed-k curve's leak at adaptive's accuracy (None where no fixed k reaches it: no equal-accuracy point)
        curve = interpolate([(f["accuracy"], f["identity_leak"]) for f in fixed.values()], ad["accuracy"])
        dominating = [k for k, f in fixed.items() if f["accuracy"] >= ad["accuracy"] and f["identity_leak"] <= ad["identity_leak"]]
        per.append({"seed": r["info"]["seed"], "adaptive_accuracy": ad["accuracy"], "adaptive_leak": ad["identity_leak"],
                    "adaptive_k_mean": ad.get("k_mean"), "fixed_leak_at_equal_accuracy": curve,
                    "margin": None if curve is None else curve - ad["identity_leak"],
                    "fixed_k_at_least_as_good": dominating})
    margins = [p["margin"] for p in per if p["margin"] is not None]
    holds = [p for p in per if not p["fixed_k_at_least_as_good"] and p["margin"] is not None and p["margin"] > 0]
    if not per:
        verdict = "not measured (no adaptive run)"
    elif len(holds) == len(per):
        verdict = "supported in every seed (adaptive leaks less than the fixed-k curve at its accuracy, and no fixed k is both as accurate and as private)"
    elif not holds:
        verdict = "not supported: in no seed does adaptive beat the fixed-k curve at equal accuracy"
    else:
        verdict = f"mixed: supported in {len(holds)} of {len(per)} seeds"
    m, s = _ms(margins)
    return {"per_seed": per, "margin_mean": m, "margin_std": s, "verdict": verdict}


def _f(ms, pct=False, nd=3):
    m, s = ms
    if isinstance(m, float) and math.isnan(m):
        return "-"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def markdown(agg: list[dict], info: dict, cl: dict) -> str:
    lines = [
        f"### {info['split_name'].upper()}: {info['victims']} victim identities, seeds {info['seeds']} (mean ± std over seeds)",
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores (shared with other jobs; load average at start "
        f"{', '.join(f'{x:.1f}' for x in info['machine']['load_avg_start'])}), torch {info['machine']['torch']}, 1 thread. "
        f"Wall time: {info['wall_s'] / 60:.1f} min for {len(info['seeds'])} seed(s). Evaluation model (clean) held-out accuracy: "
        f"{_f(info['evaluator_accuracy'], True)} %.",
        "",
        "| defence | FR acc % | S1 SSIM | S1 PSNR | S1 re-id top-1 % | S1 verif % | S2 SSIM | S2 verif % | S3 top-1 % | S3 top-5 % | S3 kNN | S4 top-1 % | S4 top-5 % | S4 kNN | leak | Score_pp | Score_cls | trade-off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in agg:
        sc = a["scenarios"]
        s1, s2, s3, s4 = (sc.get(k, {}) for k in SCEN)
        name = a["defence"] + (" (signs)" if a["sign_flip"] else "")
        if a["defence"] == "adaptive" and not math.isnan(a["k_mean"][0]):
            name += f" (mean k {a['k_mean'][0]:.2f})"
        s2s = "= S1" if "same_as" in s2 else _f(s2.get("ssim", (float("nan"),) * 2))
        s2v = "= S1" if "same_as" in s2 else _f(s2.get("verification", (float("nan"),) * 2), True)
        g = lambda d, k, pct=False, nd=3: _f(d.get(k, (float("nan"), float("nan"))), pct, nd)  # noqa: E731
        lines.append(
            f"| {name} | {_f(a['accuracy'], True)} | {g(s1, 'ssim')} | {g(s1, 'psnr', nd=2)} | {g(s1, 'top1', True)} | {g(s1, 'verification', True)} "
            f"| {s2s} | {s2v} | {g(s3, 'top1', True)} | {g(s3, 'top5', True)} | {g(s3, 'knn_dist')} | {g(s4, 'top1', True)} | {g(s4, 'top5', True)} "
            f"| {g(s4, 'knn_dist')} | {_f(a['identity_leak'])} | {_f(a['score_pp'])} | {_f(a['score_cls'])} | {_f(a['tradeoff'])} |")
    lines += ["", f"**Claim under test** (adaptive gives more privacy than every fixed k at equal accuracy): {cl['verdict']}.", ""]
    for p in cl["per_seed"]:
        cur = "outside the fixed-k accuracy range" if p["fixed_leak_at_equal_accuracy"] is None else f"{p['fixed_leak_at_equal_accuracy']:.3f}"
        lines.append(f"- seed {p['seed']}: adaptive accuracy {100 * p['adaptive_accuracy']:.1f} %, leak {p['adaptive_leak']:.3f} "
                     f"(mean k {p['adaptive_k_mean'] if p['adaptive_k_mean'] is None else round(p['adaptive_k_mean'], 2)}); fixed-k curve leak at that accuracy: {cur}; "
                     f"fixed k at least as accurate and no leakier: {p['fixed_k_at_least_as_good'] or 'none'}")
    if not math.isnan(cl["margin_mean"]):
        lines.append(f"- margin (fixed-k leak at equal accuracy - adaptive leak; > 0 favours adaptive): {cl['margin_mean']:.3f} ± {cl['margin_std']:.3f}")
    return "\n".join(lines) + "\n"


def frontier_plot(agg: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    fixed = [a for a in agg if a["defence"].startswith("hybrid_k")]
    if fixed:
        xs = [a["identity_leak"][0] for a in fixed]
        ys = [100 * a["accuracy"][0] for a in fixed]
        ax.errorbar(xs, ys, xerr=[a["identity_leak"][1] for a in fixed], yerr=[100 * a["accuracy"][1] for a in fixed],
                    fmt="-o", color="C0", capsize=3, label="fixed-k hybrid (k = 2..6)")
        for a, x, y in zip(fixed, xs, ys):
            ax.annotate(a["defence"][-2:], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color="C0")
    for i, a in enumerate(x for x in agg if not x["defence"].startswith("hybrid_k")):
        ad = a["defence"] == "adaptive"
        ax.errorbar(a["identity_leak"][0], 100 * a["accuracy"][0], xerr=a["identity_leak"][1], yerr=100 * a["accuracy"][1],
                    fmt="*" if ad else "s", ms=14 if ad else 7, color="C3" if ad else f"C{(i % 7) + 1 if (i % 7) + 1 != 3 else 9}",
                    capsize=3, label=a["defence"])
    ax.set_xlabel("identity leak = 1 - Score_pp (worst case over S1-S4; 0 = chance)")
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
    cols = ["target", "protected", "S1 recon", "S2 recon"] * 2 + ["real (id 0)", "S3 inversion", "S4 inversion"]
    fig, axes = plt.subplots(len(defs), len(cols), figsize=(len(cols) * 0.95, len(defs) * 1.05), squeeze=False)
    blank = torch.zeros_like(images["original"][0])
    for r, d in enumerate(defs):
        im = images["defences"][d]
        cells = []
        for j in range(2):
            cells += [im.get("S1_target", images["original"])[j], im.get("protected", images["original"])[j],
                      im["S1"][j] if "S1" in im else blank, im["S2"][j] if "S2" in im else None]
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
    for name, md, files in sections:
        body.append(f"""<h2>{html.escape(name.upper())}</h2>{md_table(md)}
<h3>Frontier: FR accuracy vs identity leak</h3><img src="{files['frontier']}">
<h3>Originals, protected representations and attacks</h3>
<p>Per defence: two victim training faces (the attack target: for mixing defences the dominant partner of the mix), the protected
representation shown through the attacker's pseudo-inverse (fastmix.frontend_inverse, contrast-stretched), the S1 and S2 U-Net reconstructions;
then a real face of victim identity 0 and the S3 (white-box) and S4 (black-box) model inversions for that identity.</p>
<img src="{files['grid']}">
<p>Raw numbers: <a href="{files['json']}">{files['json']}</a>, table: <a href="{files['md']}">{files['md']}</a>.</p>""")
    sets = ", ".join(n.upper() for n, _, _ in sections)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fastmix privacy report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #bbb;padding:3px 5px;text-align:right}} th{{background:#eee}} img{{max-width:100%}} pre{{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:1em}}</style></head><body>
<h1>fastmix privacy under attack ({html.escape(sets)})</h1>
<p>Produced by <code>{html.escape(info['command'])}</code>. Machine: {html.escape(str(info['machine']))}. Total wall time {info['wall_s'] / 60:.1f} min.</p>
{"".join(body)}
<h2>Threat model, metrics and scores</h2><pre>{html.escape(threat_model)}</pre>
</body></html>"""
