"""Bad input to the packed layouts: hostile archives refused at prep, a truncated, changed or missing archive or
shard and an index from another data dir refused in one line, prep resumable and never half-written."""
from __future__ import annotations

import os
import re
import shutil
import gzip
import tarfile

import numpy as np
import pytest

from launch_helpers import no_slurm_path, run_main  # noqa: F401 (a fixture)
from layout_helpers import layout_config, prep_layouts
from pipeline.core.config import ConfigError
from pipeline.core.data_manifest import MANIFEST_FILE, Manifest, ManifestFile, read_manifest, write_manifest
from pipeline.core.sample_index import SampleIndexError, make_samples, read_samples, write_samples
from pipeline.core.validate import validate
from pipeline.data.loaders import DataDirError, dataset_info
from pipeline.data.staging import StagingError, stage_data
from pipeline.prep.archives import TRAIN_TAR, VAL_TAR, ArchiveError, UnsafeMemberError
from pipeline.prep.prepare import prepare
from prep_fixtures import replace_class_tar, tar_bytes, tar_members
from pipeline.prep.synthetic import file_md5, make_imagenet_archives


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return prep_layouts(tmp_path_factory.mktemp("packed"), layouts=("archives", "shards"))


def copy_layout(packed, layout, tmp_path):
    """A private copy of a prepared data dir (and, for archives, of the archives it reads) a test may damage."""
    archives, dirs = packed
    data_dir = tmp_path / "data"
    shutil.copytree(dirs[layout], data_dir)
    if layout == "archives":
        shutil.copytree(archives, tmp_path / "archives")
        text = (data_dir / MANIFEST_FILE).read_text().replace(str(archives.absolute()), str(tmp_path / "archives"))
        (data_dir / MANIFEST_FILE).write_text(text)
    return archives, data_dir


def one_line_error(cfg) -> str:
    with pytest.raises(DataDirError) as info:
        dataset_info(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("layout, victim", [("archives", TRAIN_TAR), ("shards", "shards/train-000000.tar")])
@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_truncated_or_missing_large_file_is_one_line_naming_it(packed, tmp_path, layout, victim, damage):
    archives, data_dir = copy_layout(packed, layout, tmp_path)
    path = (tmp_path / "archives" / victim) if layout == "archives" else data_dir / victim
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 512)
    else:
        path.unlink()
    cfg = layout_config(data_dir, archives, layout)
    message = one_line_error(cfg)
    assert str(path) in message and ("missing" if damage == "remove" else "truncated") in message
    assert "prepare (or stage) the data dir again" in message
    if layout == "shards":  # prep again on the finished data dir re-verifies its files
        with pytest.raises(DataDirError, match=f"{path} is .*, the manifest of .* says"):
            prepare(cfg)


def test_an_index_from_another_data_dir_or_layout_is_refused(packed, tmp_path):
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    shutil.copy(packed[1]["archives"] / "val.samples.npy", data_dir / "train.samples.npy")
    message = one_line_error(layout_config(data_dir, archives, "shards"))
    assert "train.samples.npy" in message and "another data dir" in message
    message = one_line_error(layout_config(data_dir, archives, "archives"))
    assert "holds the 'shards' layout" in message and "--layout shards" in message
    (tmp_path / "unfinished").mkdir()
    shutil.copy(data_dir / "classes.tsv", tmp_path / "unfinished")
    assert "has no manifest.json" in one_line_error(layout_config(tmp_path / "unfinished", archives, "shards"))


def test_an_index_of_the_same_shape_from_shards_with_another_seed_is_refused(packed, tmp_path):
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    other = tmp_path / "seed1"
    prepare(layout_config(other, archives, "shards", "--shard-seed", "1"))
    ours, theirs = read_manifest(data_dir).extra["samples"]["train"], read_manifest(other).extra["samples"]["train"]
    assert (ours["rows"], ours["bytes"]) == (theirs["rows"], theirs["bytes"])  # the same shape: only the digest tells
    shutil.copy(other / "train.samples.npy", data_dir / "train.samples.npy")
    message = one_line_error(layout_config(data_dir, archives, "shards"))
    assert "train.samples.npy has SHA-1" in message and "another --shard-seed" in message


