"""A packed data dir for the unit tests of staging's copy: an image folder whose files its manifest lists as meta
files, plus real tar shards of its JPEGs as the large files, with shard counts and places the tests choose (the job
tests stage real ``archives`` and ``shards`` data dirs that prep writes)."""
from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.core.data_manifest import Manifest, ManifestFile, write_manifest
from pipeline.prep.synthetic import file_md5, make_image_folder


def packed_data_dir(root: Path, *, shards: int = 2, files_root: str = "shards", **folder) -> Path:
    """``root`` as an image folder with ``shards`` tar shards of its JPEGs under ``files_root`` and a manifest."""
    data_dir = make_image_folder(root, **folder)
    meta = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
    shard_dir = Path(files_root) if Path(files_root).is_absolute() else data_dir / files_root
    shard_dir.mkdir(parents=True, exist_ok=True)
    images = [name for name in meta if name.endswith(".JPEG")]
    files = []
    for i in range(shards):
        path = shard_dir / f"shard-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for name in images[i::shards]:
                tar.add(data_dir / name, arcname=name.replace("/", "_"))
        files.append(ManifestFile(path.name, path.stat().st_size, file_md5(path)))
    write_manifest(data_dir, Manifest("shards", files_root, tuple(files), tuple(meta), {}))
    return data_dir
