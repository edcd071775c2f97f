"""One run: every scenario (S1-S5) against every defence of the training layer, on one split and seed.

    target FR model per defence   training.loop.train (the training layer's loop, config orl_cpu / lfw_cpu
                                  scaled down: 56x56 faces, the ``tiny`` backbone, few steps), its protected
                                  stream recorded (``tap``) for S5
    judge                         judge.load_judge: pretrained on people who are neither victims nor attackers,
                                  victims enrolled by templates of their training images (a second judge of
                                  another build checks the first)
    S1 / S2                       attacks.train_decoder on the attacker's faces, attacks.reconstruct on victims
    S3 / S4                       inversion.invert_white_box / invert_black_box over the attacker's face prior
    S5                            stream.attack_stream, blind and informed, on the recorded training stream;
                                  S5-test: the deployed model's input (test-time encoding) decoded
Every scenario gives one per-victim success measure (stats.py): the share of the victim's attacked images
the judge identifies at rank 1.
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
from . import inversion as INV
from . import metrics as M
from . import stats as ST
from . import stream as S5
from .data import get_split
from .judge import load_judge, per_identity

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

# Defence variants built to survive S5 (issue 15; measured in DEFENCES.md by sweep_defences): the hybrid mask
# with stream options. Not in the default run; select them by label (--defences pool_k4,...). S5 meets each
# with its adaptations (stream.adapted_attacks).
VARIANT_BASE = {"name": "hybrid", "k": 2, "sign_flip": False}
# The policy of the adaptive S5-proxy variant (tuned on ORL seed 3, a split none of the reported seeds uses, by the
# proxy's own verdict; DEFENCES.md): per face, a policy step every FR step (120 steps give 24 updates at the default
# update_every 5); no exploration floor (every k's reward is simulated, so nothing needs exploring, and a face
# whose k changes from release to release is easier to recover than one at its mean k: the repeat average gains
# more from its low-k rows than it loses on its high-k ones); the accuracy constraint's dual step lowered (the
# default drove lambda to ~16 at the first validation, when ORL's validation accuracy is far below any target at
# this budget, i.e. k_min for every face); threshold 0.95 on the proxy's cosine, which reads higher than S5's
# (exact grouping and debias weight): at fixed k on seed 3 the proxy's share at 0.96 matched S5's at 0.9 for k 3 / 4.
ADAPTIVE_S5_POLICY = {"mode": "sample", "privacy_signal": "s5_proxy", "update_every": 1, "lr": 0.01, "explore": 0.0,
                      "entropy": 0.01, "target_acc": 0.8, "penalty": 1.0, "penalty_lr": 2.0, "proxy_threshold": 0.95,
                      "proxy_temperature": 0.01, "privacy_weight": 1.0}
VARIANTS = {
    # (c) partners never the face itself
    "noself_k2": {**VARIANT_BASE, "self_partner": False},
    # (a) a weight row per frequency
    "freqw_k2": {**VARIANT_BASE, "mix_weights": "frequency", "self_partner": False},
    "freqw_k4": {**VARIANT_BASE, "k": 4, "mix_weights": "frequency", "self_partner": False},
    # (b) mixing + Gaussian noise, std = scale x coefficient range (0.01: noise energy ~0.5 x a face's)
    "noise_g005_k2": {**VARIANT_BASE, "self_partner": False, "noise": "gaussian", "noise_scale": 0.005},
    "noise_g01_k2": {**VARIANT_BASE, "self_partner": False, "noise": "gaussian", "noise_scale": 0.01},
    "noise_g03_k2": {**VARIANT_BASE, "self_partner": False, "noise": "gaussian", "noise_scale": 0.03},
    "noise_l01_k2": {**VARIANT_BASE, "self_partner": False, "noise": "laplace", "noise_scale": 0.01},
    # (c) partners from the client's public pool (InstaHide cross-dataset)
    "pool_k2": {**VARIANT_BASE, "partners": "pool", "pool_size": 2000},
    "pool_k4": {**VARIANT_BASE, "k": 4, "partners": "pool", "pool_size": 2000},
    "pool_k3": {**VARIANT_BASE, "k": 3, "partners": "pool", "pool_size": 2000},
    "pool_k6": {**VARIANT_BASE, "k": 6, "partners": "pool", "pool_size": 2000},
    "pool_noise_g01_k2": {**VARIANT_BASE, "partners": "pool", "pool_size": 2000, "noise": "gaussian", "noise_scale": 0.01},
    "pool_noise_g01_k4": {**VARIANT_BASE, "k": 4, "partners": "pool", "pool_size": 2000, "noise": "gaussian", "noise_scale": 0.01},
    "pool_noise_g02_k4": {**VARIANT_BASE, "k": 4, "partners": "pool", "pool_size": 2000, "noise": "gaussian", "noise_scale": 0.02},
    "pool_noise_g005_k4": {**VARIANT_BASE, "k": 4, "partners": "pool", "pool_size": 2000, "noise": "gaussian", "noise_scale": 0.005},
    "pool_noise_g01_k3": {**VARIANT_BASE, "k": 3, "partners": "pool", "pool_size": 2000, "noise": "gaussian", "noise_scale": 0.01},
    "pool_noise_g015_k3": {**VARIANT_BASE, "k": 3, "partners": "pool", "pool_size": 2000, "noise": "gaussian", "noise_scale": 0.015},
    # (d) sign keys per row and channel / block
    "signch_k2": {**VARIANT_BASE, "self_partner": False, "sign_flip": True, "sign_key": "channel"},
    "signblk_k2": {**VARIANT_BASE, "self_partner": False, "sign_flip": True, "sign_key": "block"},
    # combinations
    "pool_freqw_k2": {**VARIANT_BASE, "partners": "pool", "pool_size": 2000, "mix_weights": "frequency"},
    "pool_freqw_noise01_k2": {**VARIANT_BASE, "partners": "pool", "pool_size": 2000, "mix_weights": "frequency",
                              "noise": "gaussian", "noise_scale": 0.01},
    # (issue 15, item 2) the adaptive hybrid mask on pool partners, k per face from the strategy network whose
    # privacy reward is the client's own run of S5's informed repeat-average attack (training/exposure.py);
    # "policy": the policy overrides of the run (target_config), not a defence key
    "adaptive_s5_pool": {"name": "adaptive", "k_choices": [2, 3, 4, 5, 6], "sign_flip": False, "partners": "pool",
                         "pool_size": 2000, "policy": ADAPTIVE_S5_POLICY},
    # ... a stricter operating point: the proxy's threshold at 0.93
    "adaptive_s5_pool_t93": {"name": "adaptive", "k_choices": [2, 3, 4, 5, 6], "sign_flip": False, "partners": "pool",
                             "pool_size": 2000, "policy": {**ADAPTIVE_S5_POLICY, "proxy_threshold": 0.93}},
}


# Budgets: "full" is the committed run, "smoke" the tests and the pipeline check (minutes). The inversion and
# judge budgets carry the same names (inversion.BUDGETS, judge.CNN_BUDGETS / LDA_BUDGETS).
BUDGETS = {
    "full": {"fr_steps": 120, "dec_steps": 150, "dec_batch": 16, "dec_width": 8, "s5_rounds": 20, "name": "full"},
    "smoke": {"fr_steps": 4, "dec_steps": 3, "dec_batch": 8, "dec_width": 4, "s5_rounds": 2, "name": "smoke"},
}
CONFIGS = {"orl": "training/configs/orl_cpu.yaml", "lfw": "training/configs/lfw_cpu.yaml"}
SCENARIOS = ("S1", "S2", "S3", "S4", "S5")  # THREAT_MODEL.md
SHOW = 4  # faces per defence in the image grid
# (name in the results, judge kind): "judge" is the reported one; the others check it (report.judge_agreement
# compares judge2). The reported judge is cnn2, the one that still recognises degraded faces (attack outputs are
# blurred or noisy: ORL s0 clean faces down/up-sampled x4, rank-1 cnn2 0.89 vs cnn 0.47; noise sd 0.2: 0.80 vs
# 0.31), so it does not read a blurry reconstruction as privacy; lda, the weakest, is kept for information.
JUDGES = (("judge", "cnn2"), ("judge2", "cnn"), ("judge3", "lda"))


def signs_of(defence) -> bool:
    return bool(getattr(getattr(defence, "mask", None), "sign_flip", False))


BATCH = 40  # the training configs' batch; a smaller face set trains on batches of all its faces


def target_config(split_name: str, label: str, dover: dict, seed: int, budget: dict, out: Path, train_faces: int = BATCH,
                  size: int = 56) -> dict:
    dover = dict(dover)
    policy = dover.pop("policy", None)  # a variant's policy overrides (adaptive_s5_pool), beside its defence keys
    over = {
        "name": f"privacy_{split_name}_{label}_s{seed}", "seed": seed, "out_dir": str(out / "fr" / f"{label}"),
        "data": {"size": size, "crop": None},
        "model": {"arch": "tiny", "embedding": 64, "width": 2.0},
        "defence": dover,
        "train": {"steps": budget["fr_steps"], "progress": False, "plot": False, "eval_every": max(1, budget["fr_steps"] // 6),
                  "log_every": max(1, budget["fr_steps"] // 6), "threads": 1, "batch_size": min(BATCH, train_faces)},
    }
    if policy:
        over["policy"] = dict(policy)
    return load_config(project_root() / CONFIGS.get(split_name, CONFIGS["orl"]), overrides=over)  # folder sets: grey, as ORL


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


def _judged(judge, images: torch.Tensor, labels: torch.Tensor, v: int) -> list[float]:
    """Per-victim success (V,): the share of the victim's attacked images the judge puts at rank 1."""
    return [float(x) for x in per_identity(judge.hits(images, labels, 1), labels, v).tolist()]


