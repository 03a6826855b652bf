"""Download speed against plain copies, from the same loopback server, same files, in one run.

    python -m benchmarks.bench_download [--out bench-out/download] [--classes 100 --train-per-class 32]
                                        [--size 400 350] [--workers 4] [--repeats 3]

The server is the tests' Range-capable one (``python -m tests.download_helpers``) in a separate
process, serving synthetic archives in the official shapes (about 270 MB by default, written once and
reused). Variants, interleaved, each into an empty folder: a plain single-stream urllib copy of each file in
turn, ``wget -c`` and ``curl -C -`` per file when they are on PATH (none of them checks a checksum), ours
(``pipeline.prep.download.download``: the files in parallel, each one's MD5 computed as it arrives and checked,
renamed after), and ours resuming from ``.part`` files holding the first half of each archive (what a cut or a
requeue leaves, written before the clock starts): it fetches only the missing half, after hashing the half on
disk. MB/s = bytes of the archives / wall seconds (for the resume: the bytes fetched).

Then, with ``--cap-mb-per-s C`` (default 25), a second server that sends at most C MB/s per connection, as
image-net.org and many mirrors do: the train archive in one stream against the same in ``--download-ranges 4``
parallel byte ranges (whose MD5 is computed after the ranges are in).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from pipeline.prep.download import PART_SUFFIX, download
from benchmarks.bench_prep import add_archive_arguments, make_archives
from pipeline.prep.synthetic import DEVKIT_TAR, TRAIN_TAR, VAL_TAR

NAMES = (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)


def start_server(root: Path, cap_bytes_per_s: float | None = None) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL (it prints it once listening)."""
    cap = [] if cap_bytes_per_s is None else [str(cap_bytes_per_s)]
    server = subprocess.Popen([sys.executable, "-m", "tests.download_helpers", str(root), *cap],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def urllib_copy(links: list[str], out: Path) -> None:
    for link in links:
        with urllib.request.urlopen(link) as response, open(out / link.rsplit("/", 1)[1], "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 20)


def tool_copy(command: list[str]) -> Callable[[list[str], Path], None]:
    def run(links: list[str], out: Path) -> None:
        for link in links:
            subprocess.run([*command, str(out / link.rsplit("/", 1)[1]), link], check=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_archive_arguments(parser, out="bench-out/download", classes=100, train_per_class=32, size=(400, 350))
    parser.add_argument("--workers", type=int, default=4, help="files at once (the config default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-mb-per-s", type=float, default=25.0, help="per-connection cap of the second server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    synthetic = make_archives(args, args.out / "served")
    sizes = {name: (synthetic.archive_dir / name).stat().st_size for name in NAMES}
    total = sum(sizes.values())

    def ours(links: list[str], out: Path) -> None:
        download(links, out, expected_md5=synthetic.md5, workers=args.workers)

    def half_done(out: Path) -> None:
        """What a cut or a requeue leaves: the first half of each archive in its part file (before the clock)."""
        for name in NAMES:
            with open(synthetic.archive_dir / name, "rb") as src:
                (out / (name + PART_SUFFIX)).write_bytes(src.read(sizes[name] // 2))

    variants: dict[str, tuple[Callable[[list[str], Path], None], int]] = {
        "urllib, one stream, file by file (no checksum)": (urllib_copy, total)}
    if shutil.which("wget"):
        variants["wget -c, file by file (no checksum)"] = (tool_copy(["wget", "-q", "-c", "-O"]), total)
    if shutil.which("curl"):
        variants["curl -C -, file by file (no checksum)"] = (tool_copy(["curl", "-sS", "-f", "-C", "-", "-o"]), total)
    variants[f"ours, {args.workers} files at once, MD5 checked"] = (ours, total)
    resumed = "ours, resuming from half-done .part files"
    variants[resumed] = (ours, total - sum(s // 2 for s in sizes.values()))
    print(f"{total / 1e6:.0f} MB in {len(NAMES)} archives from a server process on 127.0.0.1, "
          f"{args.repeats} run(s) each\n")
    print_table(variants, time_variants(variants, synthetic.archive_dir, None, NAMES, sizes, args, half_done))

    def in_ranges(count: int) -> Callable[[list[str], Path], None]:
        def run(links: list[str], out: Path) -> None:
            download(links, out, expected_md5=synthetic.md5, ranges=count, range_min_bytes=1 << 20)
        return run

    capped = {"ours, one stream": (in_ranges(1), sizes[TRAIN_TAR]),
              "ours, 4 byte ranges in parallel": (in_ranges(4), sizes[TRAIN_TAR])}
    print(f"\n{sizes[TRAIN_TAR] / 1e6:.0f} MB train archive, each connection capped at {args.cap_mb_per_s:g} MB/s, "
          f"{args.repeats} run(s) each\n")
    print_table(capped, time_variants(capped, synthetic.archive_dir, args.cap_mb_per_s * 1e6, (TRAIN_TAR,), sizes,
                                      args))
    return 0


Variants = dict[str, tuple[Callable[[list[str], Path], None], int]]


def time_variants(variants: Variants, root: Path, cap: float | None, names: tuple[str, ...], sizes: dict[str, int],
                  args: argparse.Namespace, half_done: Callable[[Path], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each variant's runs, interleaved, each into an empty folder (the resume's with half-done parts)."""
    server, base = start_server(root, cap)
    links = [f"{base}/files/{name}" for name in names]
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for _ in range(args.repeats):
            for label, (run, _) in variants.items():
                out = args.out / "into"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                if label.startswith("ours, resuming") and half_done is not None:
                    half_done(out)
                start = time.perf_counter()
                run(links, out)
                seconds[label].append(time.perf_counter() - start)
                assert all((out / name).stat().st_size == sizes[name] for name in names), label
    finally:
        server.kill()
    return seconds


def print_table(variants: Variants, seconds: dict[str, list[float]]) -> None:
    print("| variant | best | median | MB/s (best) | ratio to the first (best) |\n|---|---|---|---|---|")
    base_rate = None
    for label, (_, nbytes) in variants.items():
        best, median = min(seconds[label]), statistics.median(seconds[label])
        rate = nbytes / 1e6 / best
        base_rate = base_rate or rate
        print(f"| {label} | {best:.2f} s | {median:.2f} s | {rate:.0f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
