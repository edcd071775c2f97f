"""How many bytes the plain-DCT freq_mix kernels read from DRAM, in a model of the GPU's L2 cache.

    python benches/l2_model.py                    # the issue's shape (N = 512, 3x112x112, k = 6), 25 and 50 MB
    python benches/l2_model.py --n 64 --l2-mb 4   # any other

The issue's bandwidth floor for freq_mix counts k partner reads per output image. But every image is a
partner of about k outputs (fastmix.sample_partners: column 0 is the image itself, the others are random
permutations), so a partner tile read soon after another output read it comes from L2, not DRAM. How soon
depends on the order in which programs run (CONFIG["dct_order"], fastmix/ops/_triton/mix.py
_program_tile). This model replays the programs' reads in launch order through an LRU cache of whole
128-byte lines and counts the misses. It is a model, not a measurement: a real H100 has two L2 partitions,
a hashed, not LRU, replacement, and some hundred programs in flight at once instead of one after another.
It orders the two program orders; the GPU benchmark times them ("triton:row_order").

Forward: program (m, colour, tile) reads one tile of each of its k partners (pixel layout, [BL, 8, 8]) and
writes its output tile. Backward (gather x gradient): program (n, colour, tile) reads the channel gradient
tile of every output that uses image n.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastmix  # noqa: E402

LINE = 128  # bytes per L2 line (four 32-byte sectors move together in this model)


def program_order(order: str, rows: int, C: int, n_tiles: int):
    """(row, colour, tile) of every program in launch order: _program_tile's decoding of the program id."""
    for pid in range(rows * C * n_tiles):
        if order == "row":
            row, tc = pid % rows, pid // rows
            yield row, tc % C, tc // C
        else:
            tile, rc = pid % n_tiles, pid // n_tiles
            yield rc // C, rc % C, tile


class LRU:
    def __init__(self, capacity_bytes: int):
        self.cap = max(1, capacity_bytes // LINE)
        self.lines: OrderedDict = OrderedDict()
        self.requested = 0
        self.missed = 0

    def access(self, lines: np.ndarray, read: bool):
        for key in lines.tolist():
            if key in self.lines:
                self.lines.move_to_end(key)
            else:
                self.missed += read
                self.lines[key] = None
                if len(self.lines) > self.cap:
                    self.lines.popitem(last=False)
            self.requested += read


def simulate(n: int, C: int, h: int, w: int, k: int, bl: int, l2_bytes: int, order: str, seed: int = 0,
             n_kept: int | None = None):
    """{"fwd": (MB requested, MB from DRAM), "bwd": ...} for the partner reads of the forward and the
    gradient reads of the gather backward (fp32, N = M = n, per-image weights)."""
    hb, wb = h // 8, w // 8
    hbwb = hb * wb
    n_kept = C * 64 - 1 if n_kept is None else n_kept
    n_tiles = -(-hbwb // bl)
    index = fastmix.sample_partners(n, k, generator=torch.Generator().manual_seed(seed)).numpy()
    users = [[] for _ in range(n)]  # inverse index: outputs m that read image n
    for m in range(n):
        for t in range(k):
            users[index[m, t]].append(m)
    a = np.arange(64)
    px_lines, ch_lines = [], []
    for tile in range(n_tiles):
        blocks = np.arange(tile * bl, min((tile + 1) * bl, hbwb))
        bi, bj = blocks // wb, blocks % wb
        px = ((bi * 8 * w + bj * 8)[:, None] + ((a // 8) * w + a % 8)[None, :]).ravel() * 4
        px_lines.append(np.unique(px // LINE))
        ch_lines.append(blocks)
    plane = -(-h * w * 4 // LINE)  # lines per pixel plane, rounded up so planes never share a line
    out_base = n * C * plane  # forward: the output after the input; backward: x's gradient after the gradient
    grad_lines = -(-n * n_kept * hbwb * 4 // LINE)

    def channel_lines(row, c, tile, base):
        slots = np.arange(c * 64, min(c * 64 + 64, n_kept))
        b = ch_lines[tile]
        byte = ((row * n_kept + slots)[:, None] * hbwb + b[None, :]).ravel() * 4
        return base + np.unique(byte // LINE)

    res = {}
    for kind in ("fwd", "bwd"):
        cache = LRU(l2_bytes)
        for row, c, tile in program_order(order, n, C, n_tiles):
            if kind == "fwd":
                for t in range(k):
                    cache.access((index[row, t] * C + c) * plane + px_lines[tile], True)
                cache.access(channel_lines(row, c, tile, out_base), False)
            else:
                for m in users[row]:
                    cache.access(channel_lines(m, c, tile, 0), True)
                cache.access(grad_lines + (row * C + c) * plane + px_lines[tile], False)
        res[kind] = (cache.requested * LINE / 1e6, cache.missed * LINE / 1e6)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    p.add_argument("--blocks", type=int, default=32, help="blocks per program (CONFIG tiles, tf32x3: 32)")
    p.add_argument("--l2-mb", type=float, nargs="+", default=(25.0, 50.0))
    args = p.parse_args(argv)
    h, w = args.size
    print(f"N = {args.n}, 3x{h}x{w} fp32, k = {args.k}, {args.blocks} blocks per program, LRU of {LINE}-byte lines")
    print(f"{'L2 MB':>6s} {'order':>6s} {'fwd requested':>14s} {'fwd DRAM':>9s} {'bwd requested':>14s} {'bwd DRAM':>9s}")
    for mb in args.l2_mb:
        for order in ("tile", "row"):
            r = simulate(args.n, 3, h, w, args.k, args.blocks, int(mb * 2**20), order)
            print(f"{mb:6.0f} {order:>6s} {r['fwd'][0]:11.0f} MB {r['fwd'][1]:6.0f} MB "
                  f"{r['bwd'][0]:11.0f} MB {r['bwd'][1]:6.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