def _scored(judges: dict, images, labels, v: int, gallery=None) -> dict:
    """Per-victim rank-1 success under every judge ("judge" is the reported one) and, with a gallery (the
    victims' held-out images, never an attacked image's source), the reported judge's TAR at FAR 1%."""
    r = {}
    for name, j in judges.items():
        per = _judged(j, images, labels, v)
        key = "" if name == "judge" else f"_{name}"
        r[f"per_victim{key}"] = per
        r[f"rank1{key}"] = float(torch.tensor(per).nanmean())
        r[f"leak{key}"] = ST.leak_of(r[f"rank1{key}"], v)
    if gallery is not None:
        ver = judges["judge"].verify(images, labels, gallery[0], gallery[1], far=0.01)
        r.update({"tar@far1%": ver["tar"], "auc": ver["auc"]})
    return r


def _decoder_key(defence) -> tuple:
    """Which S5 decoder serves a defence: one per method, keep set and input scale (DCTDP's 1/128); the
    sign-clustering decoder also learns the defence's own k and weight law, so it is per defence."""
    method = S5.method_of(defence)
    scale = defence.name if method == "sign_clusters" else ("dctdp" if defence.name == "dctdp" else "-")
    return (method, scale, tuple(defence.ids or ()))


def _unmixed_decoder(defence, decoders: dict, attacker_u8, b: dict, seed: int):
    """The unmixed-space decoder (cached like S5's): decodes sources of a sign-key defence after its signs
    were canonicalised (``stream.adapted_attacks``)."""
    key = ("linear_unmixing", "-", tuple(defence.ids or ()))
    if key not in decoders:
        decoders[key] = S5.train_unmixed_decoder(defence, attacker_u8, steps=b["dec_steps"], batch=b["dec_batch"],
                                                 width=b["dec_width"], seed=seed)
    return decoders[key]


