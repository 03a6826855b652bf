"""Helpers shared by the prep tests: small official-shaped archives, tar surgery, and the checks of a tree."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pytest
import scipy.io

from pipeline.prep.synthetic import DEVKIT_TAR, TRAIN_TAR, SyntheticImageNet, make_imagenet_archives

REPO = Path(__file__).resolve().parents[1]


def small_archives(out_dir: Path, **overrides) -> SyntheticImageNet:
    """6 classes x 5 train, 4 val per class; val 3 and 17 left out, 2 val files without ground truth."""
    params = dict(num_classes=6, train_per_class=5, val_per_class=4, missing_val=(3, 17), unlabelled_val=2,
                  size=(32, 28), seed=5)
    return make_imagenet_archives(out_dir, **{**params, **overrides})


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> SyntheticImageNet:
    """The small archives, made once per test module (import this fixture by name)."""
    return small_archives(tmp_path_factory.mktemp("archives"))


@pytest.fixture
def archive_dir(archives: SyntheticImageNet, tmp_path: Path) -> Path:
    """A private copy of the archives that a test may damage."""
    folder = tmp_path / "archives"
    shutil.copytree(archives.archive_dir, folder)
    return folder


def tar_members(source: Path | bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """(member, data) pairs of a tar file, or of a tar held in memory."""
    with (tarfile.open(fileobj=io.BytesIO(source)) if isinstance(source, bytes) else tarfile.open(source)) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def write_tar(path: Path, members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def tar_bytes(members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def replace_class_tar(archive_dir: Path, wnid: str, change: Callable[[bytes], bytes]) -> None:
    """Rewrite the train archive with ``<wnid>.tar`` replaced by ``change(its bytes)``."""
    path = archive_dir / TRAIN_TAR
    write_tar(path, [file_member(m.name, change(d)) if m.name == f"{wnid}.tar" else (m, d)
                     for m, d in tar_members(path)])


def rewrite_meta_mat(archive_dir: Path, change: Callable[[np.ndarray], None]) -> None:
    """Rewrite the devkit with its meta.mat synsets (an N x 1 struct array, leaves first) edited by ``change``."""
    path = archive_dir / DEVKIT_TAR
    members = tar_members(path)
    for i, (info, data) in enumerate(members):
        if info.name.endswith("data/meta.mat"):
            synsets = scipy.io.loadmat(io.BytesIO(data))["synsets"]
            change(synsets)
            buf = io.BytesIO()
            scipy.io.savemat(buf, {"synsets": synsets})
            members[i] = file_member(info.name, buf.getvalue())
    write_tar(path, members)


def run_prep_cli(*args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``python -m jobs.prep ARGS`` from the repo root (``prefix``: e.g. a command that drops privileges)."""
    return subprocess.run([*prefix, sys.executable, "-m", "jobs.prep", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Bad input: status 2 and one ``jobs.prep: error:`` line holding ``message``, no traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("jobs.prep: error: ") and message in lines[-1], result.stderr
    assert sum(line.startswith("jobs.prep:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr


def train_class_bytes(info: SyntheticImageNet, wnid: str) -> dict[str, bytes]:
    """File name -> bytes of one class, read straight from the archive (the truth a tree is checked against)."""
    with tarfile.open(info.archive_dir / "ILSVRC2012_img_train.tar") as outer:
        with tarfile.open(fileobj=outer.extractfile(f"{wnid}.tar")) as inner:
            return {m.name: inner.extractfile(m).read() for m in inner.getmembers()}


def assert_prepared(info: SyntheticImageNet, data_dir: Path) -> None:
    """Every train file in its class with the archive's bytes; every val file in the folder of its label."""
    for wnid in info.wnids:
        expected = train_class_bytes(info, wnid)
        folder = data_dir / "train" / wnid
        assert sorted(p.name for p in folder.iterdir()) == sorted(expected), wnid
        assert all((folder / name).read_bytes() == data for name, data in expected.items())
    placed = {p.name: p.parent.name for p in (data_dir / "val").glob("*/*")}
    assert placed == info.val_labels
    assert not list(data_dir.rglob("*.tmp")) and not list(data_dir.glob(".*.partial"))
