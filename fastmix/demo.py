"""fastmix's main job on a built-in default: mask real faces, draw what the mask does, time every backend.

    python -m fastmix.demo [--out DIR] [--batch 16] [--repeats 3]

Faces come from scikit-image, which ships them inside its wheel (no download): the astronaut
(``skimage.data.astronaut()``, NASA portrait of Eileen Collins, RGB, cropped to the face) and the faces of
``skimage.data.lfw_subset()`` (25x25 grey crops of Labeled Faces in the Wild; grey replicated to 3 channels
for the YCbCr front-end). All are resized to 112x112 and scaled to [-1, 1].

It writes DIR/fastmix_demo.png (default DIR: ./out): one row per k = 2..6 of the HybridMask (fused frontend:
bilinear x8 -> YCbCr -> 8x8 DCT -> k-way mix -> DC dropped -> sign flip), columns = the original face,
four of the 189 masked frequency channels, ``frontend_inverse`` of the masked channels (what an observer
without the key sees), and ``frontend_inverse`` of the same mix without the sign flip (what the mix alone
would leak). Then it prints a throughput table (ms per batch, images/s) for every backend that
``fastmix.available_backends()`` lists on this machine.

scikit-image and matplotlib are imported only here, lazily: ``pip install scikit-image matplotlib pillow``
(or ``bash scripts/demo.sh``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import fastmix
from fastmix.nn import HybridMask, keep_ids

SIZE = 112
UPSAMPLE = 8
KS = (2, 3, 4, 5, 6)
# Channels drawn in the grid: (label, channel id = colour*64 + u*8 + v).
SHOW = (("Y (0,1)", 1), ("Y (1,0)", 8), ("Y (1,1)", 9), ("Cr (0,1)", 129))
ASTRONAUT_FACE = (slice(30, 200), slice(145, 315))  # rows, cols of the face in the 512x512 portrait


PACKAGES = {"skimage": "scikit-image", "matplotlib": "matplotlib"}


def _need(module: str):
    """Import an optional demo dependency, or exit with the command that installs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        top = module.split(".")[0]
        raise SystemExit(
            f"fastmix.demo needs {PACKAGES.get(top, top)} ({exc}). Install the demo extras:\n"
            "    pip install scikit-image matplotlib pillow\n"
            "or run the one-command setup: bash scripts/demo.sh"
        ) from None


