"""Victim / attacker / judge splits for the privacy attacks (three identity-disjoint parts).

    victims   the people whose faces train the FR model (the target); per person train / val / test images
    attacker  faces of other people, the attacker's own (it never sees a victim face)
    judge     the identities the independent judge (``judge.py``) is pretrained on: neither victims nor
              the attacker's, so the judge never saw a face it grades (STYLE.md rule 15)

Sets (``get_split(name, seed, size)``):

- ``orl``: a seeded half of the 40 people are victims (6 train / 1 val / 3 test images each), the other half
  the attacker's 200 images. ORL has only 40 people, too few to train a judge on a third part, so ORL's
  judge pool is **LFW** (cross-dataset: ORL's 1992-94 lab volunteers and LFW's news photographs of public
  figures are different people): the same pool as LFW's (below), so one judge grades both sets.
- ``lfw``: victims = 40 seeded people with >= 10 images (10 of their images, 6 / 1 / 3), attacker = 600
  images of seeded people with < 10 images; judge pool = every LFW person who is neither a victim nor an
  attacker of any standard seed (``JUDGE_SEEDS`` = 0-4; a seed outside them also excludes its own people),
  all of their images. Disjoint by construction; one pool for every standard seed, so the judges train once
  (a judge per seed cost 10-18 min of the evaluation's budget).
- ``folder:PATH``: PATH holds one sub-folder per identity with images of any format Pillow reads. Victims =
  up to 20 seeded people with >= 4 images (up to 10 used: 60% train, 1 val, the rest test; at least
  2 / 1 / 1, so a template and a held-out probe exist), attacker = other people, in seeded order, until
  600 images; judge pool = the folder's remaining people when at least ``JUDGE_MIN_IDS`` of them have >= 2
  images, else LFW minus any LFW person whose name is also a folder identity (the cross-dataset choice of
  ORL). Sets too small to split raise ValueError naming the set, what it has and what it needs.

Faces are downsampled (``size``, default 56 = 7 * 8, so the 8x8 block DCT gives the 7x7 grid that
training.model's strides accept) to keep every attack within a 2-core CPU budget. Crops: ORL the centre
92x92 of 92x112, LFW the centre 128x128 of the unaligned 250x250, folders the centre square.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.data import CachedFaces, DataBundle, IdentSet, data_root, scan_image_folder

ORL_CROP = 92  # centre 92x92 of the 92x112 face, as training/configs/orl_cpu.yaml
LFW_CROP = 128  # the face in the unaligned 250x250 image, as training/configs/lfw_cpu.yaml
SQUARE = 1 << 30  # decode_image crops min(crop, w, h): this is "the centre square" of any image

FOLDER_MIN_PER_VICTIM = 4  # 2 train (a template and another image for genuine pairs) / 1 val / 1 test
FOLDER_MIN_VICTIMS = 2  # closed-set identification needs at least two people
FOLDER_MIN_ATTACKER_IDS = 2
JUDGE_SEEDS = range(5)  # the standard seeds: their LFW people are kept out of the one shared judge pool
JUDGE_MIN_IDS = 200  # a folder's own judge pool needs this many people with >= 2 images, else LFW's


@dataclass
class FacePool:
    """A face set known by its files, decoded on first use: the judge's pool is large (LFW: ~12k images) and
    only needed when its judge is not cached yet, so a split does not read it up front.

    ``key()`` hashes everything that changes the decoded faces (file paths relative to ``root``, labels,
    size, crop): the judge cache (``judge.py``) is keyed by it."""

    name: str
    root: str
    files: list[str]
    labels: list[int]
    identities: list[str]
    size: int
    crop: int | None
    note: str = ""
    _faces: CachedFaces | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def faces(self) -> CachedFaces:
        """(N, 1, size, size) uint8 images with labels 0..I-1 (identities that lost every image to unreadable
        files are relabelled away)."""
        if self._faces is None:
            self._faces = CachedFaces.from_files(self.files, self.labels, "grey", self.size, self.crop)
        return self._faces

    def key(self) -> str:
        h = hashlib.sha1(f"{self.size}|{self.crop}|{len(self.files)}".encode())
        for f, y in zip(self.files, self.labels):
            h.update(f"{os.path.relpath(f, self.root)}|{y}\n".encode())
        return h.hexdigest()[:16]


@dataclass
class Enrollment:
    """The victims as a face-recognition system enrolls them: ``gallery`` (templates are built from these,
    the victims' training images) and held-out ``probe`` images (victim_test), labels 0..V-1 in both."""

    gallery: CachedFaces
    probe: CachedFaces


@dataclass
class Split:
    """Victim train / val / test faces (labels 0..V-1), the attacker's own faces (other people) and the
    judge's pool (a third set of people). Images are (N, 1, S, S) uint8."""

    name: str
    victim_train: CachedFaces
    victim_val: CachedFaces
    victim_test: CachedFaces
    attacker: CachedFaces
    info: dict = field(default_factory=dict)
    judge: FacePool | None = None

    @property
    def num_victims(self) -> int:
        return self.victim_train.num_classes

    @property
    def judge_pool(self) -> CachedFaces:
        """The judge's training faces (decoded on first access; see ``FacePool``)."""
        if self.judge is None:
            raise FileNotFoundError(self.info.get("judge_missing") or f"split {self.name!r} has no judge pool")
        return self.judge.faces()

    @property
    def enrollment(self) -> Enrollment:
        return Enrollment(self.victim_train, self.victim_test)

    def bundle(self) -> DataBundle:
        """The training layer's DataBundle for the target FR model (victims only; closed-set test)."""
        b = DataBundle(self.victim_train, self.num_victims, int(self.victim_train.images.shape[1]))
        b.val = IdentSet(f"{self.name}_val", self.victim_train, self.victim_val)
        b.tests = [IdentSet(f"{self.name}_test", self.victim_train, self.victim_test)]
        b.info = dict(self.info)
        return b


def _faces(files, labels, size, crop):
    return CachedFaces.from_files(files, labels, "grey", size, crop)


def _pool(name: str, root: Path, people: list[tuple[str, list[str]]], size: int, crop: int | None, note: str) -> FacePool:
    files, labels = [], []
    for y, (_, fs) in enumerate(people):
        files += fs
        labels += [y] * len(fs)
    return FacePool(name, str(root), files, labels, [n for n, _ in people], size, crop, note)


def lfw_judge_pool(size: int = 56, root: Path | None = None, exclude: set[str] = frozenset()) -> FacePool:
    """The judge pool of sets too small to hold their own (ORL; small folder sets): ``lfw_judge_pool_fixed``
    (the LFW people no standard LFW seed uses, so ORL and LFW are graded by the same judges) minus any person
    named in ``exclude``. Centre 128x128 crop, as the LFW split."""
    pool = lfw_judge_pool_fixed(size, root)
    if not exclude:
        return pool
    people = [(n, [f for f, y in zip(pool.files, pool.labels) if y == i]) for i, n in enumerate(pool.identities)
              if n not in exclude]
    return _pool("lfw_judge_excl", pool.root, people, size, LFW_CROP, f"{pool.note}, {len(exclude)} names excluded")


def _lfw_pool_or_reason(size, root, exclude: set[str] = frozenset()) -> tuple[FacePool | None, str | None]:
    """The LFW judge pool, or (None, why) when LFW is absent: the split itself (victims, attacker) does not
    need it, so it still loads; ``Split.judge_pool`` raises the reason when the judge is asked for."""
    try:
        return lfw_judge_pool(size, root, exclude), None
    except FileNotFoundError as exc:
        return None, str(exc)


def _pool_info(pool: FacePool | None, missing: str | None = None) -> dict:
    if pool is None:
        return {"judge_pool": None, "judge_missing": missing}
    return {"judge_pool": pool.name, "judge_identities": pool.num_identities, "judge_images": len(pool),
            "judge_note": pool.note}


def orl_split(seed: int = 0, size: int = 56, victims: int = 20, root: Path | None = None, per_id=(6, 1),
              judge_root: Path | None = None) -> Split:
    """ORL: ``victims`` people (seeded) are the FR training set, the rest are the attacker's faces; the judge
    pool is LFW (``lfw_judge_pool``), the same for every seed."""
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
    tr, va, te = (_faces(*parts[k], size, ORL_CROP) for k in ("train", "val", "test"))
    pool, missing = _lfw_pool_or_reason(size, judge_root)
    return Split("orl", tr, va, te, _faces(af, al, size, ORL_CROP), {
        "set": "orl", "size": size, "victims": [n for n, _ in vic], "attackers": [n for n, _ in att],
        "victim_train": len(tr), "victim_val": len(va), "victim_test": len(te), "attacker_images": len(al),
        **_pool_info(pool, missing),
    }, pool)


def _lfw_draw(people, seed: int, victims: int, per_victim: int, attacker_images: int):
    """One seed's LFW victims (with their image order) and attacker people, drawn from ``people`` (the sorted
    folder scan) by the seed's generator: the draw every LFW split of that seed makes, in the same order."""
    g = torch.Generator().manual_seed(2000 + seed)
    rich = [p for p in people if len(p[1]) >= per_victim]
    poor = [p for p in people if len(p[1]) < per_victim]
    vic = [rich[i] for i in torch.randperm(len(rich), generator=g)[:victims].tolist()]
    orders = [torch.randperm(len(files), generator=g)[:per_victim].tolist() for _, files in vic]
    att, n_att = [], 0
    for i in torch.randperm(len(poor), generator=g).tolist():
        att.append(poor[i])
        n_att += len(poor[i][1])
        if n_att >= attacker_images:
            break
    return vic, orders, att


def lfw_judge_pool_fixed(size: int = 56, root: Path | None = None, seed: int | None = None,
                         victims: int = 40, per_victim: int = 10, attacker_images: int = 600) -> FacePool:
    """The LFW people who are neither victims nor attackers of any standard LFW seed (``JUDGE_SEEDS``), nor of
    ``seed``: one judge pool for every standard seed of both ORL and LFW, so the judges train once and grade
    every seed and set alike. A seed outside ``JUDGE_SEEDS`` also excludes its own people (another pool, a
    judge of its own)."""
    root = Path(root) if root else data_root() / "lfw"
    if not root.is_dir():
        raise FileNotFoundError(f"the LFW judge pool needs LFW at {root} (set FASTMIX_DATA or provide ../shared/data, see DATA.md)")
    people = scan_image_folder(root)
    seeds = sorted(set(JUDGE_SEEDS) | ({seed} if seed is not None else set()))
    taken: set[str] = set()
    for s in seeds:
        vic, _, att = _lfw_draw(people, s, victims, per_victim, attacker_images)
        taken |= {n for n, _ in vic} | {n for n, _ in att}
    extra = "" if seed is None or seed in JUDGE_SEEDS else f" and seed {seed}"
    name = "lfw_judge" if not extra else f"lfw_judge_s{seed}"
    return _pool(name, root, [p for p in people if p[0] not in taken], size, LFW_CROP,
                 f"LFW people who are neither victims nor attackers of LFW seeds {min(JUDGE_SEEDS)}-{max(JUDGE_SEEDS)}{extra}")


def lfw_split(seed: int = 0, size: int = 56, victims: int = 40, per_victim: int = 10, attacker_images: int = 600,
              root: Path | None = None) -> Split:
    """LFW: victims = ``victims`` people with >= ``per_victim`` images (per_victim of them: 6/1/3 as ORL
    scaled), attacker = ``attacker_images`` faces of people with fewer images, judge pool =
    ``lfw_judge_pool_fixed`` (the people no standard seed uses; all of their images). Each seed's victims and
    attacker are drawn exactly as before the judge pool existed."""
    root = Path(root) if root else data_root() / "lfw"
    people = scan_image_folder(root)
    vic, orders, att_people = _lfw_draw(people, seed, victims, per_victim, attacker_images)
    parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
    n_tr, n_va = round(0.6 * per_victim), max(1, round(0.1 * per_victim))
    for y, ((_, files), o) in enumerate(zip(vic, orders)):
        for key, sel in (("train", o[:n_tr]), ("val", o[n_tr : n_tr + n_va]), ("test", o[n_tr + n_va :])):
            parts[key][0].extend(files[i] for i in sel)
            parts[key][1].extend([y] * len(sel))
    af, al = [], []
    for y, (_, files) in enumerate(att_people):
        af += files
        al += [y] * len(files)
    att = [n for n, _ in att_people]
    pool = lfw_judge_pool_fixed(size, root, seed, victims, per_victim, attacker_images)
    tr, va, te = (_faces(*parts[k], size, LFW_CROP) for k in ("train", "val", "test"))
    return Split("lfw", tr, va, te, _faces(af, al, size, LFW_CROP), {
        "set": "lfw", "size": size, "victims": [n for n, _ in vic], "attackers": att, "victim_train": len(tr),
        "victim_val": len(va), "victim_test": len(te), "attacker_images": len(al), **_pool_info(pool),
    }, pool)


def folder_split(root: str | os.PathLike, seed: int = 0, size: int = 56, victims: int = 20, per_victim: int = 10,
                 attacker_images: int = 600, judge_root: Path | None = None) -> Split:
    """A user's face folder (one sub-folder per identity): the rules of the module docstring.

    Raises ValueError (one line: the set, what it has, what it needs) when it cannot be split."""
    name = f"folder:{root}"
    people = scan_image_folder(root)  # every format Pillow reads; a missing or empty folder is a one-line DataError
    eligible = [i for i, (_, fs) in enumerate(people) if len(fs) >= FOLDER_MIN_PER_VICTIM]
    # at most half of the people are victims, so the attacker always has as many people as the victims
    n_vic = min(victims, len(eligible), len(people) // 2)
    if n_vic < FOLDER_MIN_VICTIMS or len(people) - n_vic < FOLDER_MIN_ATTACKER_IDS:
        raise ValueError(
            f"face set {name!r} is too small to split: it has {len(people)} identities, {len(eligible)} with >= "
            f"{FOLDER_MIN_PER_VICTIM} images; it needs >= {FOLDER_MIN_VICTIMS} victims with >= {FOLDER_MIN_PER_VICTIM} "
            f"images each (2 train / 1 val / 1 test) and >= {FOLDER_MIN_ATTACKER_IDS} other identities for the "
            f"attacker, i.e. >= {FOLDER_MIN_VICTIMS + FOLDER_MIN_ATTACKER_IDS} identities")
    g = torch.Generator().manual_seed(3000 + seed)
    vic_idx = [eligible[i] for i in torch.randperm(len(eligible), generator=g)[:n_vic].tolist()]
    parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for y, i in enumerate(vic_idx):
        files = people[i][1]
        o = torch.randperm(len(files), generator=g)[:per_victim].tolist()
        n_tr = max(2, round(0.6 * len(o)))
        for key, sel in (("train", o[:n_tr]), ("val", o[n_tr : n_tr + 1]), ("test", o[n_tr + 1 :])):
            parts[key][0].extend(files[j] for j in sel)
            parts[key][1].extend([y] * len(sel))
    vset = set(vic_idx)
    others = [i for i in range(len(people)) if i not in vset]
    af, al, att_idx = [], [], []
    for y, j in enumerate(torch.randperm(len(others), generator=g).tolist()):
        i = others[j]
        att_idx.append(i)
        af += people[i][1]
        al += [y] * len(people[i][1])
        if len(af) >= attacker_images and len(att_idx) >= FOLDER_MIN_ATTACKER_IDS:
            break
    rest = [people[i] for i in others if i not in set(att_idx)]
    missing = None
    if sum(len(fs) >= 2 for _, fs in rest) >= JUDGE_MIN_IDS:
        pool = _pool(f"folder_s{seed}", Path(root), rest, size, SQUARE,
                     "the folder's people who are neither this seed's victims nor its attacker's")
    else:
        # too few people left to pretrain a judge: LFW's, minus anyone who shares a name with the folder's
        pool, missing = _lfw_pool_or_reason(size, judge_root, exclude={n for n, _ in people})
    tr, va, te = (_faces(*parts[k], size, SQUARE) for k in ("train", "val", "test"))
    att = _faces(af, al, size, SQUARE)
    if tr.num_classes < FOLDER_MIN_VICTIMS or len(te) == 0 or len(att) == 0:
        raise ValueError(f"face set {name!r}: too few readable images after decoding ({len(tr)} victim train, "
                         f"{len(te)} victim test, {len(att)} attacker); see the warnings above for the unreadable files")
    return Split(name, tr, va, te, att, {
        "set": name, "size": size, "victims": [people[i][0] for i in vic_idx],
        "attackers": [people[i][0] for i in att_idx], "victim_train": len(tr), "victim_val": len(va),
        "victim_test": len(te), "attacker_images": len(att), **_pool_info(pool, missing),
    }, pool)


SPLITS = {"orl": orl_split, "lfw": lfw_split}


def get_split(name: str, seed: int = 0, size: int = 56) -> Split:
    """``"orl"``, ``"lfw"`` or ``"folder:PATH"`` -> that set's Split for ``seed`` at ``size`` x ``size``."""
    if name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise ValueError("face set 'folder:' names no folder: use folder:PATH, PATH holding one sub-folder per identity")
        return folder_split(path, seed, size)
    if name not in SPLITS:
        raise ValueError(f"unknown face set {name!r}: use 'orl', 'lfw' or 'folder:PATH'")
    return SPLITS[name](seed, size)
