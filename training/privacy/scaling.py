"""When does S5's linear unmixing stop? Recovery against the number of distinct training faces N and the
representation's dimension D.

The no-sign hybrid mask's stream is Z = W X with at most 2N sources (faces and mirror images) in D
dimensions. Blind unmixing (PCA + ICA + sparse refinement) needs the sources to be linearly independent in
the stream, so it should work while 2N < D and fail past it; the informed server's identity-level least
squares needs only the V identities' means to be independent (V < D), so it keeps working far past N ~ D/2.
This experiment measures both on LFW faces (thousands of people) with the training loop's stream structure
(epochs of shuffled batches of 40, random flips, partners within the batch, the InstaHide weight law,
DC-free block DCT). D is set by the face size: 32x32 grey faces give 63 channels x 4 x 4 = 1,008 dimensions,
so N can go well past D on a 2-core CPU.

    python -m training.privacy.scaling                   # writes training/privacy/results/scaling.{json,md,png}
    python -m training.privacy.scaling --faces 100 500 1000 --k 2 4 --epochs 10
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastmix
from fastmix.nn import HybridMask
from training.config import project_root
from training.data import CachedFaces, data_root, scan_image_folder, to_float
from training.defences import Masked

from . import stream as S


def lfw_faces(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n LFW faces (centre 128x128 crop, as the privacy splits) at size x size grey, from people with >= 2
    images, whole identities at a time: (n, 1, size, size) uint8 and identity labels (n,)."""
    people = scan_image_folder(data_root() / "lfw")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(people), generator=g).tolist()
    files, labels = [], []
    for i in order:
        name, fs = people[i]
        if len(fs) < 2:
            continue
        take = fs[: min(len(fs), n - len(files))]
        files += take
        labels += [len(set(labels))] * len(take)
        if len(files) >= n:
            break
    faces = CachedFaces.from_files(files, labels, "grey", size, 128)
    return faces.images, faces.labels


def simulate_stream(x: torch.Tensor, labels: torch.Tensor, k: int, epochs: int, batch: int = 40, seed: int = 0) -> S.Stream:
    """The training loop's protected stream of faces x (N, 1, S, S) in [-1, 1]: per epoch a shuffled pass in
    batches, each face flipped with probability 1/2, HybridMask(k, no DC, no signs) within the batch."""
    g = torch.Generator().manual_seed(seed)
    m = HybridMask(k, keep="no_dc", sign_flip=False, upsample=1, color="none", generator=g)
    rec = S.StreamRecorder()
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            rows = perm[i : i + batch]
            xb = x[rows]
            flip = torch.rand(len(rows), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            z, lab, w = m(xb, labels[rows])
            rec(xb, labels[rows], Masked(z, lab, w))
    return rec.stream()


def measure(n: int, k: int, epochs: int, size: int, seed: int = 0, rounds: int = 10) -> dict:
    u8, labels = lfw_faces(n, size, seed)
    n = u8.shape[0]
    x = to_float(u8)
    t0 = time.time()
    st = simulate_stream(x, labels, k, epochs, seed=seed)
    enc = lambda f: fastmix.frontend(f, upsample=1, color="none", keep=list(range(1, 64))).flatten(1)  # noqa: E731
    truth, mirror = enc(x), enc(x.flip(-1))
    d = truth.shape[1]
    t1 = time.time()
    blind = S.unmix_blind(st.z, 2 * n, k, rounds=rounds, ica_iters=100, seed=seed)
    cos_b = S.best_match(blind, truth, mirror)[0]
    t2 = time.time()
    # informed, identity level: each identity's mean appearance over its faces and their mirrors
    v = int(labels.max()) + 1
    w_id = torch.zeros(st.rows, v, dtype=torch.float64).scatter_add_(1, st.labels, st.weights.double())
    means = S.solve_sources(w_id, st.z.double()).float()
    both = torch.cat([truth, mirror])
    lab2 = torch.cat([labels, labels])
    true_means = torch.zeros(v, d).index_add_(0, lab2, both) / torch.bincount(lab2, minlength=v).clamp_min(1).view(-1, 1)
    cos_i = torch.nn.functional.cosine_similarity(means, true_means, dim=1)
    t3 = time.time()
    return {"faces": n, "identities": v, "D": d, "sources_2N": 2 * n, "ratio_2N_over_D": 2 * n / d, "k": k,
            "epochs": epochs, "rows": st.rows, "blind_recovered@0.9": float((cos_b >= 0.9).float().mean()),
            "blind_recovered@0.95": float((cos_b >= 0.95).float().mean()), "blind_cos_median": float(cos_b.median()),
            "identity_means@0.9": float((cos_i >= 0.9).float().mean()), "identity_cos_median": float(cos_i.median()),
            "blind_s": t2 - t1, "informed_s": t3 - t2, "stream_s": t1 - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.privacy.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", nargs="+", type=int, default=[120, 250, 400, 500, 650, 1000, 2000])
    ap.add_argument("--k", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--size", type=int, default=32, help="face size (multiple of 8): D = 63 * (size / 8)^2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.size % 8 or a.size < 8:
        ap.error(f"--size must be a positive multiple of 8, got {a.size}")
    if any(n < 40 for n in a.faces):
        ap.error("--faces: each count must be >= 40 (one batch)")
    torch.set_num_threads(1)
    out = Path(a.out) if a.out else project_root() / "training" / "privacy" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["faces"], r["k"], r["epochs"], r["D"]) for r in rows}
    d = 63 * (a.size // 8) ** 2
    for k in a.k:
        for n in a.faces:
            if (n, k, a.epochs, d) in done:
                continue
            r = measure(n, k, a.epochs, a.size)
            rows.append(r)
            print(f"[scaling] N={r['faces']} (2N/D = {r['ratio_2N_over_D']:.2f}) k={k}: blind {100 * r['blind_recovered@0.9']:.1f} % "
                  f"at cos >= 0.9, identity means {100 * r['identity_means@0.9']:.1f} % ({r['blind_s']:.0f} s)", flush=True)
            path.write_text(json.dumps({"command": "python -m training.privacy.scaling " + " ".join(argv or []), "rows": rows}, indent=1))
    rows.sort(key=lambda r: (r["k"], r["faces"]))
    md = ["| k | N faces | identities | D | 2N / D | stream rows | blind recovered @0.9 % | @0.95 % | informed identity means @0.9 % | blind s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['k']} | {r['faces']} | {r['identities']} | {r['D']} | {r['ratio_2N_over_D']:.2f} | {r['rows']} | "
                  f"{100 * r['blind_recovered@0.9']:.1f} | {100 * r['blind_recovered@0.95']:.1f} | {100 * r['identity_means@0.9']:.1f} | {r['blind_s']:.0f} |")
    (out / "scaling.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in sorted({r["k"] for r in rows}):
        rr = [r for r in rows if r["k"] == k]
        ax.plot([r["ratio_2N_over_D"] for r in rr], [100 * r["blind_recovered@0.9"] for r in rr], "-o", label=f"blind, k={k}")
        ax.plot([r["ratio_2N_over_D"] for r in rr], [100 * r["identity_means@0.9"] for r in rr], "--s", label=f"informed identity means, k={k}")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sources / dimensions (2N / D)")
    ax.set_ylabel("recovered at cosine >= 0.9 (%)")
    ax.set_title("S5 on LFW streams: where rank-based unmixing stops", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
