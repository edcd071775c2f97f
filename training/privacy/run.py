"""One run: every scenario (S1-S4) against every defence of the training layer, on one split and seed.

    target FR model per defence   training.loop.train (the training layer's loop, config orl_cpu / lfw_cpu
                                  scaled down: 56x56 faces, the ``tiny`` backbone, few steps)
    evaluation model              evaluator.train_evaluator on clean victim faces
    S1 / S2                       attacks.train_decoder on the attacker's faces, attacks.reconstruct on victims
    S3 / S4                       attacks.invert_white_box / invert_black_box, one image per victim identity
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from training.config import load_config, project_root
from training.data import to_float
from training.defences import build_defence
from training.loop import CKPT, TrainStep, train
from training.loss import MarginHead
from training.model import build_model

from . import attacks as A
from . import metrics as M
from .data import SPLITS
from .evaluator import accuracy, train_evaluator

# (label, defence overrides): every defence of the training issue; hybrid / adaptive as the training configs
# set them (keep no_dc, sign flip off), plus k = 6 with sign flips; InstaHide always flips signs (S2 differs from S1).
DEFENCES = [
    ("none", {"name": "none"}),
    ("ppfr", {"name": "ppfr"}),
    ("partialface", {"name": "partialface"}),
    ("dctdp", {"name": "dctdp"}),
    ("instahide", {"name": "instahide", "k": 4}),
    *[(f"hybrid_k{k}", {"name": "hybrid", "k": k}) for k in range(2, 7)],
    ("hybrid6_signs", {"name": "hybrid", "k": 6, "sign_flip": True}),  # the full hybrid mask: S2 differs from S1
    ("adaptive", {"name": "adaptive"}),
]

# Budgets: "full" is the committed ORL run (well under 20 min on a shared 2-core CPU), "smoke" the tests.
BUDGETS = {
    "full": {"fr_steps": 120, "eval_steps": 250, "dec_steps": 150, "dec_batch": 16, "dec_width": 8, "mi_steps": 150,
             "bb_iters": 50, "bb_pop": 20},
    "smoke": {"fr_steps": 4, "eval_steps": 4, "dec_steps": 3, "dec_batch": 8, "dec_width": 4, "mi_steps": 3,
              "bb_iters": 2, "bb_pop": 4},
}
CONFIGS = {"orl": "training/configs/orl_cpu.yaml", "lfw": "training/configs/lfw_cpu.yaml"}
SCENARIOS = ("S1", "S2", "S3", "S4")  # THREAT_MODEL.md
SHOW = 4  # faces per defence in the image grid


def signs_of(defence) -> bool:
    return bool(getattr(getattr(defence, "mask", None), "sign_flip", False))


def target_config(split_name: str, label: str, dover: dict, seed: int, budget: dict, out: Path) -> dict:
    over = {
        "name": f"privacy_{split_name}_{label}_s{seed}", "seed": seed, "out_dir": str(out / "fr" / f"{label}"),
        "data": {"size": 56, "crop": None},
        "model": {"arch": "tiny", "embedding": 64, "width": 2.0},
        "defence": dover,
        "train": {"steps": budget["fr_steps"], "progress": False, "eval_every": max(1, budget["fr_steps"] // 6),
                  "log_every": max(1, budget["fr_steps"] // 6), "threads": 1, "batch_size": 40},
    }
    return load_config(project_root() / CONFIGS[split_name], overrides=over)


def load_target(cfg: dict, num_classes: int):
    """Rebuild the trained defence, backbone and head from the loop's checkpoint."""
    defence = build_defence(cfg, 1, torch.device("cpu"), int(cfg["seed"]) * 1000 + 17)
    c_in, s_in = defence.out_shape()
    mc = cfg["model"]
    backbone = build_model(mc["arch"], c_in, s_in, int(mc["embedding"]), float(mc["width"]), float(mc["dropout"]))
    head = MarginHead(int(mc["embedding"]), num_classes, cfg["head"]["type"], cfg["head"]["s"], cfg["head"]["m"])
    step = TrainStep(defence, backbone, head)
    ck = torch.load(Path(cfg["out_dir"]) / CKPT, map_location="cpu", weights_only=False)
    step.load_state_dict(ck["model"])
    return step.eval()


