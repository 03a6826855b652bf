"""An interrupted prep resumes class by class and never leaves a half class that looks complete."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.prep.prepare import prepare_imagenet
from prep_fixtures import REPO, assert_prepared, small_archives, train_class_bytes


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return small_archives(tmp_path_factory.mktemp("archives"))


def test_leftover_temp_dir_is_cleaned_and_finished_classes_are_skipped(archives, tmp_path):
    """The state a killed run leaves: two finished classes, one half-written ``.tmp`` class."""
    staging = tmp_path / ".train.partial"
    done, half = archives.wnids[:2], archives.wnids[2]
    for wnid in done:
        (staging / wnid).mkdir(parents=True)
        for name, data in train_class_bytes(archives, wnid).items():
            (staging / wnid / name).write_bytes(data)
    (staging / f"{half}.tmp").mkdir()
    first_name, first_data = next(iter(train_class_bytes(archives, half).items()))
    (staging / f"{half}.tmp" / first_name).write_bytes(first_data[: len(first_data) // 2])
    inodes = {p.name: p.stat().st_ino for wnid in done for p in (staging / wnid).iterdir()}

    report = prepare_imagenet(archives.archive_dir, tmp_path, workers=2, expected_md5=archives.md5)
    assert_prepared(archives, tmp_path)
    assert {p.name: p.stat().st_ino for wnid in done for p in (tmp_path / "train" / wnid).iterdir()} == inodes
    assert report["archives"]["ILSVRC2012_img_train.tar"]["checksum"] == "ok"


def prep_process(archive_dir, data_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.prep", "--archive-dir", str(archive_dir), "--data-dir",
                             str(data_dir), "--skip-checksum", "--workers", "1"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_prep_killed_mid_train_resumes_to_a_complete_correct_tree(tmp_path):
    """SIGKILL (no clean-up runs) as soon as the first class is finished, then run prep again."""
    big = small_archives(tmp_path / "archives", num_classes=120, train_per_class=8, val_per_class=1, missing_val=(),
                         unlabelled_val=0, size=(96, 80))
    data_dir = tmp_path / "data"
    staging = data_dir / ".train.partial"
    process = prep_process(big.archive_dir, data_dir)
    deadline = time.monotonic() + 60
    while not (staging.is_dir() and any(not p.name.endswith(".tmp") for p in staging.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "prep ended before a class was finished"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = [p.name for p in staging.iterdir() if not p.name.endswith(".tmp")]
    assert not (data_dir / "train").exists() and not (data_dir / "prep_report.json").exists()
    assert 1 <= len(finished) < 120
    for wnid in finished:  # a class folder under its final name is always complete
        assert sorted(p.name for p in (staging / wnid).iterdir()) == sorted(big.train_files[wnid])

    again = prep_process(big.archive_dir, data_dir)
    _, log = again.communicate(timeout=120)
    assert again.returncode == 0, log
    assert f"resuming: {len(finished)} of 120 classes are already extracted" in log
    assert_prepared(big, data_dir)
    shutil.rmtree(tmp_path / "archives")
