"""YAML configs: defaults, loading, dotted overrides (``--set train.steps=10``)."""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import yaml

# Every key a config may set, with its default. A config file overrides a subset; an unknown key is an
# error (a typo must not silently train the wrong thing).
DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "out_dir": "out/{name}",
    "data": {
        "kind": "orl",  # orl | lfw | imagefolder | recordio | synthetic
        "root": None,  # default: <data root>/orl_faces, <data root>/lfw, required for imagefolder / recordio
        # "grey": C=1, images read as L, frontend color="none" (what ORL / LFW are; no wasted chroma).
        # "rgb": C=3, grey images replicated to 3 identical channels, frontend color="ycbcr" (the published
        # pipeline; on a grey face Cb = Cr = 0, so 2/3 of the channels carry nothing).
        "color": "grey",
        "size": 112,
        "crop": None,  # centre crop (pixels, square) of the source image before resizing to size
        # orl: per-identity split of the 10 images (closed-set identification on held-out images)
        "train_per_id": 6,
        "val_per_id": 1,
        # lfw / imagefolder: identity-disjoint split
        "min_images": 10,  # train identities need at least this many images
        "max_identities": None,
        "max_per_id": None,
        "val_identities": 0.1,  # fraction (or count) of identities held out for the policy's utility term
        "test_identities": 0.0,  # imagefolder without a pair list: identities held out for the test pairs
        "pairs": None,  # lfw: pair list evaluated at the end (default <data root>/lfw_pairsDevTest.txt)
        "bin_sets": [],  # .bin verification sets evaluated at the end (InsightFace format)
        "val_bin": None,  # recordio: a .bin set, not one of bin_sets, subsampled to val_pairs for the policy
        # distinct genuine + impostor pairs drawn from the validation identities (fewer when they hold fewer:
        # all of them, said in results.json; README "What a folder set needs")
        "val_pairs": 300,
        "test_pairs": 1000,  # ... and from the test identities (imagefolder without a pair list)
        "num_workers": 0,
        "flip": True,  # random horizontal flip (drawn from the loop's data generator)
        # synthetic (tests): identities x images of random smooth faces
        "synthetic_ids": 8,
        "synthetic_per_id": 6,
    },
    "defence": {
        "name": "adaptive",  # none | freq | ppfr | partialface | dctdp | instahide | hybrid | adaptive
        "upsample": 1,  # frontend bilinear factor: 8 -> 112x112 channels (published), 1 -> 14x14
        "keep": "no_dc",  # hybrid / adaptive keep preset or ids
        "k": 3,  # instahide / hybrid
        "k_choices": [2, 3, 4, 5, 6],  # adaptive
        "law": "instahide",
        "upper": 0.65,
        "alpha": 1.0,
        "sign_flip": False,  # hybrid / adaptive; instahide always flips
        "drop_lowest": 1,  # ppfr: drop frequencies with u + v < drop_lowest (1: the DC only)
        "partialface_subsets": 6,  # partialface: channels split into this many random subsets
        "partialface_eval": "random",  # random subset at test time, or "all" kept channels
        "dctdp_epsilon": 1.0,  # dctdp: total privacy budget (per kept channel on average)
        "dctdp_sensitivity": 1.0,
        "eval_mix": False,  # mix test faces too (k=1 when False: masked, not mixed)
        "global_partners": False,  # DDP: draw partners from the global batch across ranks
        # Stream-attack options of the mixing defences (issue 15; training/defences.py, privacy/DEFENCES.md):
        "mix_weights": "image",  # image: one weight per partner | frequency: a weight row per DCT frequency
        "noise": "none",  # none | gaussian | laplace: added to every released coefficient after mixing
        "noise_scale": 0.0,  # noise std / scale as a multiple of each frequency's coefficient range
        "partners": "batch",  # batch | pool: partners from a public face pool the client holds
        "self_partner": True,  # false: a partner is never the face itself (fastmix.sample_partners allows it)
        "pool": "lfw",  # partners=pool: which public faces (LFW people with < 10 images)
        "pool_size": 2000,  # ... how many of them
        "sign_key": "coefficient",  # with sign_flip: coefficient (one-time key) | channel | block
    },
    "model": {
        "arch": "small",  # small | iresnet18 | iresnet34 | iresnet50
        "embedding": 128,
        "width": 1.0,
        "dropout": 0.0,
    },
    "head": {"type": "cosface", "s": 32.0, "m": 0.35},
    "train": {
        "steps": 300,
        # the GLOBAL batch, split evenly over the ranks (arcface_torch's batch_size is per GPU: its 128 x 8 GPUs
        # is 1024 here)
        "batch_size": 40,
        "optimizer": "sgd",  # sgd | adamw
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup": 20,
        "schedule": "cosine",  # cosine | constant
        "amp": "bf16",  # bf16 | fp16 | off: autocast of the backbone on CUDA
        "amp_cpu": False,  # ... and on the CPU too (the tests run the AMP path this way)
        "ckpt_every": 0,  # 0: only at the end
        "log_every": 10,
        "eval_every": 50,  # held-out validation (drives the policy's utility term)
        "progress": True,
        "plot": True,  # metrics.png at the end (matplotlib: about 2 s a run; the privacy runs' many small targets skip it)
        "threads": None,
        "device": "auto",  # auto | cpu | cuda
        "max_steps_this_run": None,  # stop after this many steps (to test resume); None: run to the end
    },
    "policy": {
        "mode": "batch",  # batch | sample
        "hidden": 32,
        "lr": 0.01,
        "update_every": 5,  # FR steps between policy steps
        "entropy": 0.01,
        "explore": 0.1,  # exploration floor: k ~ (1 - explore) pi + explore / |K|
        "baseline_momentum": 0.9,
        "loss_momentum": 0.95,
        "target_acc": 0.8,  # utility target on held-out validation
        "penalty": 4.0,  # lambda of the utility term (its starting value and lower bound)
        "penalty_lr": 20.0,  # dual step: lambda += penalty_lr * (target_acc - acc_val) at each validation
        "init": "uniform",
        # The reward's privacy term (policy.py): "loss" (L_mix / L_ema) | "s5_proxy": the client runs S5's informed
        # repeat-average attack on its own stream (training/exposure.py; needs defence.partners: pool) and is
        # rewarded for keeping each face's projected final cosine below proxy_threshold (soft, width
        # proxy_temperature), weighted by privacy_weight against the accuracy term.
        "privacy_signal": "loss",
        "proxy_threshold": 0.95,  # the proxy reads higher than S5 (exact grouping): 0.96 matched S5's 0.9 (ORL)
        "proxy_temperature": 0.01,
        "privacy_weight": 1.0,
    },
    # tta_flip: which accuracy is "accuracy" -- false: the face alone (arcface_torch's "Accuracy"); true: face +
    # mirror image embeddings summed (its headline "Accuracy-Flip"). Both are reported at the end either way.
    "eval": {"batch_size": 100, "tta_flip": False, "folds": 10, "far": 1e-3},
}


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, val in (over or {}).items():
        where = f"{path}{key}"
        if key not in base:
            raise KeyError(f"unknown config key {where!r}")
        if isinstance(base[key], dict):
            if not isinstance(val, dict):
                raise TypeError(f"config key {where!r} must be a mapping")
            out[key] = _merge(base[key], val, where + ".")
        else:
            out[key] = val
    return out


