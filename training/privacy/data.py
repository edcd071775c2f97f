"""Victim / attacker splits for the privacy attacks (identity-disjoint).

The FR model (the target) trains on the *victim* identities only; the attacker owns faces of other people
(the *attacker* identities) and never sees a victim face. ORL: a seeded half of the 40 people are victims
(6 train / 1 validation / 3 test images each, as training.data.load_orl splits them), the other half are
the attacker's 200 images. LFW: victims are a seeded subset of the people with >= ``min_images`` images,
attackers are people with fewer images (disjoint by construction).

Faces are downsampled (``size``, default 56 = 7 * 8, so the 8x8 block DCT gives the 7x7 grid that
training.model's strides accept) to keep every attack within a 2-core CPU budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.data import CachedFaces, DataBundle, IdentSet, data_root, scan_image_folder


@dataclass
class Split:
    """Victim train / val / test faces (labels 0..V-1) and the attacker's own faces (other people)."""

    name: str
    victim_train: CachedFaces
    victim_val: CachedFaces
    victim_test: CachedFaces
    attacker: CachedFaces
    info: dict = field(default_factory=dict)

    @property
    def num_victims(self) -> int:
        return self.victim_train.num_classes

    def bundle(self) -> DataBundle:
        """The training layer's DataBundle for the target FR model (victims only; closed-set test)."""
        b = DataBundle(self.victim_train, self.num_victims, int(self.victim_train.images.shape[1]))
        b.val = IdentSet(f"{self.name}_val", self.victim_train, self.victim_val)
        b.tests = [IdentSet(f"{self.name}_test", self.victim_train, self.victim_test)]
        b.info = dict(self.info)
        return b


def _faces(files, labels, size, crop):
    return CachedFaces.from_files(files, labels, "grey", size, crop)


def orl_split(seed: int = 0, size: int = 56, victims: int = 20, root: Path | None = None, per_id=(6, 1)) -> Split:
    """ORL: ``victims`` people (seeded) are the FR training set, the rest are the attacker's faces."""
    root = Path(root) if root else data_root() / "orl_faces"
    people = scan_image_folder(root)
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(people), generator=g).tolist()
    vic, att = [people[i] for i in order[:victims]], [people[i] for i in order[victims:]]
    parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for y, (_, files) in enumerate(vic):
        o = torch.randperm(len(files), generator=g).tolist()
        a, b = per_id[0], per_id[0] + per_id[1]
        for key, sel in (("train", o[:a]), ("val", o[a:b]), ("test", o[b:])):
            parts[key][0].extend(files[i] for i in sel)
            parts[key][1].extend([y] * len(sel))
    af, al = [], []
    for y, (_, files) in enumerate(att):
        af += files
        al += [y] * len(files)
    crop = 92  # centre 92x92 of the 92x112 face, as training/configs/orl_cpu.yaml
    tr, va, te = (_faces(*parts[k], size, crop) for k in ("train", "val", "test"))
    return Split("orl", tr, va, te, _faces(af, al, size, crop), {
        "set": "orl", "size": size, "victims": [n for n, _ in vic], "attackers": [n for n, _ in att],
        "victim_train": len(tr), "victim_val": len(va), "victim_test": len(te), "attacker_images": len(al),
    })


def lfw_split(seed: int = 0, size: int = 56, victims: int = 40, per_victim: int = 10, attacker_images: int = 600,
              root: Path | None = None) -> Split:
    """LFW: victims = ``victims`` people with >= ``per_victim`` images (first per_victim each: 6/1/3 as
    ORL scaled), attacker = ``attacker_images`` faces of people with fewer images (identity-disjoint)."""
    root = Path(root) if root else data_root() / "lfw"
    people = scan_image_folder(root)
    g = torch.Generator().manual_seed(2000 + seed)
    rich = [p for p in people if len(p[1]) >= per_victim]
    poor = [p for p in people if len(p[1]) < per_victim]
    vic = [rich[i] for i in torch.randperm(len(rich), generator=g)[:victims].tolist()]
    parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
    n_tr, n_va = round(0.6 * per_victim), max(1, round(0.1 * per_victim))
    for y, (_, files) in enumerate(vic):
        o = torch.randperm(len(files), generator=g)[:per_victim].tolist()
        for key, sel in (("train", o[:n_tr]), ("val", o[n_tr : n_tr + n_va]), ("test", o[n_tr + n_va :])):
            parts[key][0].extend(files[i] for i in sel)
            parts[key][1].extend([y] * len(sel))
    af, al = [], []
    for y, i in enumerate(torch.randperm(len(poor), generator=g).tolist()):
        for f in poor[i][1]:
            af.append(f)
            al.append(y)
        if len(af) >= attacker_images:
            break
    crop = 128  # the face in the unaligned 250x250 image, as training/configs/lfw_cpu.yaml
    tr, va, te = (_faces(*parts[k], size, crop) for k in ("train", "val", "test"))
    return Split("lfw", tr, va, te, _faces(af, al, size, crop), {
        "set": "lfw", "size": size, "victims": [n for n, _ in vic], "victim_train": len(tr), "victim_val": len(va),
        "victim_test": len(te), "attacker_images": len(al),
    })


SPLITS = {"orl": orl_split, "lfw": lfw_split}
