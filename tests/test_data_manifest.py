"""The data manifest contract: a written manifest reads back equal (extra keys kept), a data dir without one gives
None, and a malformed manifest or an unsafe name fails with one line naming the file and what is wrong."""
from __future__ import annotations

import json

import pytest

from pipeline.core.data_manifest import (DataManifestError, Manifest, ManifestFile, files_dir, manifest_path,
                                         read_manifest, write_manifest)

MD5 = "0123456789abcdef0123456789abcdef"


def manifest(**changes) -> Manifest:
    fields = dict(layout="shards", files_root="shards",
                  files=(ManifestFile("train-000000.tar", 1024, MD5), ManifestFile("val/val-000000.tar", 7, MD5)),
                  meta=("classes.tsv", "train.samples.npy"), extra={"resize": {"max_side": 320, "quality": 90}})
    fields.update(changes)
    return Manifest(**fields)


def test_a_written_manifest_reads_back_equal_and_a_data_dir_without_one_gives_none(tmp_path):
    assert read_manifest(tmp_path) is None
    written = manifest()
    assert write_manifest(tmp_path, written) == manifest_path(tmp_path)
    read = read_manifest(tmp_path)
    assert read == written and read.total_size == 1031
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left beside it


def test_files_dir_resolves_a_relative_root_against_the_data_dir_and_keeps_an_absolute_one(tmp_path):
    assert files_dir(tmp_path / "data", manifest(files_root="files")) == tmp_path / "data" / "files"
    assert files_dir(tmp_path / "data", manifest(files_root=str(tmp_path / "arch"))) == tmp_path / "arch"


def test_unknown_keys_are_kept_for_the_layouts_that_use_them(tmp_path):
    data = json.loads(json.dumps({"format": "data manifest v1", "layout": "archives", "files_root": "/archives",
                                  "files": [], "meta": [], "splits": {"train": 3}}))
    manifest_path(tmp_path).write_text(json.dumps(data))
    assert read_manifest(tmp_path).extra == {"splits": {"train": 3}}


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.tar", "a/../../b", "a//b", "a/./b", "dir/", "",
                                  "a\\b", "bad\nname", 7])
def test_an_unsafe_file_or_meta_name_is_refused_when_read_and_when_written(tmp_path, name):
    data = {"format": "data manifest v1", "layout": "shards", "files_root": "shards",
            "files": [{"name": name, "size": 1, "md5": MD5}], "meta": []}
    manifest_path(tmp_path).write_text(json.dumps(data))
    with pytest.raises(DataManifestError, match=f"{manifest_path(tmp_path)}.*(unsafe name|non-empty string)"):
        read_manifest(tmp_path)
    with pytest.raises(DataManifestError, match="unsafe name|non-empty string"):
        write_manifest(tmp_path / "w", manifest(meta=(name,)))
    assert not (tmp_path / "w" / "manifest.json").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="data manifest v2"), "is not 'data manifest v1'"),
    (lambda d: d.pop("meta"), r"missing keys \['meta'\]"),
    (lambda d: d.update(layout="folders"), "layout 'folders' is not one of"),
    (lambda d: d.update(files_root=""), "files_root '' must be"),
    (lambda d: d["files"][0].update(size=-1), "size -1"),
    (lambda d: d["files"][0].update(size=True), "size True"),
    (lambda d: d["files"][0].update(md5="ABC"), "md5 'ABC'"),
    (lambda d: d["files"][0].pop("md5"), "exactly name, size and md5"),
    (lambda d: d["files"].append(dict(d["files"][0])), "listed twice"),
    (lambda d: d["meta"].append("manifest.json"), "lists manifest.json itself"),
    (lambda d: d.update(files={}), "must be lists"),
])
def test_a_malformed_manifest_fails_with_one_line_naming_it(tmp_path, change, message):
    write_manifest(tmp_path, manifest())
    data = json.loads(manifest_path(tmp_path).read_text())
    change(data)
    manifest_path(tmp_path).write_text(json.dumps(data))
    with pytest.raises(DataManifestError, match=message) as info:
        read_manifest(tmp_path)
    assert str(manifest_path(tmp_path)) in str(info.value) and "\n" not in str(info.value)


def test_a_manifest_that_is_no_json_or_whose_extra_keys_clash_is_refused(tmp_path):
    manifest_path(tmp_path).write_text('{"format": "data manifest v1", ')
    with pytest.raises(DataManifestError, match="cannot read the data manifest .*prepare the data dir again"):
        read_manifest(tmp_path)
    with pytest.raises(DataManifestError, match=r"extra keys may not be \['files'\]"):
        write_manifest(tmp_path, manifest(extra={"files": []}))