def apply_overrides(cfg: dict, sets: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML: numbers, lists, null)."""
    cfg = copy.deepcopy(cfg)
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise KeyError(f"unknown config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return cfg


# Keys whose value may take a type other than their default's.
OTHER_TYPES = {"defence.keep": (str, list), "out_dir": (str, os.PathLike)}
# Keys whose default is None ("not set"): the type of a value that sets them.
OPTIONAL_TYPES = {"data.root": (str, os.PathLike), "data.crop": (int,), "data.max_identities": (int,),
                  "data.max_per_id": (int,), "data.pairs": (str, os.PathLike), "data.val_bin": (str, os.PathLike),
                  "train.threads": (int,),
                  "train.max_steps_this_run": (int,)}


def _check_types(cfg: dict, base: dict = DEFAULTS, path: str = "") -> None:
    """Each value must have its default's type, so that a typo (``defence.k=abc``, ``seed=1.5``) is an error
    naming the key instead of a run that trains something else. Ints pass where a float is expected, and a
    string that reads as a float is converted: YAML 1.1 reads ``5e-4`` (no dot) as a string."""
    for key, default in base.items():
        where, val = f"{path}{key}", cfg[key]
        if isinstance(default, dict):
            _check_types(val, default, where + ".")
            continue
        if default is None and val is None:
            continue
        want = OPTIONAL_TYPES.get(where) if default is None else OTHER_TYPES.get(where)
        if default is None and want is None:
            continue  # an unlisted optional key takes anything
        if want is not None:
            ok = isinstance(val, want) and not isinstance(val, bool)
        elif isinstance(default, bool):
            ok = isinstance(val, bool)
        elif isinstance(default, int):
            ok = isinstance(val, int) and not isinstance(val, bool)
        elif isinstance(default, float):
            if isinstance(val, str):
                try:
                    val = cfg[key] = float(val)
                except ValueError:
                    pass
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        else:
            ok = isinstance(val, type(default))
        if not ok:
            names = want if want is not None else (float,) if isinstance(default, float) else (type(default),)
            raise TypeError(f"config key {where!r} must be {' or '.join(t.__name__ for t in names)}, "
                            f"got {val!r} ({type(val).__name__})")


def flatten(cfg: dict, path: str = "") -> dict:
    """{"train.steps": 300, ...}: every leaf of a config under its dotted key."""
    out = {}
    for key, val in cfg.items():
        if isinstance(val, dict):
            out.update(flatten(val, f"{path}{key}."))
        else:
            out[f"{path}{key}"] = val
    return out


# What load_config raises for a bad file, key or value: the command lines report these in one line (exit 2).
CONFIG_ERRORS = (KeyError, TypeError, ValueError, OSError, yaml.YAMLError)


def error_text(e: BaseException) -> str:
    """The message of one of CONFIG_ERRORS (str() of a KeyError adds quotes around it)."""
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def check_values(cfg: dict) -> None:
    """Ranges and choices the loop relies on, checked before any data is read (ValueError naming the key).
    The choices of the modules that read them (defence.name, model.arch, ...) come from those modules, and
    are checked here too, so that the command line reports them in one line before any work."""
    from fastmix.samplers import LAWS

    from .data import LOADERS
    from .defences import MIX_WEIGHTS, NAMES, NOISES, PARTNERS, POOLS, SIGN_KEYS
    from .loss import HEADS
    from .model import LAYERS

    flat = flatten(cfg)
    for key, low in (("train.steps", 1), ("train.batch_size", 1), ("train.log_every", 1), ("train.eval_every", 0),
                     ("train.ckpt_every", 0), ("train.warmup", 0), ("train.max_steps_this_run", 1),
                     ("policy.update_every", 1), ("eval.batch_size", 1), ("eval.folds", 2), ("data.size", 8),
                     ("data.num_workers", 0), ("data.min_images", 1), ("data.val_pairs", 0), ("data.test_pairs", 0),
                     ("defence.upsample", 1), ("defence.drop_lowest", 0), ("defence.partialface_subsets", 1),
                     ("defence.k", 1), ("data.train_per_id", 1), ("data.val_per_id", 0), ("data.max_identities", 1),
                     ("data.max_per_id", 1), ("data.val_identities", 0), ("data.test_identities", 0),
                     ("data.synthetic_ids", 1), ("data.synthetic_per_id", 1), ("model.embedding", 1),
                     ("policy.hidden", 1), ("train.threads", 1), ("defence.pool_size", 1)):
        if flat[key] is not None and flat[key] < low:
            raise ValueError(f"config key {key!r} must be >= {low}, got {flat[key]!r}")
    for key, lo, hi in (("eval.far", 0.0, 1.0), ("policy.target_acc", 0.0, 1.0)):
        if not lo <= flat[key] <= hi:
            raise ValueError(f"config key {key!r} must be in [{lo:g}, {hi:g}], got {flat[key]!r}")
    if not 0.0 <= flat["policy.explore"] < 1.0:  # 1 would make the policy's choice irrelevant
        raise ValueError(f"config key 'policy.explore' must be in [0, 1), got {flat['policy.explore']!r}")
    for key, choices in (("train.schedule", ("cosine", "constant")), ("train.optimizer", ("sgd", "adamw")),
                         ("train.amp", ("bf16", "fp16", "off")), ("train.device", ("auto", "cpu", "cuda")),
                         ("defence.name", NAMES), ("defence.mix_weights", MIX_WEIGHTS), ("defence.noise", NOISES),
                         ("defence.partners", PARTNERS), ("defence.sign_key", SIGN_KEYS), ("defence.pool", POOLS), ("defence.law", LAWS), ("defence.partialface_eval", ("random", "all")),
                         ("model.arch", (*LAYERS, "small", "tiny")), ("head.type", HEADS),
                         ("data.kind", tuple(LOADERS)), ("data.color", ("grey", "rgb"))):
        if flat[key] not in choices:
            raise ValueError(f"config key {key!r} must be one of {choices}, got {flat[key]!r}")
    if flat["data.val_bin"] is not None:
        if flat["data.kind"] != "recordio":
            raise ValueError("config key 'data.val_bin' is read for data.kind=recordio only (the other kinds hold "
                             f"out validation identities), got data.kind={flat['data.kind']!r}")
        # The policy steers k by the validation accuracy: pairs it has seen must not be reported as a test.
        if Path(flat["data.val_bin"]).name in {Path(b).name for b in flat["data.bin_sets"] or []}:
            raise ValueError(f"config key 'data.val_bin' must not be one of data.bin_sets (the reported test sets), "
                             f"got {flat['data.val_bin']!r}")
    for key, val in flat.items():
        # NaN passes every range check above (comparisons with it are False) and inf is no setting either;
        # both would surface steps later as NaN losses or an exception far from the key that caused it.
        if isinstance(val, float) and not math.isfinite(val):
            raise ValueError(f"config key {key!r} must be a finite number, got {val!r}")
    # numpy.random.seed takes [0, 2**32) and the loop seeds it with seed + rank (and torch's generators with
    # larger multiples of the seed): a seed outside [0, 2**31) failed at startup or, for torch, on some rank.
    if not 0 <= flat["seed"] < 2**31:
        raise ValueError(f"config key 'seed' must be in [0, 2**31), got {flat['seed']!r}")
    for key in ("train.lr", "policy.lr", "head.s", "model.width", "defence.alpha", "defence.dctdp_epsilon",
                "defence.dctdp_sensitivity"):
        if not flat[key] > 0:
            raise ValueError(f"config key {key!r} must be > 0, got {flat[key]!r}")
    for key in ("train.weight_decay", "policy.entropy", "policy.penalty", "policy.penalty_lr"):
        if flat[key] < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {flat[key]!r}")
    for key in ("train.momentum", "model.dropout", "policy.baseline_momentum", "policy.loss_momentum"):
        if not 0.0 <= flat[key] < 1.0:
            raise ValueError(f"config key {key!r} must be in [0, 1), got {flat[key]!r}")
    if flat["defence.noise_scale"] < 0:
        raise ValueError(f"config key 'defence.noise_scale' must be >= 0, got {flat['defence.noise_scale']!r}")
    if flat["defence.noise"] != "none" and flat["defence.noise_scale"] == 0:  # a noise defence that adds nothing
        raise ValueError(f"config key 'defence.noise_scale' must be > 0 with defence.noise={flat['defence.noise']!r}")
    if not 0.0 < flat["defence.upper"] <= 1.0:  # the largest mixing weight of a face
        raise ValueError(f"config key 'defence.upper' must be in (0, 1], got {flat['defence.upper']!r}")
    # The margin: CosFace subtracts m from a cosine in [-1, 1] (m >= 1 leaves no target logit above any other);
    # ArcFace adds m to an angle in [0, pi] (published 0.5; cos(theta + m) is periodic, so m = 50 was a margin
    # of 50 - 16 pi = -0.27, accepted silently).
    top = 1.0 if flat["head.type"] == "cosface" else math.pi / 2
    if not 0.0 <= flat["head.m"] < top:
        raise ValueError(f"config key 'head.m' must be in [0, {top:.4g}) for head.type={flat['head.type']!r} "
                         f"(published: cosface 0.35, arcface 0.5), got {flat['head.m']!r}")
    if flat["data.crop"] is not None and flat["data.crop"] < 1:  # 0 was read as "no crop", -5 failed in Pillow
        raise ValueError(f"config key 'data.crop' must be >= 1 pixel or null (no crop), got {flat['data.crop']!r}")
    keep = flat["defence.keep"]
    if isinstance(keep, str):
        from fastmix.nn import KEEP_PRESETS

        if keep not in KEEP_PRESETS:
            raise ValueError(f"config key 'defence.keep' must be one of {KEEP_PRESETS} or a list of channel ids, "
                             f"got {keep!r}")
    else:
        # 64 DCT channels per colour plane (data.color: grey 1 plane, rgb 3)
        n_ch = 64 * (1 if flat["data.color"] == "grey" else 3)
        if (not keep or len(set(map(repr, keep))) != len(keep)
                or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_ch for i in keep)):
            raise ValueError(f"config key 'defence.keep' must be a preset or a non-empty list of distinct channel ids "
                             f"in 0..{n_ch - 1} (data.color={flat['data.color']!r}), got {keep!r}")
    from .policy import check_privacy_signal

    check_privacy_signal(cfg["policy"])
    if flat["defence.name"] == "adaptive" and flat["policy.privacy_signal"] == "s5_proxy":
        # the proxy is S5's repeat-average attack on pool partners; on anything else S5 runs other attacks
        if flat["defence.partners"] != "pool":
            raise ValueError("config key 'policy.privacy_signal' = 's5_proxy' models S5 on pool partners: set "
                             f"defence.partners=pool (got {flat['defence.partners']!r}; with batch partners S5's linear "
                             "unmixing recovers ~98 % whatever the proxy says)")
        if flat["defence.sign_flip"]:
            raise ValueError("config key 'policy.privacy_signal' = 's5_proxy' needs defence.sign_flip=false (with sign "
                             "keys S5 clusters |z| instead of averaging the rows: the proxy would not track it)")
    ks = flat["defence.k_choices"]
    # the hybrid mask's k (build_defence checks defence.k the same way); a repeated k would weigh the policy
    if not ks or len(set(ks)) != len(ks) or any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 6 for k in ks):
        raise ValueError(f"config key 'defence.k_choices' must list distinct ints in 1..6, got {ks!r}")


def load_config(path: str | os.PathLike | None = None, sets: list[str] | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- YAML file <- ``overrides`` dict <- ``--set`` strings; values type-checked against the defaults."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f)
        if raw is not None and not isinstance(raw, dict):
            # a file of "- key: value" lines (a list) or a bare scalar: _merge would fail on .items()
            raise ValueError(f"config file {path} must hold a mapping of keys at its top level (name: ..., "
                             f"train: {{steps: ...}}), got a {type(raw).__name__}")
        cfg = _merge(cfg, raw or {})
    if overrides:
        cfg = _merge(cfg, overrides)
    cfg = apply_overrides(cfg, sets)
    _check_types(cfg)
    check_values(cfg)
    cfg["out_dir"] = str(cfg["out_dir"]).format(name=cfg["name"])
    return cfg


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