def _stream_attack(defence, dover, stream, n_rows, faces, labels, decoders, attacker_u8, b, seed, judges, v, gallery, log):
    """S5 blind and informed on one recorded stream: recovery (share of victim training faces at cosine
    >= 0.9 / 0.95 in the unmixed space) and the judge's verdict on the recovered faces. A defence with stream
    options (``dover``: per-frequency weights, noise, pool partners, sign keys per channel / block) also meets
    S5's adaptations to them (``stream.adapted_attacks``); per face, the best candidate of all counts."""
    method = S5.method_of(defence)
    key = _decoder_key(defence)
    if key not in decoders:
        t = time.time()
        kw = dict(steps=b["dec_steps"], batch=b["dec_batch"], width=b["dec_width"], seed=seed)
        decoders[key] = (S5.train_abs_decoder(defence, attacker_u8, **kw) if method == "sign_clusters"
                         else S5.train_unmixed_decoder(defence, attacker_u8, **kw))
        log(f"    S5 decoder for {key[0]} / {key[1]} trained in {time.time() - t:.0f} s")
    dec = decoders[key]
    out = {"method": method}
    shared: dict = {}
    results = {}
    for variant in ("blind", "informed"):
        t = time.time()
        results[variant] = S5.attack_stream(defence, stream, n_rows, variant, seed=seed, rounds=b["s5_rounds"], cache=shared,
                                             abs_decoder=dec if method == "sign_clusters" else None)
        results[variant]["wall_s"] = time.time() - t
    adapted = {"blind": [], "informed": []}
    if any(dover.get(o, d) != d for o, d in (("mix_weights", "image"), ("noise", "none"), ("partners", "batch"),
                                             ("sign_key", "coefficient"))):
        t = time.time()
        for name, variant, src in S5.adapted_attacks(defence, dover, stream, n_rows, to_float(attacker_u8), seed=seed,
                                                     rounds=b["s5_rounds"], cache=shared):
            adapted[variant].append(src)
        log(f"    S5 adapted to {', '.join(o for o in ('mix_weights', 'noise', 'partners', 'sign_key') if o in dover)} "
            f"({time.time() - t:.0f} s)")
    for variant in ("blind", "informed"):
        res = results[variant]
        # the informed server also runs every blind attack
        extra = adapted["blind"] + (adapted["informed"] if variant == "informed" else [])
        if res["sources"] is not None:
            m = S5.match_victims(defence, {"sources": torch.cat([res["sources"], *extra])}, faces, dec)
        else:  # sign clusters: decoded images; adapted sources (canonical signs) are in the unmixed space
            m = S5.match_victims(defence, res, faces, None)
            if extra:
                m2 = S5.match_victims(defence, {"sources": torch.cat(extra)}, faces, _unmixed_decoder(defence, decoders, attacker_u8, b, seed))
                take = m2["cos"] > m["cos"]
                m = {"cos": torch.where(take, m2["cos"], m["cos"]),
                     "images": torch.where(take.view(-1, 1, 1, 1), m2["images"], m["images"])}
        r = {**S5.recovery(m["cos"]), "per_face_cos": [round(float(c), 4) for c in m["cos"]],
             **_scored(judges, m["images"], labels, v, gallery), "wall_s": res["wall_s"]}
        out[variant] = r
        out.setdefault("images", m["images"][:SHOW])
        out.setdefault("attacked", {})[f"S5/{variant}"] = (m["images"], labels, True)
        log(f"    S5 {variant:8s} {method}: recovered {100 * r['recovered@0.9']:.1f} % at cos >= 0.9, "
            f"{100 * r['recovered@0.95']:.1f} % at 0.95; judge rank-1 {100 * r['rank1']:.1f} % ({r['wall_s']:.0f} s)")
    return out