def run(split_name: str = "orl", seed: int = 0, budget: str | dict = "full", out: Path | None = None, defences=None,
        scenarios=SCENARIOS, log=print) -> dict:
    """Returns {"info", "rows": [per defence], "images": {...}} and writes <out>/run.json + images.pt."""
    b = BUDGETS[budget] if isinstance(budget, str) else budget
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one thread is ~5-10x faster than two (measured)
    t0 = time.time()
    from training.results import machine

    mach = {**machine(), "torch_threads": 1}
    out = Path(out or project_root() / "out" / "privacy" / f"{split_name}_s{seed}")
    out.mkdir(parents=True, exist_ok=True)
    split = SPLITS[split_name](seed)
    v = split.num_victims
    log(f"[privacy] {split_name} seed {seed}: {split.info['victim_train']} victim train faces of {v} people, "
        f"{split.info['attacker_images']} attacker faces (other people)")
    ev = train_evaluator(split.victim_train.images, split.victim_train.labels, b["eval_steps"], seed=seed)
    ev_acc = accuracy(ev, split.victim_test.images, split.victim_test.labels)
    log(f"[privacy] evaluation model (clean, independent): held-out accuracy {ev_acc:.3f}")
    vic = split.victim_train
    basis = A.FaceBasis(split.attacker.images)
    targets = torch.arange(v)
    rows, images = [], {"original": to_float(vic.images[:SHOW]), "mi_real": [], "defences": {}}
    first_of = torch.stack([(vic.labels == t).nonzero()[0, 0] for t in range(min(SHOW, v))])
    images["mi_real"] = to_float(vic.images[first_of])
    for label, dover in (defences or DEFENCES):
        t1 = time.time()
        cfg = target_config(split_name, label, dover, seed, b, out)
        res = train(cfg, resume=False, data=split.bundle())
        model = load_target(cfg, v)
        defence = model.defence
        k_dist = None
        if defence.adaptive:
            hist = res["k_hist_last20"] or res["k_hist"]
            k_dist = {int(k): c for k, c in hist.items()}
        acc = float(res["tests"][0]["accuracy"])
        row = {"defence": label, "config": dover, "accuracy": acc, "sign_flip": signs_of(defence),
               "k_mean": res.get("k_mean_last20"), "k_dist": k_dist, "scenarios": {}}
        img = {}
        for sc in scenarios:
            if sc in ("S1", "S2"):
                if sc == "S2" and not signs_of(defence) and "S1" in row["scenarios"]:
                    row["scenarios"]["S2"] = dict(row["scenarios"]["S1"], same_as="S1")  # no sign key to know
                    continue
                dec = A.train_decoder(defence, split.attacker.images, sign_known=sc == "S2", steps=b["dec_steps"],
                                      batch=b["dec_batch"], width=b["dec_width"], seed=seed, k_dist=k_dist)
                shown, rec, tg = A.reconstruct(dec, vic.images, seed=seed, k_dist=k_dist)
                orig = to_float(vic.images[tg])
                lab = vic.labels[tg]
                r = {"ssim": float(M.ssim(rec, orig).mean()), "psnr": float(M.psnr(rec, orig).mean()),
                     **M.identity_leak(ev, rec, orig, lab, seed)}
                img["protected"] = shown[:SHOW]
                img[f"{sc}_target"] = orig[:SHOW]
                img[sc] = rec[:SHOW]
            else:
                dm = A.DefendedModel(defence, model.backbone, model.head, seed)
                if sc == "S3":
                    inv = A.invert_white_box(dm, targets, vic.images.shape[1:], steps=b["mi_steps"], seed=seed)
                else:
                    inv = A.invert_black_box(dm, targets, basis, iters=b["bb_iters"], pop=b["bb_pop"], seed=seed)
                r = {**M.attack_accuracy(ev, inv, targets, to_float(vic.images), vic.labels), "queries": dm.queries}
                img[sc] = inv[:SHOW]
            r["leak"] = M.scenario_leak(r, v)
            row["scenarios"][sc] = r
        leaks = {s: r["leak"] for s, r in row["scenarios"].items()}
        row["score_pp"] = M.score_pp(leaks)
        row["identity_leak"] = 1.0 - row["score_pp"]
        row["score_cls"] = M.score_cls(acc, v)
        row["tradeoff"] = M.tradeoff(row["score_pp"], row["score_cls"])
        row["wall_s"] = time.time() - t1
        rows.append(row)
        images["defences"][label] = img
        s1 = row["scenarios"].get("S1", {})
        log(f"[privacy] {label:12s} acc {acc:.3f}  S1 ssim {s1.get('ssim', float('nan')):.3f} top1 {s1.get('top1', float('nan')):.2f} "
            f"ver {s1.get('verification', float('nan')):.2f}  S3 top1 {row['scenarios'].get('S3', {}).get('top1', float('nan')):.2f}  "
            f"S4 top1 {row['scenarios'].get('S4', {}).get('top1', float('nan')):.2f}  pp {row['score_pp']:.3f} cls {row['score_cls']:.3f} "
            f"({row['wall_s']:.0f} s)")
    info = {"split": split.info, "seed": seed, "machine": mach, "budget": b, "evaluator_accuracy": ev_acc, "wall_s": time.time() - t0,
            "scenarios": list(scenarios)}
    result = {"info": info, "rows": rows}
    (out / "run.json").write_text(json.dumps(result, indent=1, default=str))
    torch.save(images, out / "images.pt")
    result["images"] = images
    return result