def load_faces(n: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 112, 112) faces in [-1, 1]: the astronaut first, then LFW faces; and their names."""
    data = _need("skimage.data")
    astro = torch.from_numpy(data.astronaut()[ASTRONAUT_FACE].copy()).permute(2, 0, 1).float() / 255.0
    faces = [F.interpolate(astro[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)]
    names = ["astronaut"]
    lfw = torch.from_numpy(data.lfw_subset()[:100]).float()  # the first 100 are faces, the rest are not
    need = max(n - 1, 0)
    if need:
        reps = -(-need // lfw.shape[0])
        grey = lfw.repeat(reps, 1, 1)[:need, None]  # (need, 1, 25, 25) in [0, 1]
        up = F.interpolate(grey, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        faces.append(up.expand(-1, 3, -1, -1))
        names += [f"lfw_subset[{i % lfw.shape[0]}]" for i in range(need)]
    x = torch.cat(faces)[:n].clamp(0, 1) * 2 - 1
    return x.contiguous(), names[:n]


def _to_rgb(img: torch.Tensor):
    """(3, H, W) in [-1, 1] -> (H, W, 3) numpy in [0, 1]."""
    return ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def _inverse(z: torch.Tensor, keep) -> torch.Tensor:
    """frontend_inverse at the upsampled resolution, shrunk to 2x the face size for display.

    Not the default size=None: that area-averages 8x8 pixel squares, which are exactly the DCT blocks at
    upsample 8, so it keeps only each block's DC, and with the DC dropped it is a flat grey image.
    """
    img = fastmix.frontend_inverse(z, upsample=UPSAMPLE, keep=keep, size="upsampled")
    return F.interpolate(img, size=(2 * SIZE, 2 * SIZE), mode="bilinear", antialias=True)[0]


def draw_grid(x: torch.Tensor, path: str, seed: int = 0) -> None:
    """One row per k: original | 4 masked channels | inverse (masked) | inverse (mix without sign flip)."""
    mpl = _need("matplotlib")
    mpl.use("Agg")
    plt = _need("matplotlib.pyplot")
    n = x.shape[0]
    labels = torch.arange(n)  # identity labels: the returned partner labels are the partner indices
    keep = keep_ids("no_dc", 3)
    cols = 1 + len(SHOW) + 2
    fig, axes = plt.subplots(len(KS), cols, figsize=(1.9 * cols, 2.0 * len(KS)), squeeze=False)
    for row, k in enumerate(KS):
        mask = HybridMask(k, keep="no_dc", sign_flip=True, upsample=UPSAMPLE, generator=torch.Generator().manual_seed(seed + k))
        with torch.no_grad():
            z, partners, w = mask(x, labels)  # (n, 189, 112, 112)
            # Output 0 again with the same partners and weights, without the sign key.
            unsigned = fastmix.frontend(x, upsample=UPSAMPLE, keep=keep, index=partners[:1], weight=w[:1])
            inv = _inverse(z[:1], keep)
            inv_plain = _inverse(unsigned, keep)
        panels = [("original" if row == 0 else "", _to_rgb(x[0]), None)]
        for name, ch in SHOW:
            c = z[0, keep.index(ch)]
            lim = float(c.abs().quantile(0.99)) or 1.0
            panels.append((name, c.numpy(), lim))
        # Without DC the reconstruction sits around mid-grey; stretch it to show the structure.
        for name, img in (("inverse (masked)", inv), ("inverse, no sign flip", inv_plain)):
            img = img - img.mean()
            panels.append((name, _to_rgb(img / (img.abs().quantile(0.99) + 1e-6)), None))
        for col, (title, img, lim) in enumerate(panels):
            ax = axes[row, col]
            if lim is None:
                ax.imshow(img)
            else:
                ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        mix = ", ".join(f"{float(wt):.2f}" for wt in w[0])
        axes[row, 0].set_ylabel(f"k={k}\nw=({mix})", fontsize=7)
    fig.suptitle(
        "fastmix HybridMask: frontend (bilinear x8, YCbCr, 8x8 DCT), k-way mix, DC dropped (189 ch), sign flip",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def throughput(x: torch.Tensor, repeats: int) -> list[dict]:
    """Median ms per batch and images/s of the two main ops on every available backend and device."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    k = 4
    keep = keep_ids("no_dc", 3)
    old = os.environ.get("FASTMIX_BACKEND")
    try:
        for dev in devices:
            xd = x.to(dev)
            n = xd.shape[0]
            g = torch.Generator().manual_seed(0)
            index = fastmix.sample_partners(n, k, generator=g).to(dev)
            weight = fastmix.sample_weights(n, k, generator=g).to(dev)
            pix = xd * 127.5  # freq_mix takes images on the DCT grid
            ops = {
                f"frontend x{UPSAMPLE}, k={k}, 189 ch, signed": lambda: fastmix.frontend(
                    xd, upsample=UPSAMPLE, keep=keep, index=index, weight=weight, seed=1
                ),
                f"freq_mix k={k}, 189 ch, signed": lambda: fastmix.freq_mix(pix, index, weight, keep=keep, seed=1),
            }
            for backend in fastmix.available_backends(dev):
                os.environ["FASTMIX_BACKEND"] = backend
                for op, fn in ops.items():
                    row = {"backend": backend, "device": dev, "op": op, "batch": n}
                    if backend == "triton" and dev == "cpu":
                        row["note"] = "TRITON_INTERPRET=1 interpreter: a correctness mode, not timed"
                    else:
                        try:
                            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
                            sec = _timed(lambda: (fn(), sync()), repeats)
                            row.update(ms=sec * 1e3, ips=n / sec)
                        except Exception as exc:  # a backend listed but failing is reported, not fatal
                            row["note"] = f"failed: {type(exc).__name__}: {exc}"[:120]
                    rows.append(row)
    finally:
        if old is None:
            os.environ.pop("FASTMIX_BACKEND", None)
        else:
            os.environ["FASTMIX_BACKEND"] = old
    return rows


def print_table(rows: list[dict], shape) -> None:
    print(f"\nthroughput: batch {tuple(shape)} float32, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    head = f"{'backend':8} {'device':6} {'op':36} {'ms/batch':>10} {'images/s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "ms" in r:
            print(f"{r['backend']:8} {r['device']:6} {r['op']:36} {r['ms']:10.1f} {r['ips']:10.1f}")
        else:
            print(f"{r['backend']:8} {r['device']:6} {r['op']:36} {r['note']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmix.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out", help="folder for fastmix_demo.png (default: ./out)")
    p.add_argument("--batch", type=int, default=16, help="faces per batch for the throughput table (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per backend and op; the median is shown")
    p.add_argument("--no-bench", action="store_true", help="only draw the grid")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    _need("skimage")
    _need("matplotlib")
    x, names = load_faces(max(args.batch, 8))
    print(f"faces: {x.shape[0]} x 3x{SIZE}x{SIZE} ({names[0]} + {x.shape[0] - 1} from skimage.data.lfw_subset)")
    print(f"backends on this machine: cpu -> {fastmix.available_backends('cpu')}"
          + (f", cuda -> {fastmix.available_backends('cuda')}" if torch.cuda.is_available() else ""))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fastmix_demo.png")
    draw_grid(x[:8], path)
    print(f"wrote {path}")
    if not args.no_bench:
        rows = throughput(x[: args.batch], args.repeats)
        print_table(rows, x[: args.batch].shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