def _test_time(defence, decoders, dec_s1, test_u8, labels, seed, judges, v, gallery):
    """S5-test: what the deployed model receives (the defence's test-time encoding of a query, fresh keys /
    noise / subsets) decoded by the attacker: the S1 decoder for unmixed defences, the unmixed-space decoder
    of S5 for mixing ones (a query is masked, not mixed)."""
    g = torch.Generator().manual_seed(30_000 + seed)
    x = to_float(test_u8)
    with torch.no_grad():
        z = defence.encode_eval(x, g)
        if defence.name == "none":
            rec = z
        elif getattr(defence, "mixes", False):
            dec = decoders.get(_decoder_key(defence))
            if dec is None:
                return None
            # a sign-flipping defence's query is decoded from its key-free magnitudes, as its S5 clusters are
            rec = S5.decode_sources(defence, dec, (z.abs() if S5.method_of(defence) == "sign_clusters" else z).flatten(1))
        else:
            rec = dec_s1(A.Protected(z, torch.arange(len(x)), None)) if dec_s1 is not None else None
    if rec is None:
        return None, None
    return _scored(judges, rec, labels, v, gallery), rec


def _combine_s5(r: dict, v: int) -> None:
    """S5's success per victim: the stronger of blind and informed (the server may run both), per judge."""
    for key in [k for k in r["blind"] if k.startswith("per_victim")]:
        r[key] = [max(a, c) for a, c in zip(r["blind"][key], r["informed"][key])]
        suffix = key[len("per_victim"):]
        r[f"rank1{suffix}"] = float(torch.tensor(r[key]).nanmean())
        r[f"leak{suffix}"] = ST.leak_of(r[f"rank1{suffix}"], v)


