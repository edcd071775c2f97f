"""Evaluation: verification on identity-disjoint pairs and closed-set identification.

Faces pass through the defence's test-time encoding (``Defence.encode_eval``: masked, not mixed) and the
backbone in eval mode; embeddings are L2-normalised and compared by cosine similarity.

Verification (LFW protocol): the pairs are cut into 10 contiguous folds (dealt round-robin per class
instead when a contiguous fold would hold one class only, as in the ordered View-1 lists); for each fold the
threshold that maximises accuracy on the other 9 is applied to it; accuracy is the mean (and std) over folds; a
pair listed more than once stays in one fold (``assign_folds``). TAR at
FAR = 1e-3: the threshold is the smallest score that accepts at most FAR of the impostor pairs, TAR is the
share of genuine pairs above it. With n impostor pairs the FAR resolution is 1/n (500 impostors in LFW
pairsDevTest: FAR = 1e-3 means no false accept at all); the result reports that resolution.

Identification (ORL): each identity's gallery embedding is the normalised mean of its training images'
embeddings; a probe is assigned to the nearest identity (top-1 accuracy).

Flip test-time augmentation (``eval.tta_flip``, off by default): the embedding of a face plus that of its mirror
image, as arcface_torch's "Accuracy-Flip" (its headline number). The final evaluation reports both
(``accuracy_plain``, ``accuracy_flip``): compare a fastmix number with the published one of the same convention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IdentSet, PairSet, to_float


@torch.no_grad()
def embed_both(backbone, defence, images_u8: torch.Tensor, device, batch: int = 100, seed: int = 0,
               flip: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, S, S) uint8 -> (plain, flip): (N, E) L2-normalised float32 embeddings of the faces, and of the
    sum of the embeddings of each face and its mirror image (None when ``flip`` is False).

    The flip embedding is arcface_torch's "Accuracy-Flip" test-time augmentation (embedding(x) + embedding
    of x flipped left-right, normalised); the plain one is its "Accuracy". The mirror image is encoded with
    the same draws of the defence's test-time randomness as the face (noise, channel subset, sign key), and
    the plain embeddings are the ones a plain-only evaluation gives (the flip pass does not move the stream)."""
    was = backbone.training
    backbone.eval()
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(1_000_003 + seed)  # eval randomness: fixed, apart from training
    plain, both = [], []
    try:
        for i in range(0, images_u8.shape[0], batch):
            x = to_float(images_u8[i : i + batch].to(dev))
            before = g.get_state()
            e = backbone(defence.encode_eval(x, g)).float()
            plain.append(F.normalize(e).cpu())
            if flip:
                after = g.get_state()
                g.set_state(before)
                both.append(F.normalize(e + backbone(defence.encode_eval(x.flip(-1), g)).float()).cpu())
                g.set_state(after)
    finally:
        backbone.train(was)
    if not plain:
        return torch.zeros(0, 1), (torch.zeros(0, 1) if flip else None)
    return torch.cat(plain), (torch.cat(both) if flip else None)


def embed(backbone, defence, images_u8: torch.Tensor, device, batch: int = 100, seed: int = 0, flip: bool = False) -> torch.Tensor:
    """(N, C, S, S) uint8 -> (N, E) L2-normalised float32 embeddings (test-time encoding of the defence);
    ``flip``: the flip-augmented embeddings of ``embed_both``."""
    plain, flipped = embed_both(backbone, defence, images_u8, device, batch, seed, flip)
    return flipped if flip else plain


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """Threshold on cosine scores that maximises accuracy (score > thr means "same"); (thr, accuracy)."""
    s, order = scores.sort()
    y = same[order].float()
    n = y.numel()
    # threshold between s[i-1] and s[i]: pairs < i are "different"; correct = (different below) + (same above)
    neg_below = torch.cat([torch.zeros(1), torch.cumsum(1 - y, 0)])
    pos_above = y.sum() - torch.cat([torch.zeros(1), torch.cumsum(y, 0)])
    acc = (neg_below + pos_above) / n
    # A cut inside a run of equal scores cannot be realised by any threshold (score > thr puts the whole run
    # on one side), so only cuts at the ends and between distinct values compete.
    cut = torch.ones(n + 1, dtype=torch.bool)
    cut[1:n] = s[1:] > s[:-1]
    i = int(torch.where(cut, acc, torch.full_like(acc, -1.0)).argmax())
    lo = s[i - 1] if i > 0 else s[0] - 1e-3
    hi = s[i] if i < n else s[-1] + 1e-3
    return float((lo + hi) / 2), float(acc[i])


