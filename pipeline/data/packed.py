"""The ``archives`` and ``shards`` layouts: samples read by byte offset from a few large files.

Both are the same reader over different files: ``archives`` reads the JPEG payloads in place inside the official
ILSVRC2012 tars (their class tars are uncompressed), ``shards`` inside WebDataset tar shards written by prep. Where
each sample lies comes from the split's sample index (pipeline.core.sample_index), the files from the data dir's
manifest (pipeline.core.data_manifest, the large files under ``files_dir``).

Files are opened lazily, once per process, and read with ``os.pread`` (no shared file position): a descriptor
opened in the parent is never used by forked loader workers, which open their own. Each file's size is checked
against the manifest when the source is made (in the training process, so a missing, truncated or changed file is
one clear line before any worker starts) and again when a process opens it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.data_manifest import DataManifestError, Manifest, files_dir, read_manifest
from pipeline.core.sample_index import SampleIndexError, read_samples
from pipeline.data.datasets import ClassList, DataDirError, Source, data_dir_error

PACKED_LAYOUT = "manifest.json, classes.tsv and <split>.samples.npy (prep --layout {layout})"


def packed_manifest(data_dir: Path, layout: str) -> Manifest:
    """The data dir's manifest, which must be of ``layout``; DataDirError (one line) otherwise."""
    expected = PACKED_LAYOUT.format(layout=layout)
    try:
        manifest = read_manifest(data_dir)
    except DataManifestError as exc:
        raise data_dir_error(data_dir, str(exc), expected) from None
    if manifest is None:
        raise data_dir_error(data_dir, f"data dir {data_dir} has no manifest.json, so it was not prepared with "
                             f"--layout {layout} (or its prep did not finish)", expected)
    if manifest.layout != layout:
        raise DataDirError(f"data dir {data_dir} holds the {manifest.layout!r} layout, not {layout!r}; pass --layout "
                           f"{manifest.layout}, or prepare another --data-dir with --layout {layout}")
    return manifest


def check_file(path: Path, size: int, fd: int | None = None) -> None:
    """A large file must exist with the manifest's size: anything else is one clear DataDirError."""
    try:
        found = os.fstat(fd).st_size if fd is not None else path.stat().st_size
    except FileNotFoundError:
        raise DataDirError(f"{path} is missing: the data dir's manifest.json lists it ({size:,} bytes); restore it, "
                           "or prepare (or stage) the data dir again") from None
    except OSError as exc:
        raise DataDirError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if found != size:
        raise DataDirError(f"{path} is {found:,} bytes, the data dir's manifest.json says {size:,}: it was truncated "
                           "or replaced since prep; restore it, or prepare (or stage) the data dir again")


class PackedFiles(Source):
    """Samples at (file, offset, length) in the manifest's large files, read with positioned reads."""

    def __init__(self, data_dir: Path, manifest: Manifest, samples: np.ndarray):
        root = files_dir(data_dir, manifest)
        self.paths = [root / entry.name for entry in manifest.files]
        self.sizes = [entry.size for entry in manifest.files]
        self.samples, self.labels = samples, samples["label"]
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        for path, size in zip(self.paths, self.sizes):
            check_file(path, size)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers open their own files
        return {**self.__dict__, "_fds": {}}

    def describe(self, index: int) -> str:
        row = self.samples[index]
        return f"{self.paths[int(row['file'])]}:{row['name'].decode(errors='replace')}"

    def _fd(self, file: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours to use
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(file)
        if fd is None:
            path = self.paths[file]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                check_file(path, self.sizes[file])  # names what is wrong
                raise
            check_file(path, self.sizes[file], fd)
            self._fds[file] = fd
        return fd

    def read(self, index: int) -> bytes:
        row = self.samples[index]
        offset, length = int(row["offset"]), int(row["length"])
        data = os.pread(self._fd(int(row["file"])), length, offset)
        if len(data) != length:
            raise OSError(f"read {len(data)} of {length} bytes at offset {offset}: the file is cut short")
        return data


def packed_split(data_dir: Path, split: str, classes: ClassList, layout: str) -> PackedFiles:
    """The split of a data dir of the ``archives`` or ``shards`` layout, checked against its manifest."""
    manifest = packed_manifest(data_dir, layout)
    try:
        samples = read_samples(data_dir, split, manifest, len(classes.wnids))
    except SampleIndexError as exc:
        raise DataDirError(str(exc)) from None
    return PackedFiles(data_dir, manifest, samples)