def _summarise(row: dict, v: int) -> None:
    """A defence's worst-case leak over its scenarios (per judge), and its score / trade-off."""
    leaks = {s: r["leak"] for s, r in row["scenarios"].items()}
    row["score_pp"] = M.score_pp(leaks)
    row["identity_leak"] = 1.0 - row["score_pp"]
    for name, _ in JUDGES[1:]:
        row[f"identity_leak_{name}"] = max((r.get(f"leak_{name}", 0.0) for r in row["scenarios"].values()),
                                           default=float("nan"))
    row["score_cls"] = M.score_cls(row["accuracy"], v)
    row["tradeoff"] = M.tradeoff(row["score_pp"], row["score_cls"])


def save_attacked(attacked: dict, path: Path) -> None:
    """Every image an attack produced (float16, 56x56: ~6 KB each) with its victim labels, so a new or changed
    judge re-grades a finished run (``rescore``) instead of re-running its training and attacks."""
    torch.save({k: {"images": im.detach().to(torch.float16), "labels": lab.to(torch.int32), "gallery": gal}
                for k, (im, lab, gal) in attacked.items()}, path)


JUDGE_SIZE = 56  # the judges' input (judge.py); attacked images of another size are area-resampled to it


class _AtJudgeSize:
    """A judge seen through area resampling of its probes to ``JUDGE_SIZE`` (the 112x112 geometry check
    grades its attacks with the same judges as the 56x56 runs; enrollment uses the 56x56 faces)."""

    def __init__(self, judge):
        self.judge = judge

    @staticmethod
    def _r(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == JUDGE_SIZE:
            return x
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        return torch.nn.functional.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="area")

    def hits(self, x, labels, k: int = 1):
        return self.judge.hits(self._r(x), labels, k)

    def verify(self, recon, recon_labels, gallery, gallery_labels, **kw):
        return self.judge.verify(self._r(recon), recon_labels, gallery, gallery_labels, **kw)


def _judges_for(split, bname: str, work: Path, log=print):
    """The judges (``JUDGES``), each enrolling the victims from their held-out (val + test) images, and what
    they score on the victims' clean training faces."""
    vic = split.victim_train
    v = split.num_victims
    # The judge enrolls every victim from images that no attack reconstructs and the FR model never trained on
    # (validation + test images); the attacked images (training faces, and the identities S3 / S4 invert) are
    # probes only, so a reconstruction is never compared with its own source image. Verification's genuine
    # pairs are a reconstruction and these other images of the same person.
    held = (torch.cat([split.victim_val.images, split.victim_test.images]),
            torch.cat([split.victim_val.labels, split.victim_test.labels]))
    gallery = (to_float(held[0]), held[1])
    judges, judge_info = {}, {}
    for name, kind in JUDGES:
        j = load_judge(split, kind, bname, 0, work, log=log)
        j.enroll(*held)
        h1, h5 = j.hits(vic.images, vic.labels, 1), j.hits(vic.images, vic.labels, 5)
        judge_info[name] = {**{k: j.info.get(k) for k in ("kind", "pool", "pool_people", "pool_images", "train_s", "cached")},
                            "rank1": float(h1.mean()), "rank5": float(h5.mean()),
                            "per_victim": _judged(j, vic.images, vic.labels, v)}
        judges[name] = _AtJudgeSize(j)
        log(f"[privacy] {name} ({kind}, pool {j.info.get('pool')}): clean rank-1 of the victims' training faces against "
            f"templates of their held-out faces {100 * judge_info[name]['rank1']:.1f} % (rank-5 {100 * judge_info[name]['rank5']:.1f} %)")
    return judges, judge_info, gallery


