"""Staging throughput (``--stage-data-to``) against ``cp`` of the same bytes.

    python -m benchmarks.bench_staging [--files 4] [--mib 256] [--dir DIR] [--dest DEST ...] [--repeats 3]

Makes a packed data dir of ``--files`` shards of random bytes (``--mib`` MiB each) with its manifest, then, for each
destination, times ``stage_data`` (copy, MD5 of every byte, fsync, verified.json) against GNU ``cp --reflink=never``
of the same files, alone and followed by ``sync`` of the copies (staging makes its copies durable before it vouches
for them). Each figure is the best of ``--repeats``; before each run the source's pages are dropped from the page
cache (``posix_fadvise DONTNEED``, no root needed) for the "cold" rows, or read once for the "warm" rows.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.core.data_manifest import Manifest, ManifestFile, write_manifest
from pipeline.data.staging import stage_data


def make_source(root: Path, files: int, mib: int) -> list[Path]:
    entries, paths = [], []
    for i in range(files):
        path = root / "shards" / f"shard-{i:06d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5()
        with open(path, "wb") as fh:
            for _ in range(mib):
                block = os.urandom(1 << 20)
                md5.update(block)
                fh.write(block)
        entries.append(ManifestFile(path.name, mib << 20, md5.hexdigest()))
        paths.append(path)
    write_manifest(root, Manifest("shards", "shards", tuple(entries), (), {}))
    return paths


def set_cache(paths: list[Path], warm: bool) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if warm:
                while os.read(fd, 16 << 20):
                    pass
            else:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best(run, paths: list[Path], out: Path, warm: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        subprocess.run(["sync"], check=True)
        set_cache(paths, warm)
        start = time.perf_counter()
        run(out)
        times.append(time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256, help="MiB per file")
    parser.add_argument("--dir", type=Path, default=None, help="where the source goes (default: a temporary folder)")
    parser.add_argument("--dest", type=Path, action="append", help="staging folder(s) (default: beside the source, "
                                                                     "and /dev/shm)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="files copied at once by staging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-staging-"))
    dests = args.dest or [root / "dest", Path("/dev/shm")]
    try:
        paths = make_source(root / "data", args.files, args.mib)
        total = args.files * args.mib * (1 << 20)
        print(f"{args.files} files x {args.mib} MiB = {total / 1e9:.2f} GB; best of {args.repeats}; "
              f"{os.cpu_count()} CPUs")
        print("| destination | source cache | staging (md5, fsync) | cp | cp + sync | staging / cp | staging / "
              "(cp + sync) |\n|---|---|---|---|---|---|---|")
        cp = ["cp", "--reflink=never", *map(str, paths)]
        for dest in dests:
            dest.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(dir=dest, prefix="bench-staging-"))
            try:
                for warm in (False, True):
                    staged = best(lambda o: stage_data(root / "data", o, workers=args.workers), paths, out / "s",
                                  warm, args.repeats)
                    plain = best(lambda o: subprocess.run([*cp, str(o)], check=True), paths, out / "c", warm,
                                 args.repeats)
                    synced = best(lambda o: subprocess.run([*cp, str(o)], check=True) and subprocess.run(
                        ["sync", *map(str, o.iterdir())], check=True), paths, out / "c", warm, args.repeats)
                    mbps = [total / t / 1e6 for t in (staged, plain, synced)]
                    print(f"| {dest} | {'warm' if warm else 'cold'} | {mbps[0]:.0f} MB/s | {mbps[1]:.0f} MB/s | "
                          f"{mbps[2]:.0f} MB/s | {mbps[0] / mbps[1]:.2f}x | {mbps[0] / mbps[2]:.2f}x |", flush=True)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
