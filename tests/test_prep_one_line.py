"""Bad input to ``python -m jobs.prep`` is one ``error:`` line and status 2, never a traceback (issue 13's list)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.prep.synthetic import TRAIN_TAR
from prep_fixtures import archive_dir, archives  # noqa: F401 (fixtures)
from prep_fixtures import (assert_one_line_error, replace_class_tar, rewrite_meta_mat, run_prep_cli, tar_bytes,
                           tar_members)


@pytest.fixture
def open_dir():
    """A scratch folder every user may enter, for a prep run without root's right to read anything."""
    folder = Path(tempfile.mkdtemp(prefix="prep-one-line-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o777)
    shutil.rmtree(folder)


def unprivileged() -> list[str]:
    """The prefix that runs a command without permission overrides: root enters a user namespace as nobody."""
    return ["unshare", "--user"] if os.geteuid() == 0 else []


def prep(archive_dir: Path, data_dir: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_prep_cli("--archive-dir", str(archive_dir), "--data-dir", str(data_dir), "--skip-checksum",
                        prefix=prefix or [])


@pytest.mark.parametrize("unreadable", ["archive", "archive dir"])
def test_unreadable_archive_or_archive_dir(archives, open_dir, unreadable):
    archive_dir, data_dir = open_dir / "archives", open_dir / "data"
    shutil.copytree(archives.archive_dir, archive_dir)
    data_dir.mkdir(mode=0o777)
    data_dir.chmod(0o777)
    target = archive_dir / TRAIN_TAR if unreadable == "archive" else archive_dir
    target.chmod(0)
    if subprocess.run([*unprivileged(), "test", "-r", str(target)]).returncode == 0:
        pytest.fail("cannot take away read permission here (root without user namespaces): run the tests as a "
                    "user, or where unshare --user works")
    assert_one_line_error(prep(archive_dir, data_dir, unprivileged()), f"cannot read {target}: Permission denied")
    assert not (data_dir / "prep_report.json").exists()


@pytest.mark.parametrize("where", ["data dir", "its parent"])
def test_data_dir_that_is_a_file(archives, tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    data_dir = tmp_path / "file" if where == "data dir" else tmp_path / "file" / "data"
    message = f"(--data-dir) {data_dir} is a file" if where == "data dir" else f"cannot create --data-dir {data_dir}"
    assert_one_line_error(prep(archives.archive_dir, data_dir), message)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_duplicate_member_in_a_class_tar(archives, archive_dir, tmp_path):
    wnid = archives.wnids[0]
    replace_class_tar(archive_dir, wnid, lambda data: tar_bytes([*tar_members(data), tar_members(data)[-1]]))
    assert_one_line_error(prep(archive_dir, tmp_path / "d"), f"{TRAIN_TAR}:{wnid}.tar holds ")


def test_meta_mat_field_of_the_wrong_type(archive_dir, tmp_path):
    def change(synsets: np.ndarray) -> None:
        synsets["num_children"][0, 0] = np.array(["none"])

    rewrite_meta_mat(archive_dir, change)
    assert_one_line_error(prep(archive_dir, tmp_path / "d"), "synset 1 has num_children = 'none'")