def rescore(rdir: Path, split_name: str, seed: int, budget: str = "full", work: Path | None = None, log=print) -> dict:
    """Re-grade a finished run (``<rdir>/run.json``) with the current judges from the attacked images it stored
    (``rows/<label>.attacked.pt``): every judge-dependent number is recomputed, nothing is retrained or
    re-attacked. Raises FileNotFoundError naming the first defence whose images were not stored (runs made
    before images were kept must be run again)."""
    rdir = Path(rdir)
    work = Path(work or project_root() / "out" / "privacy")
    res = json.loads((rdir / "run.json").read_text())
    missing = [r["defence"] for r in res["rows"] if not (rdir / "rows" / f"{r['defence']}.attacked.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"{rdir}: no stored attacked images for {missing[0]!r} ({len(missing)} defences): "
                                f"this run predates them; run it again (python -m training.privacy without --reuse)")
    torch.set_num_threads(1)
    split = get_split(split_name, seed, JUDGE_SIZE)  # enrollment and clean rank-1 at the judges' size
    v = split.num_victims
    judges, judge_info, gallery = _judges_for(split, budget, work, log)
    for row in res["rows"]:
        att = torch.load(rdir / "rows" / f"{row['defence']}.attacked.pt", weights_only=False)
        for path, a in att.items():
            sc, _, variant = path.partition("/")
            r = row["scenarios"][sc] if not variant else row["scenarios"][sc][variant]
            im, lab = a["images"].float(), a["labels"].long()
            r.update(_scored(judges, im, lab, v, gallery if a["gallery"] else None))
            if sc in ("S3", "S4"):
                r["top5"] = float(judges["judge"].hits(im, lab, 5).mean())
        if "S2" in row["scenarios"] and row["scenarios"]["S2"].get("same_as") == "S1":
            row["scenarios"]["S2"] = dict(row["scenarios"]["S1"], same_as="S1")
        if "S5" in row["scenarios"]:
            _combine_s5(row["scenarios"]["S5"], v)
        _summarise(row, v)
    res["info"]["judges"] = judge_info
    res["info"]["rescored"] = {"judges": [k for _, k in JUDGES], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (rdir / "run.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def run(split_name: str = "orl", seed: int = 0, budget: str | dict = "full", out: Path | None = None, defences=None,
        scenarios=SCENARIOS, log=print, work: Path | None = None, resume: bool = False, size: int = 56) -> dict:
    """Returns {"info", "rows": [per defence], "images": {...}} and writes <out>/run.json + images.pt.

    ``work``: where the judges and face priors are cached (trained once per set; default out/privacy).
    Every finished defence is saved at once as <out>/rows/<label>.json (+ .pt images); ``resume`` takes those
    back when they answer the same request (config, budget, scenarios), so an interrupted seed loses at most
    the defence under way."""
    b = BUDGETS[budget] if isinstance(budget, str) else budget
    bname = b.get("name", "full")
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one thread is ~5-10x faster than two (measured)
    t0 = time.time()
    from training.results import machine

    mach = {**machine(), "torch_threads": 1}
    out = Path(out or project_root() / "out" / "privacy" / f"{split_name.replace(':', '_').replace('/', '_')}_s{seed}")
    work = Path(work or project_root() / "out" / "privacy")
    out.mkdir(parents=True, exist_ok=True)
    split = get_split(split_name, seed, size)
    v = split.num_victims
    log(f"[privacy] {split_name} seed {seed} ({size}x{size}): {split.info['victim_train']} victim train faces of {v} people, "
        f"{split.info['attacker_images']} attacker faces (other people)")
    vic = split.victim_train
    # the judges grade at their own size: enrolled from the same files at JUDGE_SIZE, probes resampled
    judges, judge_info, gallery = _judges_for(split if size == JUDGE_SIZE else get_split(split_name, seed, JUDGE_SIZE),
                                              bname, work, log)
    ib = INV.budget_of(bname)
    # PCA (160 eigenfaces) of the attacker's faces plus public LFW faces of people who are neither victims nor in
    # the judge pool (inversion.attack_prior): undefended S3 top-1 ORL 0.44 / LFW 0.45 against 0.33 / 0.41 with
    # the attacker's faces alone (5 / 3 seeds, the fixed-pool CNN judge; inversion.calibrate)
    # Fitted only for the scenarios that search it (S3 / S4): at 112x112 the eigenfaces of ~2,800 faces are an
    # SVD of minutes on one thread, which a run of S1 / S2 / S5 alone must not pay.
    prior = (INV.attack_prior(split, work=work, seed=seed, steps=ib["vae_steps"], log=log)  # steps: the VAE's, if it is the prior
             if {"S3", "S4"} & set(scenarios) else None)
    targets = torch.arange(v)
    rows, images = [], {"original": to_float(vic.images[:SHOW]), "mi_real": [], "defences": {}}
    first_of = torch.stack([(vic.labels == t).nonzero()[0, 0] for t in range(min(SHOW, v))])
    images["mi_real"] = to_float(vic.images[first_of])
    faces = to_float(vic.images)
    decoders: dict = {}
    (out / "rows").mkdir(exist_ok=True)
    for label, dover in (defences or DEFENCES):
        t1 = time.time()
        saved = out / "rows" / f"{label}.json"
        if resume and saved.is_file():
            prev = json.loads(saved.read_text())
            if prev.get("request") == {"config": dover, "budget": b, "scenarios": list(scenarios)}:
                rows.append(prev["row"])
                images["defences"][label] = torch.load(saved.with_suffix(".pt"), weights_only=False)
                log(f"[privacy] {label}: reusing {saved}")
                continue
        cfg = target_config(split_name, label, dover, seed, b, out, len(vic), size)
        rec_stream = S5.StreamRecorder() if "S5" in scenarios else None
        res = train(cfg, resume=False, data=split.bundle(), tap=rec_stream)
        if res.get("stopped_early"):
            # Ctrl-C / SIGTERM: the training loop stopped at a step boundary. The defences finished before
            # it are saved under rows/; this one is trained again from the start on resume.
            raise KeyboardInterrupt(f"privacy run {split_name} seed {seed} stopped while training {label!r} "
                                    f"(step {res.get('step')}); the finished defences are kept in {out / 'rows'}: "
                                    f"rerun the same command with --reuse to go on from there")
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
        attacked = {}  # scenario path -> (every attacked image, its victim labels, verified against the gallery)
        dec_s1 = None
        for sc in scenarios:
            if sc in ("S1", "S2"):
                if sc == "S2" and not signs_of(defence) and "S1" in row["scenarios"]:
                    row["scenarios"]["S2"] = dict(row["scenarios"]["S1"], same_as="S1")  # no sign key to know
                    continue
                dec = A.train_decoder(defence, split.attacker.images, sign_known=sc == "S2", steps=b["dec_steps"],
                                      batch=b["dec_batch"], width=b["dec_width"], seed=seed, k_dist=k_dist)
                if sc == "S1":
                    dec_s1 = dec
                shown, rec, tg = A.reconstruct(dec, vic.images, seed=seed, k_dist=k_dist)
                orig = to_float(vic.images[tg])
                lab = vic.labels[tg]
                r = {"ssim": float(M.ssim(rec, orig).mean()), "psnr": float(M.psnr(rec, orig).mean()),
                     **_scored(judges, rec, lab, v, gallery)}
                attacked[sc] = (rec, lab, True)
                img["protected"] = shown[:SHOW]
                img[f"{sc}_target"] = orig[:SHOW]
                img[sc] = rec[:SHOW]
            elif sc in ("S3", "S4"):
                dm = A.DefendedModel(defence, model.backbone, model.head, seed)
                for p in dm.parameters():
                    p.requires_grad_(False)
                if sc == "S3":
                    inv = INV.invert_white_box(dm, targets, prior, steps=ib["wb_steps"], candidates=ib["wb_candidates"],
                                               lr=ib["wb_lr"], init_pool=ib["init_pool"], seed=seed)
                else:
                    inv = INV.invert_black_box(dm, targets, prior, iters=ib["bb_iters"], pop=ib["bb_pop"],
                                               candidates=ib["bb_candidates"], sigma=ib["bb_sigma"], lr=ib["bb_lr"],
                                               init_pool=ib["init_pool"], seed=seed)
                with torch.no_grad():
                    own = INV.target_top1(dm, inv.images, targets)
                r = {**_scored(judges, inv.images, targets, v), "target_top1": float(own.float().mean()),
                     "top5": float(judges["judge"].hits(inv.images, targets, 5).mean()), "queries": inv.queries,
                     "wall_s": inv.wall_s}
                attacked[sc] = (inv.images, targets, False)
                img[sc] = inv.images[:SHOW]
            else:  # S5
                bs = int(cfg["train"]["batch_size"])  # an epoch is its whole batches (the sampler drops the rest)
                s5 = _stream_attack(defence, dover, rec_stream.stream(), len(vic) // bs * bs, faces, vic.labels, decoders,
                                    split.attacker.images, b, seed, judges, v, gallery, log)
                img["S5"] = s5.pop("images")
                attacked.update(s5.pop("attacked"))
                test, test_rec = _test_time(defence, decoders, dec_s1, vic.images, vic.labels, seed, judges, v, gallery)
                if test_rec is not None:
                    attacked["S5/test_time"] = (test_rec, vic.labels, True)
                r = {"blind": s5["blind"], "informed": s5["informed"], "test_time": test, "method": s5["method"]}
                _combine_s5(r, v)
            row["scenarios"][sc] = r
        _summarise(row, v)
        row["wall_s"] = time.time() - t1
        rows.append(row)
        images["defences"][label] = img
        torch.save(img, saved.with_suffix(".pt"))
        save_attacked(attacked, out / "rows" / f"{label}.attacked.pt")
        saved.write_text(json.dumps({"request": {"config": dover, "budget": b, "scenarios": list(scenarios)}, "row": row},
                                    default=str))
        sc_ = row["scenarios"]
        log(f"[privacy] {label:12s} acc {acc:.3f}  leak " + "  ".join(f"{k} {x['leak']:.2f}" for k, x in sc_.items())
            + (f"  S5 blind rec@0.9 {sc_['S5']['blind']['recovered@0.9']:.2f} informed {sc_['S5']['informed']['recovered@0.9']:.2f}" if "S5" in sc_ else "")
            + f"  worst {row['identity_leak']:.3f} ({row['wall_s']:.0f} s)")
    info = {"split": split.info, "seed": seed, "size": size, "machine": mach, "budget": b, "judges": judge_info,
            "wall_s": time.time() - t0, "scenarios": list(scenarios),
            "victims": v}
    result = {"info": info, "rows": rows}
    (out / "run.json").write_text(json.dumps(result, indent=1, default=str))
    torch.save(images, out / "images.pt")
    result["images"] = images
    return result


def run_logged(split_name: str, tag: str, seed: int, budget: str, out: Path, defences, scenarios, work: Path,
               resume: bool, size: int = 56) -> str:
    """``run`` in a worker process (``python -m training.privacy --jobs N``): its log lines carry the set and
    seed, since runs interleave. Lives here, not in __main__, so a spawned worker can import it."""
    prefix = f"[{tag} s{seed}]"

    def log(msg):
        print(f"{prefix} {msg}", flush=True)

    t = time.time()
    run(split_name, seed, budget, out, defences, scenarios, log=log, work=work, resume=resume, size=size)
    return f"{prefix} finished in {(time.time() - t) / 60:.1f} min"
