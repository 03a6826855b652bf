"""Small datasets in the official shapes, so tests and the demo need no download.

Every image is learnable from its class (a base colour per class, stripes whose angle and period
depend on the class, plus noise), and everything is deterministic for a seed: the same call writes
byte-identical archives. Commands::

    python -m pipeline.prep.synthetic imagenet OUT_DIR [--classes 10 --train-per-class 30 --val-per-class 10]
    python -m pipeline.prep.synthetic cifar10 OUT_DIR [--per-class 50]
    python -m pipeline.prep.synthetic folder OUT_DIR      # an already prepared train/ + val/ tree

The ImageNet archives carry the traps that break the classic recipes: devkit IDs that are not in
wnid order, non-leaf synsets in meta.mat, val files missing from the tar (``missing_val``) and val
files without a ground-truth line (``unlabelled_val``). Re-running with the same parameters does nothing.
"""
from __future__ import annotations

import argparse
import colorsys
import gzip
import hashlib
import io
import json
import logging
import pickle
import struct
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import scipy.io
from PIL import Image

from pipeline.core.atomic import atomic_path, atomic_write_text
from pipeline.core.file_index import write_index
from pipeline.prep.archives import CIFAR10_TAR, DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from pipeline.prep.classes import write_classes

log = logging.getLogger(__name__)

CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")
ARCHIVE_MTIME = 1_335_000_000  # fixed member mtime (April 2012), so archives are byte-identical per seed
_MANIFEST = "synthetic_{kind}.json"


