"""Node-local staging on real files: the copy is complete, verified and self-contained; a requeue reuses a verified
copy without reading the source again; a changed, truncated or missing source file, a full disk and a data dir
without a manifest each fail with one line and leave nothing usable; a waiting process takes over from a copier
that died."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import fcntl
import filecmp
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from pipeline.core.config import Config
from pipeline.core.data_manifest import Manifest, ManifestFile, files_dir, read_manifest, write_manifest
from pipeline.core.validate import validate
from pipeline.data.staging import LOCK_FILE, STAGED_FROM, StagingError, expand_dest, stage_data, staged_dir
from pipeline.data.verified_copy import CHUNK, copy_verified
from pipeline.prep.synthetic import make_image_folder
from staging_helpers import packed_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_dir(tmp_path):
    return packed_data_dir(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=2, size=(24, 24))


def leftovers(folder):
    return sorted(p.name for p in folder.rglob(".*.part"))


def test_the_copy_is_a_verified_self_contained_data_dir_named_after_its_source(data_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        copy = stage_data(data_dir, tmp_path / "dest")
    assert copy == staged_dir(data_dir, tmp_path / "dest") and copy.parent == tmp_path / "dest"
    assert copy.name.startswith("data-") and copy != staged_dir(tmp_path / "other" / "data", tmp_path / "dest",
                                                                read_manifest(data_dir))
    source, staged = read_manifest(data_dir), read_manifest(copy)
    assert staged.files == source.files and staged.meta == source.meta and staged.files_root == "files"
    assert staged.extra == {STAGED_FROM: str(data_dir.resolve())}
    for f in source.files:
        assert filecmp.cmp(files_dir(data_dir, source) / f.name, files_dir(copy, staged) / f.name, shallow=False)
    assert all(filecmp.cmp(data_dir / name, copy / name, shallow=False) for name in source.meta)
    assert leftovers(copy) == [] and "staging 2 of the 2 files" in caplog.text and "B/s" in caplog.text


def test_a_requeue_reuses_the_verified_copy_without_reading_the_source_again(data_dir, tmp_path, caplog):
    copy = stage_data(data_dir, tmp_path / "dest")
    manifest = read_manifest(data_dir)
    first, second = (copy / "files" / f.name for f in manifest.files)
    before = first.stat()
    for f in manifest.files:  # same sizes, other bytes: a reader of the source would fail its md5
        path = files_dir(data_dir, manifest) / f.name
        path.write_bytes(b"x" * f.size)
    with caplog.at_level(logging.INFO):
        assert stage_data(data_dir, tmp_path / "dest") == copy
    assert "using its staged copy" in caplog.text and (first.stat().st_ino, first.stat().st_mtime_ns) == (
        before.st_ino, before.st_mtime_ns)
    second.write_bytes(second.read_bytes()[:-1])  # the copy itself damaged since: copied again, and now refused
    (copy / "files" / ".shard-000000.tar.part").write_bytes(b"cut short")  # a kill in the middle of a copy
    with pytest.raises(StagingError, match=f"{files_dir(data_dir, manifest) / second.name} does not match"):
        stage_data(data_dir, tmp_path / "dest")
    assert not (copy / "manifest.json").exists() and leftovers(copy) == []


def test_a_copy_cut_short_is_finished_by_the_next_attempt_copying_only_what_is_missing(data_dir, tmp_path, caplog):
    copy = stage_data(data_dir, tmp_path / "dest")
    (copy / "manifest.json").unlink()  # as a kill before the end leaves it
    (copy / "files" / "shard-000001.tar").unlink()
    with caplog.at_level(logging.INFO):
        stage_data(data_dir, tmp_path / "dest")
    assert "staging 1 of the 2 files" in caplog.text and read_manifest(copy).files == read_manifest(data_dir).files


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "has {size} bytes but its data manifest says"),
    (lambda p: p.write_bytes(b"\0" + p.read_bytes()[1:]), "does not match its data manifest"),
    (lambda p: p.unlink(), "is missing, but the data manifest lists it"),
])
def test_a_changed_truncated_or_missing_source_fails_naming_it_and_nothing_is_used(data_dir, tmp_path, damage,
                                                                                   message):
    manifest = read_manifest(data_dir)
    bad = files_dir(data_dir, manifest) / manifest.files[0].name
    damage(bad)
    size = bad.stat().st_size if bad.exists() else 0
    with pytest.raises(StagingError, match=message.format(size=size)) as info:
        stage_data(data_dir, tmp_path / "dest", workers=1)
    assert str(bad) in str(info.value) and f"remove {data_dir}/manifest.json and run prep again" in str(info.value)
    copy = staged_dir(data_dir, tmp_path / "dest")
    assert not (copy / "manifest.json").exists() and list((copy / "files").iterdir()) == []  # the next one not begun
    assert leftovers(copy) == []


@pytest.fixture
def small_dest(tmp_path):
    """A real folder with 1 MiB free: a tmpfs, mounted as root (as CI and `make test` run)."""
    dest = tmp_path / "small"
    dest.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(dest)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.fail(f"the staging space tests mount a 1 MiB tmpfs, which takes root: {mounted.stderr.strip()}")
    yield dest
    subprocess.run(["umount", str(dest)], check=True)


def test_a_destination_without_space_fails_before_copying_naming_it_and_the_bytes(tmp_path, small_dest):
    data_dir = packed_data_dir(tmp_path / "big", num_classes=2, train_per_class=60, val_per_class=2,
                               size=(220, 220), shards=1)
    need = read_manifest(data_dir).total_size + sum((data_dir / n).stat().st_size for n in read_manifest(data_dir).meta)
    assert need > 1 << 20  # the fixture is larger than the free space
    with pytest.raises(StagingError, match=rf"{small_dest}/big-\w+ has \d+ bytes .* free but staging {data_dir} needs "
                                           rf"{need} bytes .*free space there or pass another --stage-data-to"):
        stage_data(data_dir, small_dest)
    assert not list(small_dest.rglob("*.tar")) and not list(small_dest.rglob("classes.tsv"))


def one_big_shard(root):
    """A data dir of one 2 MiB shard and no meta files."""
    blob = os.urandom(2 << 20)
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "shard-000000.tar").write_bytes(blob)
    write_manifest(root, Manifest("shards", "shards", (ManifestFile("shard-000000.tar", len(blob),
                                                                    hashlib.md5(blob).hexdigest()),), (), {}))
    return root


@pytest.mark.parametrize("full_at", ["a shard", "a meta file"])
def test_a_disk_that_fills_during_the_copy_fails_with_one_line_and_keeps_nothing(tmp_path, small_dest, full_at,
                                                                                  monkeypatch):
    data_dir = one_big_shard(tmp_path / "big") if full_at == "a shard" else packed_data_dir(
        tmp_path / "big", num_classes=2, train_per_class=60, val_per_class=2, size=(220, 220), shards=1)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))  # another job's writes
    with pytest.raises(StagingError, match=r"copying .* to .* failed: No space left on device; free space there or "
                                           "pass another --stage-data-to"):
        stage_data(data_dir, small_dest)
    assert not list(small_dest.rglob("*.tar")) and not list(small_dest.rglob("manifest.json"))
    assert not list(small_dest.rglob("*.tmp")) and leftovers(small_dest) == []


def test_a_staging_folder_this_user_cannot_write_is_named(data_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StagingError, match=f"cannot write {tmp_path}/file/data-.*/.staging.lock"):
        stage_data(data_dir, tmp_path / "file")


def test_a_data_dir_without_a_manifest_is_refused_by_the_launcher_and_by_the_job(tmp_path, no_slurm_path,  # noqa: F811
                                                                                 capsys):
    folders = make_image_folder(tmp_path / "folders", num_classes=2, train_per_class=2, val_per_class=1)
    with pytest.raises(StagingError, match=f"data dir {folders} has no manifest.json: .*--layout shards"):
        stage_data(folders, tmp_path / "dest")
    code, out, err = run_main(capsys, "--stage", "train", "--data-dir", folders, "--run-dir", tmp_path / "run",
                              "--layout", "shards", "--stage-data-to", tmp_path / "dest", "--device", "cpu")
    assert code == 2 and "has no manifest.json: --stage-data-to copies a packed data dir" in err
    assert not (tmp_path / "dest").exists() and not (tmp_path / "run" / "logs").exists()


def test_dry_run_shows_the_staging_step_with_the_variable_left_for_the_node(data_dir, tmp_path, no_slurm_path,  # noqa: F811
                                                                           capsys):
    code, out, _ = run_main(capsys, "--stage", "train", "--executor", "slurm", "--dry-run", "--data-dir", data_dir,
                            "--run-dir", tmp_path / "run", "--layout", "shards",
                            "--stage-data-to", "$TMPDIR/stage")
    staged = staged_dir(data_dir, tmp_path).name
    assert code == 0 and (f"===== train: the processes of each node first stage data dir {data_dir} to "
                          f"$TMPDIR/stage/{staged} (variables expanded on the node): one copies") in out
    assert out.index("first stage data dir") < out.index("runs one torchrun") and not (tmp_path / "run" / "logs").exists()
    code, out, _ = run_main(capsys, "--stage", "all", "--executor", "slurm", "--dry-run", "--data-dir",
                            tmp_path / "unprepared", "--archive-dir", tmp_path, "--run-dir", tmp_path / "run",
                            "--layout", "shards", "--stage-data-to", "/scratch")  # the copy's name waits for prep
    assert code == 0 and "to /scratch/unprepared-<hash of its path and manifest> (variables" in out


@pytest.mark.parametrize("value, ok", [("/scratch/x", True), ("$TMPDIR", True), ("${TMPDIR}/a b/c", True),
                                       ("$SLURM_TMPDIR/$USER", True), ("", True), ("scratch", False),
                                       ("$(id)", False), ("/x/`id`", False), ("/x/$", False), ("/a\nb", False)])
def test_the_staging_folder_is_an_absolute_path_or_starts_with_a_variable(value, ok):
    cfg = Config()
    cfg.data.layout, cfg.data.stage_data_to = "archives", value
    if ok:
        validate(cfg, ["report"])
    else:
        with pytest.raises(ValueError, match="stage_data_to"):
            validate(cfg, ["report"])


def test_staging_a_folders_layout_is_refused_before_anything_is_submitted():
    cfg = Config()
    cfg.data.stage_data_to = "/scratch/x"
    with pytest.raises(ValueError, match="'folders' layout is a million small files: prep with --layout archives"):
        validate(cfg, ["train"])


def test_the_folder_expands_on_the_node_and_an_unset_variable_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("NO_SUCH_VARIABLE_HERE", raising=False)
    assert expand_dest("${TMPDIR}/stage") == tmp_path / "stage"
    with pytest.raises(StagingError, match=r"\$NO_SUCH_VARIABLE_HERE is not set on host"):
        expand_dest("$NO_SUCH_VARIABLE_HERE/x")
    monkeypatch.setenv("TMPDIR", "relative")
    with pytest.raises(StagingError, match="not an absolute path"):
        expand_dest("$TMPDIR")


HOLD = """
import sys, time
from pipeline.core.dir_lock import locked
with locked(sys.argv[1], "staging", lock_file=sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_waiting_process_takes_over_when_the_copier_dies(data_dir, tmp_path, caplog):
    copy = staged_dir(data_dir, tmp_path / "dest")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(copy), LOCK_FILE], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        with caplog.at_level(logging.INFO):
            killer = subprocess.Popen(["bash", "-c", f"sleep 2; kill -9 {holder.pid}"])
            stage_data(data_dir, tmp_path / "dest", every_s=0.5)
        killer.wait()
    finally:
        holder.kill()
        holder.wait()
    assert time.monotonic() - start >= 2 and f"pid {holder.pid}" in caplog.text and "waiting for it" in caplog.text
    assert read_manifest(copy) is not None and json.loads((copy / "verified.json").read_text())["files"]