def assign_folds(same: torch.Tensor, folds: int, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, bool, int]:
    """(fold of each pair (P,), stratified, repeated pairs) for ``folds`` folds of P pairs.

    Contiguous folds as in the LFW protocol; when one of them would hold one class only (an ordered list such
    as View 1's pairsDevTest, 500 genuine then 500 impostor pairs), each class dealt round-robin instead.
    ``keys`` (P,): equal keys mark one pair listed several times (``PairSet.keys``); every copy goes to the
    fold of its first listing, so a repeated pair never helps choose the threshold applied to its copy."""
    p = same.numel()
    edges = torch.linspace(0, p, folds + 1).round().long().tolist()
    fold = torch.zeros(p, dtype=torch.long)
    for f in range(folds):
        fold[edges[f] : edges[f + 1]] = f
    stratified = any(same[fold == f].all() or not same[fold == f].any() for f in range(folds))
    if stratified:
        for cls in (True, False):
            idx = (same == cls).nonzero().flatten()
            fold[idx] = torch.arange(idx.numel()) % folds
    repeated = 0
    if keys is not None and p:
        _, inverse = torch.unique(keys.long().cpu(), return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), p, dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(p), reduce="amin")  # each key's first listing
        fold = fold[first[inverse]]
        repeated = p - first.numel()
    return fold, bool(stratified), repeated


def verification(scores: torch.Tensor, same: torch.Tensor, folds: int = 10, far: float = 1e-3,
                 keys: torch.Tensor | None = None) -> dict:
    """10-fold accuracy and TAR@FAR of pair scores (P,) with ground truth same (P,) bool; folds by
    ``assign_folds`` (``keys``: repeated pairs kept in one fold)."""
    scores, same = scores.float().cpu(), same.bool().cpu()
    p = scores.numel()
    folds = max(2, min(folds, p))
    fold, stratified, repeated = assign_folds(same, folds, keys)
    accs = []
    for f in range(folds):
        te = fold == f
        if te.sum() == 0:
            continue
        thr, _ = best_threshold(scores[~te], same[~te])
        accs.append(float(((scores[te] > thr) == same[te]).float().mean()))
    acc = torch.tensor(accs)
    imp, gen = scores[~same], scores[same]
    n_imp = imp.numel()
    if n_imp and gen.numel():
        allowed = int(far * n_imp)  # false accepts allowed
        top = imp.sort(descending=True).values
        thr = float(top[allowed]) if allowed < n_imp else float(top[-1]) - 1e-6
        tar = float((gen > thr).float().mean())
    else:
        thr, tar = float("nan"), float("nan")
    return {
        "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()) if acc.numel() > 1 else 0.0, "folds": folds,
        "tar_at_far": tar, "far": far, "far_resolution": 1.0 / max(n_imp, 1), "far_threshold": thr,
        "pairs": p, "genuine": int(gen.numel()), "impostor": n_imp, "folds_stratified": bool(stratified),
        "repeated_pairs": repeated,
    }


def identification(gallery: torch.Tensor, g_labels: torch.Tensor, probe: torch.Tensor, p_labels: torch.Tensor) -> dict:
    """Nearest-class-mean top-1 accuracy of probes (and 1-NN accuracy) against gallery embeddings."""
    classes = torch.unique(g_labels)
    centers = torch.stack([gallery[g_labels == c].mean(0) for c in classes])
    pred = classes[(probe @ F.normalize(centers).t()).argmax(1)]
    nn_pred = g_labels[(probe @ gallery.t()).argmax(1)]
    return {
        "accuracy": float((pred == p_labels).float().mean()),
        "accuracy_1nn": float((nn_pred == p_labels).float().mean()),
        "probes": int(p_labels.numel()), "classes": int(classes.numel()),
    }


def evaluate(task, backbone, defence, device, batch: int = 100, flip: bool = False, folds: int = 10, far: float = 1e-3,
             both: bool = False) -> dict:
    """Evaluate one PairSet (verification) or IdentSet (identification); returns a dict with "accuracy".

    ``flip``: the reported metrics use flip test-time augmentation (``embed_both``). ``both``: report the
    accuracy with and without it as well, "accuracy_plain" and "accuracy_flip" (arcface_torch's "Accuracy"
    and "Accuracy-Flip"), whichever ``flip`` chose for the others."""
    if isinstance(task, PairSet):
        ep, ef = embed_both(backbone, defence, task.images, device, batch, flip=flip or both)

        def score(e):
            return verification((e[0::2] * e[1::2]).sum(1), task.issame, folds, far, task.keys)

        res = {"task": "verification", "set": task.name, **score(ef if flip else ep)}
        if task.requested is not None and res["pairs"] < task.requested:
            res["pairs_requested"], res["pairs_note"] = task.requested, task.note
        if both:
            res["accuracy_plain"] = res["accuracy"] if not flip else score(ep)["accuracy"]
            res["accuracy_flip"] = res["accuracy"] if flip else score(ef)["accuracy"]
        return res
    if isinstance(task, IdentSet):
        gp, gf = embed_both(backbone, defence, task.gallery.images, device, batch, seed=1, flip=flip or both)
        pp, pf = embed_both(backbone, defence, task.probe.images, device, batch, seed=2, flip=flip or both)

        def score(g, p):
            return identification(g, task.gallery.labels, p, task.probe.labels)

        res = {"task": "identification", "set": task.name, **(score(gf, pf) if flip else score(gp, pp))}
        if both:
            res["accuracy_plain"] = res["accuracy"] if not flip else score(gp, pp)["accuracy"]
            res["accuracy_flip"] = res["accuracy"] if flip else score(gf, pf)["accuracy"]
        return res
    raise TypeError(f"cannot evaluate {type(task).__name__}")