def val_name(number: int) -> str:
    """The official val file name of 1-based image ``number``."""
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def render_image(label: int, *, num_classes: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 image whose colour, stripe angle and stripe period tell its class."""
    base_rgb = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.65, 0.85)) * 255
    angle = np.pi * (label % 4) / 4
    period_px = 5.0 + 4.0 * ((label // 4) % 3)
    y, x = np.mgrid[0:height, 0:width]
    wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period_px + rng.uniform(0, 2 * np.pi))
    image = base_rgb * (0.75 + 0.25 * wave[..., None]) + rng.normal(0.0, 10.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(label: int, *, num_classes: int, size: tuple[int, int], seed: Sequence[int], vary_size: bool) -> bytes:
    """One JPEG of class ``label``; ``size`` is (width, height) in pixels, +-20% per image when ``vary_size``."""
    rng = np.random.default_rng(list(seed))
    scale_w, scale_h = rng.uniform(0.8, 1.25, 2) if vary_size else (1.0, 1.0)
    width, height = max(8, round(size[0] * scale_w)), max(8, round(size[1] * scale_h))
    pixels = render_image(label, num_classes=num_classes, width=width, height=height, rng=rng)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_wnids(count: int, rng: np.random.Generator) -> list[str]:
    """Distinct wnids in the official form: 'n' + 8 digits, in random order."""
    numbers = rng.choice(15_000_000 - 1_000_000, size=count, replace=False) + 1_000_000
    return [f"n{n:08d}" for n in numbers]


def make_image_folder(root: str | Path, *, num_classes: int = 4, train_per_class: int = 16, val_per_class: int = 6,
                      size: tuple[int, int] = (48, 40), seed: int = 0, vary_size: bool = True) -> Path:
    """A prepared tree root/{train,val}/<wnid>/*.JPEG plus classes.tsv, as the prep stage leaves it."""
    root = Path(root)
    wnids = sorted(make_wnids(num_classes, np.random.default_rng(seed)))
    val_number = 0
    for label, wnid in enumerate(wnids):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                val_number += split == "val"
                name = val_name(val_number) if split == "val" else f"{wnid}_{i}.JPEG"
                data = jpeg_bytes(label, num_classes=num_classes, size=size, seed=(seed, label, i, split == "val"),
                                  vary_size=vary_size)
                (folder / name).write_bytes(data)
    write_classes(root, [(wnid, f"synthetic class {label}") for label, wnid in enumerate(wnids)])
    for split in ("train", "val"):
        write_index(root, split)
    return root


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), ARCHIVE_MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, members: Iterable[tuple[str, bytes]], gz: bool = False) -> None:
    """Write a tar (or a tar.gz with a fixed gzip header) atomically from (name, data) pairs."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) if gz else fh
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                _add_member(tar, name, data)
        if gz:
            stream.close()
        tmp.chmod(0o644)  # mkstemp makes it private; an archive is for everyone to read


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class SyntheticImageNet:
    """What make_imagenet_archives wrote, so tests can check every placement."""
    archive_dir: Path
    wnids: list[str]                   # the leaf classes, sorted
    words: dict[str, str]              # wnid -> words, as in meta.mat
    ilsvrc_ids: dict[str, int]         # wnid -> ILSVRC2012_ID (1-based, not in wnid order)
    train_files: dict[str, list[str]]  # wnid -> file names in its class tar
    val_labels: dict[str, str]         # val file in the tar with a ground-truth line -> its wnid
    missing_val: list[str]             # in the ground truth, left out of the val tar
    unlabelled_val: list[str]          # in the val tar, no ground-truth line
    md5: dict[str, str]                # archive file name -> MD5 hex digest


def _synsets(leaves: list[str], ids: dict[str, int], words: dict[str, str], inner: list[str],
             train_counts: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """meta.mat's struct array: leaves with IDs 1..C, then non-leaf synsets (one root over groups of leaves)."""
    groups = np.array_split(rng.permutation(len(leaves)), len(inner) - 1)
    rows: list[tuple[int, str, str, int, list[int], int, int]] = []  # id, wnid, words, height, children, images
    for wnid in sorted(leaves, key=ids.get):
        rows.append((ids[wnid], wnid, words[wnid], 0, [], train_counts[wnid]))
    first_inner_id = len(leaves) + 1
    for g, (wnid, members) in enumerate(zip(inner[1:], groups)):
        children = sorted(ids[leaves[m]] for m in members)
        rows.append((first_inner_id + 1 + g, wnid, f"synthetic group {g}", 1, children,
                     sum(train_counts[leaves[m]] for m in members)))
    root_children = list(range(first_inner_id + 1, first_inner_id + len(groups) + 1))
    rows.insert(len(leaves), (first_inner_id, inner[0], "synthetic root", 2, root_children, sum(train_counts.values())))
    synsets = np.empty((len(rows), 1), dtype=[(name, object) for name in SYNSET_FIELDS])
    for i, (sid, wnid, words, height, children, images) in enumerate(rows):
        synsets[i, 0] = (np.array([[sid]], np.uint16), wnid, words, f"gloss of {words}",
                         np.array([[len(children)]], np.uint16), np.array([children], np.uint16).reshape(1, -1),
                         np.array([[height]], np.uint8), np.array([[images]], np.uint32))
    return synsets


def _meta_mat_bytes(synsets: np.ndarray) -> bytes:
    """meta.mat as MATLAB 5 bytes, with the header's 'Created on' date fixed so the file is reproducible."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, synthetic ILSVRC2012 devkit".ljust(116)
    return bytes(data)


def _up_to_date(out_dir: Path, kind: str, params: dict[str, Any], names: Sequence[str]) -> dict[str, Any] | None:
    """The saved manifest when the archives exist and were made with the same parameters, else None."""
    path = out_dir / _MANIFEST.format(kind=kind)
    if not path.exists() or not all((out_dir / n).exists() for n in names):
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("params") == params else None


def make_imagenet_archives(out_dir: str | Path, *, num_classes: int = 10, train_per_class: int = 30,
                           val_per_class: int = 10, missing_val: Sequence[int] = (), unlabelled_val: int = 0,
                           size: tuple[int, int] = (48, 40), seed: int = 0) -> SyntheticImageNet:
    """Write the train, val and devkit archives in the official shapes into ``out_dir``.

    ``missing_val``: 1-based val numbers left out of the val tar (they keep their ground-truth line).
    ``unlabelled_val``: how many val files to add after the last ground-truth line.
    """
    out_dir = Path(out_dir)
    n_val = num_classes * val_per_class
    if any(not 1 <= k <= n_val for k in missing_val):
        raise ValueError(f"missing_val numbers must lie in 1..{n_val}, got {sorted(missing_val)}")
    rng = np.random.default_rng(seed)
    wnids = make_wnids(num_classes + max(2, num_classes // 3), rng)
    leaves, inner = sorted(wnids[:num_classes]), wnids[num_classes:]
    ids = {wnid: i + 1 for i, wnid in enumerate(rng.permutation(leaves))}
    label_of = {wnid: i for i, wnid in enumerate(leaves)}
    train_files = {w: [f"{w}_{n}.JPEG" for n in sorted(rng.choice(20_000, train_per_class, replace=False))]
                   for w in leaves}
    truth = list(rng.permutation(np.repeat(np.array(leaves), val_per_class)))  # truth[k-1]: wnid of val image k
    extra_labels = rng.integers(0, num_classes, unlabelled_val)
    unlabelled = list(range(n_val + 1, n_val + 1 + unlabelled_val))
    in_tar = [k for k in range(1, n_val + 1) if k not in set(missing_val)] + unlabelled
    words = {w: f"synthetic class {label_of[w]}" for w in leaves}
    synsets = _synsets(leaves, ids, words, inner, {w: train_per_class for w in leaves}, rng)

    params = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                  missing_val=sorted(missing_val), unlabelled_val=unlabelled_val, size=list(size), seed=seed)
    names = (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)
    manifest = _up_to_date(out_dir, "imagenet", params, names)
    if manifest is None:
        log.info("writing synthetic ImageNet archives (%d classes) to %s", num_classes, out_dir)
        def jpeg(label: int, key: tuple[int, ...]) -> bytes:
            return jpeg_bytes(label, num_classes=num_classes, size=size, seed=(seed, *key), vary_size=True)

        def class_tar(wnid: str) -> bytes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for i, name in enumerate(train_files[wnid]):
                    _add_member(tar, name, jpeg(label_of[wnid], (0, label_of[wnid], i)))
            return buf.getvalue()

        def val_label(k: int) -> int:
            return label_of[truth[k - 1]] if k <= n_val else int(extra_labels[k - n_val - 1])

        prefix = "ILSVRC2012_devkit_t12/"
        ground_truth = "".join(f"{ids[w]}\n" for w in truth).encode()
        _write_tar(out_dir / DEVKIT_TAR, [(prefix + "readme.txt", b"Synthetic ILSVRC2012 devkit for tests.\n"),
                                          (prefix + "data/meta.mat", _meta_mat_bytes(synsets)),
                                          (prefix + "data/ILSVRC2012_validation_ground_truth.txt", ground_truth)],
                   gz=True)
        _write_tar(out_dir / TRAIN_TAR, ((f"{w}.tar", class_tar(w)) for w in rng.permutation(leaves)))
        _write_tar(out_dir / VAL_TAR, ((val_name(k), jpeg(val_label(k), (1, k))) for k in in_tar))
        manifest = {"params": params, "md5": {name: file_md5(out_dir / name) for name in names}}
        atomic_write_text(out_dir / _MANIFEST.format(kind="imagenet"), json.dumps(manifest, indent=1))
    return SyntheticImageNet(
        archive_dir=out_dir, wnids=leaves, words=words, ilsvrc_ids=ids, train_files=train_files,
        val_labels={val_name(k): truth[k - 1] for k in in_tar if k <= n_val},
        missing_val=[val_name(k) for k in sorted(missing_val)],
        unlabelled_val=[val_name(k) for k in unlabelled],
        md5=manifest["md5"])


class _Py2Str(bytes):
    """A Python 2 ``str``: loads as ``str`` with encoding='latin1' (torchvision) and as bytes with 'bytes'."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can take a new type
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: _Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str


def _py2_pickle(obj: dict[str, Any]) -> bytes:
    """Pickle as the CIFAR site's Python 2 files are: keys and names are byte strings."""
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return _Py2Str(value.encode("latin1"))
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({convert(k): convert(v) for k, v in obj.items()})
    return buf.getvalue()


def make_cifar10_archive(out_dir: str | Path, *, per_class: int = 50, test_per_class: int = 10,
                         seed: int = 0) -> Path:
    """Write cifar-10-python.tar.gz in the official shape: 5 train batches, a test batch, batches.meta."""
    out_dir = Path(out_dir)
    params = dict(per_class=per_class, test_per_class=test_per_class, seed=seed)
    if _up_to_date(out_dir, "cifar10", params, [CIFAR10_TAR]) is not None:
        return out_dir / CIFAR10_TAR
    rng = np.random.default_rng(seed)
    n_classes = len(CIFAR10_LABEL_NAMES)

    def batch(labels: np.ndarray, batch_label: str, key: int) -> bytes:
        images = [render_image(int(y), num_classes=n_classes, width=32, height=32,
                               rng=np.random.default_rng([seed, key, i])) for i, y in enumerate(labels)]
        data = np.stack(images).transpose(0, 3, 1, 2).reshape(len(labels), 3072) if images else \
            np.zeros((0, 3072), np.uint8)  # rows: 1024 red, 1024 green, 1024 blue values
        names = [f"{CIFAR10_LABEL_NAMES[y]}_s_{key:02d}{i:05d}.png" for i, y in enumerate(labels)]
        return _py2_pickle({"batch_label": batch_label, "labels": [int(y) for y in labels], "data": data,
                            "filenames": names})

    train_labels = np.array_split(rng.permutation(np.repeat(np.arange(n_classes), per_class)), 5)
    members = [(f"data_batch_{b + 1}", batch(labels, f"training batch {b + 1} of 5", b + 1))
               for b, labels in enumerate(train_labels)]
    members.append(("test_batch", batch(rng.permutation(np.repeat(np.arange(n_classes), test_per_class)),
                                        "testing batch 1 of 1", 0)))
    members.append(("batches.meta", _py2_pickle({"label_names": list(CIFAR10_LABEL_NAMES),
                                                 "num_cases_per_batch": len(train_labels[0]), "num_vis": 3072})))
    members.append(("readme.html", b"<html>Synthetic CIFAR-10 for tests.</html>\n"))
    _write_tar(out_dir / CIFAR10_TAR, ((f"cifar-10-batches-py/{n}", d) for n, d in members), gz=True)
    manifest = {"params": params, "md5": {CIFAR10_TAR: file_md5(out_dir / CIFAR10_TAR)}}
    atomic_write_text(out_dir / _MANIFEST.format(kind="cifar10"), json.dumps(manifest, indent=1))
    return out_dir / CIFAR10_TAR


def _imagenet_cli(args: argparse.Namespace) -> None:
    info = make_imagenet_archives(args.out_dir, num_classes=args.classes, train_per_class=args.train_per_class,
                                  val_per_class=args.val_per_class, missing_val=args.missing_val,
                                  unlabelled_val=args.unlabelled_val, size=tuple(args.size), seed=args.seed)
    for name, md5 in info.md5.items():
        print(f"{info.archive_dir / name}  md5 {md5}")
    print(f"{len(info.wnids)} classes; val files left out of the tar: {info.missing_val or 'none'}; "
          f"val files without ground truth: {info.unlabelled_val or 'none'}")
    print("These are not the official archives: prepare them with --skip-checksum.")


def _cifar_cli(args: argparse.Namespace) -> None:
    path = make_cifar10_archive(args.out_dir, per_class=args.per_class, test_per_class=args.test_per_class,
                                seed=args.seed)
    print(f"{path}  md5 {file_md5(path)}\nThis is not the official archive: prepare it with --skip-checksum.")


def _folder_cli(args: argparse.Namespace) -> None:
    root = make_image_folder(args.out_dir, num_classes=args.classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, size=tuple(args.size), seed=args.seed)
    print(f"prepared tree in {root}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write small synthetic datasets in the official shapes.")
    sub = parser.add_subparsers(dest="kind", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
        "imagenet": (_imagenet_cli, "the three ILSVRC2012 archives (train, val, devkit)"),
        "cifar10": (_cifar_cli, "cifar-10-python.tar.gz"),
        "folder": (_folder_cli, "a prepared train/ and val/ tree with classes.tsv (no archives)")}
    for kind, (func, help_text) in commands.items():
        p = sub.add_parser(kind, help=help_text)
        p.set_defaults(func=func)
        p.add_argument("out_dir", type=Path)
        p.add_argument("--seed", type=int, default=0)
        if kind == "cifar10":
            p.add_argument("--per-class", type=int, default=50, help="train images per class")
            p.add_argument("--test-per-class", type=int, default=10, help="test images per class")
            continue
        p.add_argument("--classes", type=int, default=10)
        p.add_argument("--train-per-class", type=int, default=30)
        p.add_argument("--val-per-class", type=int, default=10)
        p.add_argument("--size", type=int, nargs=2, default=[48, 40], metavar=("WIDTH", "HEIGHT"),
                       help="typical image size, pixels")
        if kind == "imagenet":
            p.add_argument("--missing-val", type=int, nargs="*", default=[7],
                           help="1-based val numbers to leave out of the val tar (the report must catch them)")
            p.add_argument("--unlabelled-val", type=int, default=0,
                           help="val files to add with no ground-truth line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