def test_an_absolute_files_root_is_staged_and_a_rewritten_equal_manifest_keeps_the_copy(tmp_path, caplog):
    data_dir = packed_data_dir(tmp_path / "data", files_root=str(tmp_path / "elsewhere"), num_classes=2,
                               train_per_class=2, val_per_class=1)
    copy = stage_data(data_dir, tmp_path / "dest")
    assert sorted(p.name for p in (copy / "files").iterdir()) == sorted(p.name for p in (tmp_path / "elsewhere").iterdir())
    write_manifest(data_dir, read_manifest(data_dir))  # prep run again on the same files
    caplog.clear()  # the first staging's lines are kept too when an earlier test set the root logger to INFO
    with caplog.at_level(logging.INFO):
        stage_data(data_dir, tmp_path / "dest")
    assert "using its staged copy" in caplog.text and not [m for m in caplog.messages if m.startswith("staging")]


def planted(data_dir, dest, plant):
    """The copy's folder as another user on a shared node could prepare it in advance (its name is predictable)."""
    target = staged_dir(data_dir, dest)
    dest.mkdir(parents=True, exist_ok=True)
    plant(target)
    return target


@pytest.mark.parametrize("plant, message", [
    (lambda t: (t.mkdir(), os.chown(t, 65534, -1)), "owned by uid 65534"),
    (lambda t: (t.mkdir(), t.chmod(0o777)), "writable by others"),
    (lambda t: t.symlink_to(t.parent.parent / "victim", target_is_directory=True), "a link or not a folder"),
])
def test_a_copy_folder_another_user_could_have_made_or_linked_is_refused(data_dir, tmp_path, plant, message):
    (tmp_path / "victim").mkdir()
    target = planted(data_dir, tmp_path / "dest", plant)
    with pytest.raises(StagingError, match=f"{target} is {message}.*not trusted: remove it"):
        stage_data(data_dir, tmp_path / "dest")
    assert list((tmp_path / "victim").iterdir()) == []