def test_a_manifest_without_the_index_digest_is_refused_with_prep_again(packed, tmp_path):
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    manifest = read_manifest(data_dir)
    del manifest.extra["samples"]["train"]["sha1"]
    write_manifest(data_dir, manifest)
    message = one_line_error(layout_config(data_dir, archives, "shards"))
    assert "records no train.samples.npy (or no SHA-1 of it" in message and "prepare the data dir again" in message


def test_the_advice_for_a_damaged_shard_leads_to_a_copy_that_stages(packed, tmp_path):
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    shard = data_dir / "shards" / "train-000000.tar"
    with shard.open("r+b") as fh:  # same size, other bytes: prep on the finished dir (sizes only) would pass
        fh.seek(700)
        fh.write(b"\xff")
    with pytest.raises(StagingError, match=f"{shard} does not match .* remove {data_dir / MANIFEST_FILE} and run prep "
                                           "again"):
        stage_data(data_dir, tmp_path / "dest")
    (data_dir / MANIFEST_FILE).unlink()
    prepare(layout_config(data_dir, archives, "shards"))
    copy = stage_data(data_dir, tmp_path / "dest")
    assert dataset_info(layout_config(copy, archives, "shards")).train_size == 64


def test_prep_refuses_another_layout_in_a_prepared_data_dir_and_archives_with_delete(packed, tmp_path):
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    with pytest.raises(DataDirError, match="holds the shards layout; choose another --data-dir"):
        prepare(layout_config(data_dir, archives, "archives"))
    with pytest.raises(ConfigError, match="would delete the data itself"):
        validate(layout_config(data_dir, archives, "archives", "--delete-archives"), ["prep"])


