"""The ILSVRC2012 devkit: which synsets are the classes, and the label of every val file.

``data/meta.mat`` lists 1860 synsets; only the leaves (``num_children == 0``) are the 1000 classes, and
their ``ILSVRC2012_ID`` (1..1000) is NOT the position of the wnid in sorted order. Line k of
``data/ILSVRC2012_validation_ground_truth.txt`` is the ILSVRC2012_ID of ``ILSVRC2012_val_%08d.JPEG``
with that k, so a val file is placed by the number in its own name, never by its position in a listing.
A class's WNID becomes a folder name, so each must be ``n`` + 8 digits; meta.mat fields of another type are
refused with a DevkitError (bad input, one line) rather than crashing.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from pipeline.prep.archives import ArchiveError, check_member, member_bytes, read_archive

META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
REQUIRED_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "num_children")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
WNID = re.compile(r"n\d{8}")


class DevkitError(ArchiveError):
    """A devkit without meta.mat or ground truth, or with contents that contradict each other."""


@dataclass(frozen=True)
class Devkit:
    wnid_of_id: dict[int, str]  # ILSVRC2012_ID -> wnid, leaf synsets only (the classes)
    words: dict[str, str]       # wnid -> human-readable words
    ground_truth: list[int]     # ground_truth[k - 1]: ILSVRC2012_ID of val image k
    stats: dict                 # what read_archive reported (bytes, MD5, checksum result)

    @property
    def wnids(self) -> list[str]:
        """The classes in label order: sorted wnids, as torchvision's ImageFolder assigns labels."""
        return sorted(self.wnid_of_id.values())

    def val_wnid(self, number: int) -> str | None:
        """The class of val image ``number`` (1-based), or None when the ground truth has no line for it."""
        if 1 <= number <= len(self.ground_truth):
            return self.wnid_of_id[self.ground_truth[number - 1]]
        return None


def val_number(name: str) -> int | None:
    """The k of ``ILSVRC2012_val_%08d.JPEG``, or None for any other name."""
    match = VAL_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _field(row: np.void, name: str, kind: type, where: str, index: int) -> Any:
    """One synset field as ``kind``: int (one whole number) or str (text); anything else is a DevkitError."""
    value, array = row[name], np.asarray(row[name])
    if kind is str and isinstance(value, str):
        return value
    if kind is int and array.size == 1 and array.dtype.kind in "iuf" and float(array.reshape(-1)[0]).is_integer():
        return int(array.reshape(-1)[0])
    wanted = "one whole number" if kind is int else "text"
    raise DevkitError(f"{where}: synset {index} has {name} = {repr(value)[:60]}, not {wanted}; is this the "
                      "ILSVRC2012 devkit?")


def parse_meta_mat(data: bytes, where: str) -> tuple[dict[int, str], dict[str, str]]:
    """Leaf synsets of meta.mat as (ILSVRC2012_ID -> wnid, wnid -> words)."""
    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"].reshape(-1)
    except Exception as exc:  # noqa: BLE001 - foreign bytes: loadmat raises many types (MatReadError, v7.3's ...)
        raise DevkitError(f"{where} is not a readable meta.mat with a 'synsets' struct array ({exc})") from None
    missing = [f for f in REQUIRED_FIELDS if f not in (synsets.dtype.names or ())]
    if missing:
        raise DevkitError(f"{where}: the synsets have no field(s) {missing}; is this the ILSVRC2012 devkit?")
    wnid_of_id: dict[int, str] = {}
    words: dict[str, str] = {}
    for index, row in enumerate(synsets, 1):
        if _field(row, "num_children", int, where, index) != 0:
            continue
        sid, wnid = _field(row, "ILSVRC2012_ID", int, where, index), _field(row, "WNID", str, where, index)
        if not WNID.fullmatch(wnid):
            raise DevkitError(f"{where}: synset {index} has WNID {wnid!r}, not n + 8 digits; WNIDs become folder "
                              "names, so no other is accepted")
        if sid in wnid_of_id or wnid in words:
            raise DevkitError(f"{where}: ILSVRC2012_ID {sid} or WNID {wnid} appears twice among the leaf synsets")
        wnid_of_id[sid], words[wnid] = wnid, _field(row, "words", str, where, index)
    if not wnid_of_id:
        raise DevkitError(f"{where} lists no leaf synsets (num_children == 0): no classes")
    return wnid_of_id, words


def parse_ground_truth(text: str, where: str, wnid_of_id: dict[int, str]) -> list[int]:
    """One ILSVRC2012_ID per line; every ID must be a class of meta.mat."""
    ids = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.strip().isdigit() or int(line) not in wnid_of_id:
            raise DevkitError(f"{where} line {line_number}: {line.strip()!r} is not the ILSVRC2012_ID of a class "
                              f"in meta.mat (1..{max(wnid_of_id)})")
        ids.append(int(line))
    return ids


def read_devkit(path: Path, *, expected_md5: str | None) -> Devkit:
    """meta.mat and the val ground truth from the devkit tar.gz, verified in the same pass."""
    found: dict[str, bytes] = {}
    with read_archive(path, expected_md5=expected_md5) as archive:
        assert archive.tar is not None
        for member in archive.tar:
            relative = check_member(member, path.name).as_posix()
            for wanted in (META_MAT, GROUND_TRUTH):
                if member.isfile() and (relative == wanted or relative.endswith("/" + wanted)):
                    found[wanted] = member_bytes(archive.tar, member)
    for wanted in (META_MAT, GROUND_TRUTH):
        if wanted not in found:
            raise DevkitError(f"devkit {path} has no {wanted}: is it ILSVRC2012_devkit_t12.tar.gz, the "
                              "'Development kit (Task 1 & 2)' of ILSVRC2012?")
    wnid_of_id, words = parse_meta_mat(found[META_MAT], f"{path.name}:{META_MAT}")
    truth = parse_ground_truth(found[GROUND_TRUTH].decode("ascii", "replace"), f"{path.name}:{GROUND_TRUTH}",
                               wnid_of_id)
    return Devkit(wnid_of_id, words, truth, archive.stats)
