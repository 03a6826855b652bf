"""Start-up of a rank: the samples of ImageNet's train split from its file index against a scan of the tree.

    python -m benchmarks.bench_index [--images 1281167] [--classes 1000] [--dir DIR]

Makes a train tree of empty files in the official shape (1,000 class folders, 1,281,167 files; about 1.3 M inodes
in DIR, removed afterwards), writes its index as prep does, then times ``split_files`` (what every rank calls at
start-up) reading the index and scanning the tree, each in a fresh process, best of 3. The page cache is warm for
both (a cold cache or a parallel file system makes the scan far slower; the index is one file).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core.file_index import index_path, write_index

TIMED = ("import sys, time; from pipeline.data.datasets import imagenet_classes, split_files; from pathlib import Path; "
         "root = Path(sys.argv[1]); wnids = imagenet_classes(root).wnids; start = time.perf_counter(); "
         "paths, _ = split_files(str(root), 'train', wnids); print(time.perf_counter() - start, len(paths))")


def make_tree(root: Path, images: int, classes: int) -> None:
    (root / "val").mkdir(parents=True)
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(images // classes + (c < images % classes)):
            (folder / f"n{c:08d}_{i}.JPEG").touch()


def timed(root: Path) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", TIMED, str(root)], capture_output=True, text=True, check=True)
    seconds, count = out.stdout.split()
    return float(seconds), int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None, help="where to make the tree (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-index-"))
    try:
        start = time.perf_counter()
        make_tree(root, args.images, args.classes)
        print(f"tree of {args.images} empty files made in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        write_index(root, "train")
        print(f"index written in {time.perf_counter() - start:.1f} s (prep does this once)")
        from_index = min(timed(root) for _ in range(3))
        index_path(root, "train").rename(root / "kept.index")
        from_scan = min(timed(root) for _ in range(3))
        assert from_index[1] == from_scan[1] == args.images
        print(f"| from the index | {from_index[0]:.2f} s | {from_scan[0] / from_index[0]:.1f}x |")
        print(f"| scan of the tree | {from_scan[0]:.2f} s | 1.0x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