@pytest.mark.parametrize("plant, message", [
    (lambda lock, victim: lock.symlink_to(victim), "cannot write {} .*symbolic links"),
    (lambda lock, victim: os.mkfifo(lock), "{} is not a regular file"),
])
def test_a_lock_file_linked_to_another_file_is_neither_followed_nor_truncated(data_dir, tmp_path, plant, message):
    victim = tmp_path / "victim.bashrc"
    victim.write_text("keep me\n")
    target = staged_dir(data_dir, tmp_path / "dest")
    stage_data(data_dir, tmp_path / "dest")
    (target / LOCK_FILE).unlink()
    plant(target / LOCK_FILE, victim)
    with pytest.raises(StagingError, match=message.format(target / LOCK_FILE)):
        stage_data(data_dir, tmp_path / "dest")
    assert victim.read_text() == "keep me\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_a_source_prepared_again_gets_a_new_copy_and_the_copy_in_use_is_not_rewritten(data_dir, tmp_path):
    old = stage_data(data_dir, tmp_path / "dest")
    manifest = read_manifest(data_dir)
    in_use = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (old / "files").iterdir()}
    shard = files_dir(data_dir, manifest) / manifest.files[0].name
    with shard.open("ab") as fh:  # prep again wrote other bytes into a shard of the same name
        fh.write(b"\0" * 1024)
    changed = ManifestFile(shard.name, shard.stat().st_size, hashlib.md5(shard.read_bytes()).hexdigest())
    write_manifest(data_dir, dataclasses.replace(manifest, files=(changed, *manifest.files[1:])))
    new = stage_data(data_dir, tmp_path / "dest")
    assert new != old and new.name.startswith("data-") and read_manifest(new).files[0] == changed
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in (old / "files").iterdir()} == in_use
    assert read_manifest(old).files == manifest.files


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(b"damaged"), lambda p: p.unlink()])
def test_a_damaged_or_missing_meta_file_of_the_copy_is_copied_again(data_dir, tmp_path, damage):
    copy = stage_data(data_dir, tmp_path / "dest")
    name = read_manifest(data_dir).meta[0]
    damage(copy / name)
    assert stage_data(data_dir, tmp_path / "dest") == copy
    assert (copy / name).read_bytes() == (data_dir / name).read_bytes()


