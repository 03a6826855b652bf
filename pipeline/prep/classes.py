"""The class list a prepared data dir carries: ``classes.tsv``, one line per class after a header.

Columns: ``index`` (the label a model predicts: the position of the wnid in sorted order, as torchvision's
ImageFolder assigns it; for CIFAR-10 the label of the archive, whose names are already sorted), ``wnid``
(the folder name; for CIFAR-10 the label name) and ``words`` (human-readable, from the devkit's meta.mat).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from pipeline.core.atomic import atomic_write_text

CLASSES_FILE = "classes.tsv"
HEADER = ("index", "wnid", "words")


class ClassEntry(NamedTuple):
    index: int
    wnid: str
    words: str


def _one_line(text: str) -> str:
    """Tabs and newlines would break the table; meta.mat words never need them."""
    return " ".join(text.split())


def write_classes(data_dir: str | Path, entries: Sequence[tuple[str, str]]) -> Path:
    """Write (wnid, words) pairs in label order as ``data_dir/classes.tsv``, atomically."""
    lines = ["\t".join(HEADER)]
    lines += [f"{index}\t{wnid}\t{_one_line(words)}" for index, (wnid, words) in enumerate(entries)]
    path = Path(data_dir) / CLASSES_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_classes(data_dir: str | Path) -> list[ClassEntry]:
    """The class list of a prepared data dir, in label order."""
    path = Path(data_dir) / CLASSES_FILE
    rows = path.read_text(encoding="utf-8").splitlines()
    if not rows or tuple(rows[0].split("\t")) != HEADER:
        raise ValueError(f"{path} does not start with the header {HEADER}; re-run the prep stage")
    entries = []
    for number, line in enumerate(rows[1:], 2):
        fields = line.split("\t", 2)
        if len(fields) != 3 or not (fields[0].isascii() and fields[0].isdigit()):
            raise ValueError(f"{path} line {number} is not 'index<TAB>wnid<TAB>words': {line[:80]!r}")
        entries.append(ClassEntry(int(fields[0]), fields[1], fields[2]))
    return entries