@pytest.mark.parametrize("hostile, error, message", [
    ("compressed", ArchiveError, "is compressed"),
    ("link", UnsafeMemberError, "is a link"),
    ("past the end", ArchiveError, "past the end|truncated"),
])
def test_hostile_class_tars_are_refused_and_nothing_is_written(tmp_path, hostile, error, message):
    archives = make_imagenet_archives(tmp_path / "archives", num_classes=2, train_per_class=2, val_per_class=1,
                                      size=(16, 16)).archive_dir
    wnid = sorted(m.name for m, _ in tar_members(archives / TRAIN_TAR))[0].removesuffix(".tar")

    def change(data: bytes) -> bytes:
        if hostile == "compressed":
            return gzip.compress(data)
        if hostile == "link":
            link = tarfile.TarInfo("evil.JPEG")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            return tar_bytes([*tar_members(data), (link, None)])
        last = tar_members(data)[-1][0]
        return data[:last.offset_data + last.size // 2]  # the last member's data runs past the end of its class tar
    replace_class_tar(archives, wnid, change)
    data_dir = tmp_path / "data"
    with pytest.raises(error, match=message):
        prepare(layout_config(data_dir, archives, "archives"))
    assert not (data_dir / MANIFEST_FILE).exists() and not list(data_dir.glob("*.samples.npy"))


def test_shard_prep_resumes_keeping_verified_shards_and_rewriting_a_damaged_one(tmp_path):
    archives, dirs = prep_layouts(tmp_path, layouts=("shards",), num_classes=8, train_per_class=40,
                                  val_per_class=2, size=(200, 150))
    data_dir = dirs["shards"]
    shards = sorted((data_dir / "shards").glob("train-*.tar"))
    assert len(shards) >= 2  # about 1 MB each
    before = {p.name: p.read_bytes() for p in shards}
    inodes = {p.name: p.stat().st_ino for p in shards}
    (data_dir / MANIFEST_FILE).unlink()  # as if killed before the end
    (data_dir / "train.samples.npy").unlink()
    os.truncate(shards[0], 1024)
    archive_files = {p.name: p.stat().st_mtime_ns for p in archives.iterdir()}
    prepare(layout_config(data_dir, archives, "shards"))
    assert {p.name: p.stat().st_mtime_ns for p in archives.iterdir()} == archive_files  # nothing written there
    assert {p.name: p.read_bytes() for p in shards} == before  # rewritten identically, others kept
    assert [p.stat().st_ino == inodes[p.name] for p in shards] == [False] + [True] * (len(shards) - 1)
    assert dataset_info(layout_config(data_dir, archives, "shards")).train_size == 320


def test_the_dry_run_shows_the_layout_each_stage_writes_or_reads(no_slurm_path, tmp_path, capsys):
    for stage, verb in (("prep", "writes"), ("train", "reads")):
        code, out, _ = run_main(capsys, "--stage", stage, "--layout", "shards", "--executor", "slurm", "--dry-run",
                                "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "run")
        assert code == 0
        assert f"===== {stage}: {verb} the 'shards' layout in {tmp_path / 'data'} (--layout) =====" in out


@pytest.mark.parametrize("option, message", [
    (("--shard-seed", "2"), "made with shard_seed 0 (--shard-seed), not 2"),
    (("--shard-size-mb", "2"), "made with shard_size_mb 1 (--shard-size-mb), not 2"),
    (("--shard-max-side", "32"), "made with resize None (--shard-max-side/--shard-quality), not {'max_side': 32"),
])
def test_prep_on_finished_shards_refuses_other_shard_options(packed, tmp_path, option, message):
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    with pytest.raises(DataDirError, match=f"{data_dir} holds shards {re.escape(message)}.*remove {data_dir}/"
                                           "manifest.json and run prep again") as info:
        prepare(layout_config(data_dir, archives, "shards", *option))
    assert "\n" not in str(info.value)
    prepare(layout_config(data_dir, archives, "shards"))  # the options it was prepared with: re-verified


def test_a_kept_scan_is_not_reused_for_an_archive_of_the_same_size_changed_since(packed, tmp_path):
    archives, data_dir = copy_layout(packed, "archives", tmp_path)
    val_tar = tmp_path / "archives" / VAL_TAR
    offset = int(np.load(data_dir / "val.samples.npy")["offset"][0])
    with val_tar.open("r+b") as fh:  # same size, other bytes, a later mtime
        fh.seek(offset + 100)
        fh.write(b"\x00\x01")
    (data_dir / MANIFEST_FILE).unlink()
    prepare(layout_config(data_dir, tmp_path / "archives", "archives"))
    recorded = {f.name: f.md5 for f in read_manifest(data_dir).files}
    assert recorded[VAL_TAR] == file_md5(val_tar)


@pytest.mark.parametrize("offset, length, message", [
    (2 ** 64 - 10, 20, r"row 0 starts at byte 18,446,744,073,709,551,606 of a.tar, beyond its 1,073,741,824 bytes"),
    (0, 100 << 20, "has an image of 104,857,600 bytes, above the 67,108,864"),
])
def test_an_index_row_past_its_file_or_too_long_is_refused(tmp_path, offset, length, message):
    """A hostile index whose manifest record matches it: offset + length wraps around in uint64, or one image would
    fill the memory of a loader worker."""
    samples = make_samples([(0, offset, length, 0, "a.JPEG"), (0, 0, 10, 1, "b.JPEG")])
    manifest = Manifest("archives", str(tmp_path), (ManifestFile("a.tar", 1 << 30, "0" * 32),), (),
                        {"samples": {"train": write_samples(tmp_path, "train", samples)}})
    with pytest.raises(SampleIndexError, match=message):
        read_samples(tmp_path, "train", manifest, num_classes=2)


def test_a_plan_of_more_shards_than_the_index_can_name_is_refused_before_any_is_written(packed, tmp_path):
    """The index's file field is uint16. 70,000 images of 1 MB each (a kept scan says so) at --shard-size-mb 1 would
    be 70,000 shards: refused after the scan, before the first shard is written."""
    archives, data_dir = copy_layout(packed, "shards", tmp_path)
    (data_dir / MANIFEST_FILE).unlink()
    shutil.rmtree(data_dir / "shards")
    n = 70_000
    rows = make_samples([(0, 0, 10 ** 6, 0, f"{i:06d}.JPEG") for i in range(n)])
    np.save(data_dir / ".prep" / "scan-train.npy", rows, allow_pickle=False)
    val = len(np.load(data_dir / ".prep" / "scan-val.npy"))
    with pytest.raises(ArchiveError, match=f"cuts the {n + val:,} images into {n + 1:,} shards, more than the 65,536 "
                                           "the sample index can name; pass a larger --shard-size-mb"):
        prepare(layout_config(data_dir, archives, "shards"))
    assert not list((data_dir / "shards").glob("*.tar")) and not (data_dir / MANIFEST_FILE).exists()