def test_a_destination_without_file_locks_is_refused_in_one_line(data_dir, tmp_path, monkeypatch):
    """NFS without lockd answers ENOLCK: run.lock goes on with a warning, staging must not (every rank would copy)."""
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(StagingError, match=f"^--stage-data-to: {tmp_path / 'dest'} takes no file locks; pass a "
                                           "node-local folder"):
        stage_data(data_dir, tmp_path / "dest")
    assert not list((tmp_path / "dest").rglob("*.tar"))


def test_two_copiers_of_one_file_each_write_their_own_temporary_file(tmp_path):
    """Were the lock not to hold (a file system without locks), both copies must still end verified."""
    blob = os.urandom(CHUNK + 1024)  # two chunks: both copiers are inside their copy at the barrier
    (tmp_path / "source").write_bytes(blob)
    entry = ManifestFile("source", len(blob), hashlib.md5(blob).hexdigest())
    barrier = threading.Barrier(2, timeout=30)
    target = tmp_path / "files" / "copy"

    def copier() -> None:
        first = [True]

        def progress(n: int) -> None:  # after the first chunk, wait for the other copier's first chunk
            if first.pop() if first else False:
                barrier.wait()
        copy_verified(tmp_path / "source", target, entry, progress, data_dir=tmp_path)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(copier) for _ in range(2)]:
            done.result()
    assert target.read_bytes() == blob and leftovers(tmp_path) == []


def test_old_copies_to_replace_and_unlisted_files_give_their_space_before_it_is_measured(tmp_path, small_dest):
    data_dir = tmp_path / "data"
    blob = os.urandom(600 << 10)  # 600 KiB of 1 MiB: a second copy beside the first does not fit
    (data_dir / "shards").mkdir(parents=True)
    (data_dir / "shards" / "shard-000000.tar").write_bytes(blob)
    write_manifest(data_dir, Manifest("shards", "shards", (ManifestFile("shard-000000.tar", len(blob),
                                                                        hashlib.md5(blob).hexdigest()),), (), {}))
    copy = stage_data(data_dir, small_dest)
    with (copy / "files" / "shard-000000.tar").open("r+b") as fh:  # the copy damaged: it is copied again
        fh.write(b"damaged")
    (copy / "files" / "stray.bin").write_bytes(b"\0" * (100 << 10))  # listed by no manifest
    assert stage_data(data_dir, small_dest) == copy
    assert (copy / "files" / "shard-000000.tar").read_bytes() == blob
    assert sorted(p.name for p in (copy / "files").iterdir()) == ["shard-000000.tar"]
