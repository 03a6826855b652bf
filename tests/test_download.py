"""The download engine against a real HTTP server on 127.0.0.1 serving synthetic archives in the official shapes."""
from __future__ import annotations

import base64
import json
import logging
import shutil

import pytest

from download_helpers import ArchiveServer
from pipeline.prep.archives import DEVKIT_TAR, TRAIN_TAR, VAL_TAR
from pipeline.prep.download import LOCK_FILE, PART_SUFFIX, REPORT_FILE, DownloadError, download
from pipeline.prep.synthetic import file_md5, make_imagenet_archives

NAMES = (TRAIN_TAR, VAL_TAR, DEVKIT_TAR)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Synthetic archives (about 60 KB in all) and their MD5s: the table the tests pass as the expected one."""
    synthetic = make_imagenet_archives(tmp_path_factory.mktemp("served"), num_classes=2, train_per_class=6,
                                       val_per_class=3, size=(32, 28))
    return synthetic.archive_dir, synthetic.md5


@pytest.fixture
def server(served):
    with ArchiveServer(served[0]) as running:
        yield running


def fetch(server, out, names=NAMES, md5=None, **kwargs):
    kwargs.setdefault("backoff_s", 0.05)
    return download([server.url(n) for n in names], out, expected_md5=md5, **kwargs)


def test_complete_download_is_verified_and_a_second_run_fetches_nothing(served, server, tmp_path, caplog):
    root, md5 = served
    report = fetch(server, tmp_path, md5=md5, workers=3)
    for name in NAMES:
        assert file_md5(tmp_path / name) == md5[name] and not (tmp_path / (name + PART_SUFFIX)).exists()
        assert report["files"][name]["checksum"] == "ok"
        assert report["files"][name]["bytes"] == (root / name).stat().st_size
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == report
    assert len(server.requests) == 3 and all(r["range"] is None for r in server.requests)
    server.requests.clear()
    caplog.set_level(logging.INFO, "pipeline.prep.download")
    again = fetch(server, tmp_path, md5=md5)
    assert server.requests == [] and "already downloaded and verified" in caplog.text
    assert not any(f["fetched_in_this_run"] for f in again["files"].values())


def test_a_cut_connection_resumes_from_the_next_byte(served, server, tmp_path):
    root, md5 = served
    size = (root / TRAIN_TAR).stat().st_size
    server.cut_at[TRAIN_TAR] = cut = size // 3
    report = fetch(server, tmp_path, [TRAIN_TAR], md5)
    assert [(r["range"], r["status"]) for r in server.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert server.sent(TRAIN_TAR) == size  # the resume fetched only the bytes not yet there
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR] and report["files"][TRAIN_TAR]["retries"] == 1


def test_a_part_left_by_a_killed_job_is_continued(served, server, tmp_path):
    root, md5 = served
    data = (root / VAL_TAR).read_bytes()
    (tmp_path / (VAL_TAR + PART_SUFFIX)).write_bytes(data[:1000])
    report = fetch(server, tmp_path, [VAL_TAR], md5)
    assert [r["range"] for r in server.requests] == ["bytes=1000-"] and server.sent(VAL_TAR) == len(data) - 1000
    assert (tmp_path / VAL_TAR).read_bytes() == data and report["files"][VAL_TAR]["resumed_from"] == 1000


def test_a_server_without_range_support_restarts_the_file(served, tmp_path, caplog):
    root, md5 = served
    size = (root / TRAIN_TAR).stat().st_size
    with ArchiveServer(root, ranges=False) as server:
        server.cut_at[TRAIN_TAR] = size // 2
        report = fetch(server, tmp_path, [TRAIN_TAR], md5)
    assert [r["status"] for r in server.requests] == [200, 200] and server.requests[1]["range"] == f"bytes={size // 2}-"
    assert "the server ignores Range requests" in caplog.text and "restarting it from byte 0" in caplog.text
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR] and report["files"][TRAIN_TAR]["restarts"] == 1


@pytest.mark.parametrize("status, hint", [(403, "403 Forbidden from http://127.0.0.1:"),
                                          (404, "404 Not Found from http://127.0.0.1:")])
def test_refused_links_stop_at_once_with_status_and_name(served, server, tmp_path, status, hint):
    server.status[VAL_TAR] = status
    with pytest.raises(DownloadError) as failure:
        fetch(server, tmp_path, [VAL_TAR], served[1], retries=5)
    message = str(failure.value)
    assert message.startswith(f"{VAL_TAR}: HTTP {status}") and hint in message
    assert ("expired" if status == 403 else "no such file") in message
    assert len(server.requests) == 1 and not (tmp_path / VAL_TAR).exists()


def test_server_errors_are_retried_with_backoff_then_given_up(served, server, tmp_path, caplog):
    server.fail_first[DEVKIT_TAR] = 2
    fetch(server, tmp_path, [DEVKIT_TAR], served[1], retries=2)
    assert [r["status"] for r in server.requests] == [503, 503, 200]
    assert "HTTP 503 Service Unavailable; retry 2 of 2 in 0.1 s" in caplog.text  # 0.05 s, then twice that
    server.fail_first[VAL_TAR] = 3
    with pytest.raises(DownloadError, match=f"{VAL_TAR}: gave up after 2 retries: HTTP 503"):
        fetch(server, tmp_path, [VAL_TAR], served[1], retries=2)


def test_a_corrupted_byte_fails_the_md5_and_keeps_nothing(served, tmp_path):
    root, md5 = served
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    data = bytearray((root / VAL_TAR).read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / VAL_TAR).write_bytes(data)
    out = tmp_path / "out"
    with ArchiveServer(damaged) as server, pytest.raises(DownloadError) as failure:
        fetch(server, out, [VAL_TAR], md5)
    assert f"checksum mismatch for {VAL_TAR}" in str(failure.value) and md5[VAL_TAR] in str(failure.value)
    assert "--skip-checksum" in str(failure.value)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # neither the official name nor the part


def test_no_room_on_disk_stops_before_the_body(served, server, tmp_path):
    server.announce[VAL_TAR] = 10 ** 18  # one exabyte
    with pytest.raises(DownloadError, match=f"{VAL_TAR} needs 1000000.0 TB more .* free; free some space"):
        fetch(server, tmp_path, [VAL_TAR], served[1])
    assert not (tmp_path / VAL_TAR).exists()


def test_unofficial_name_unchecked_with_a_warning_and_credentials_sent(served, tmp_path, caplog):
    root, _ = served
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(root / VAL_TAR, folder / "val-subset.tar")
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\tabc123\n")
    with ArchiveServer(folder) as server:
        link = server.url("val-subset.tar", userinfo="me:p%40ss")
        report = download([link], tmp_path / "out", headers=["X-Api-Key: k1"], cookie_file=str(cookies))
    sent = server.requests[0]["headers"]
    assert sent["Authorization"] == "Basic " + base64.b64encode(b"me:p@ss").decode()
    assert sent["X-Api-Key"] == "k1" and sent["Cookie"] == "session=abc123"
    assert "val-subset.tar is not an official archive name" in caplog.text
    assert report["files"]["val-subset.tar"]["checksum"] == "unchecked"  # no MD5 known; "skipped": --skip-checksum


def ranged(server, out, names, md5, **kwargs):
    """``fetch`` with every file over 1 KiB in 4 byte ranges."""
    return fetch(server, out, names, md5, ranges=4, range_min_bytes=1024, **kwargs)


def range_requests(server, name):
    return sorted((r["range"] for r in server.requests if r["name"] == name and r["range"] != "bytes=0-"),
                  key=lambda text: int(text.split("=")[1].split("-")[0]))


def quarters(size):
    step = -(-size // 4)
    return [f"bytes={start}-{min(start + step, size) - 1}" for start in range(0, size, step)]


def test_a_large_file_comes_in_parallel_byte_ranges_and_is_verified(served, server, tmp_path):
    root, md5 = served
    size = (root / TRAIN_TAR).stat().st_size
    report = ranged(server, tmp_path, [TRAIN_TAR, DEVKIT_TAR], md5)
    assert range_requests(server, TRAIN_TAR) == quarters(size)
    assert [r["range"] for r in server.requests if r["name"] == DEVKIT_TAR] == ["bytes=0-"]  # under 1 KiB: one stream
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR] and report["files"][TRAIN_TAR]["checksum"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TRAIN_TAR, DEVKIT_TAR, REPORT_FILE, LOCK_FILE])


def test_a_cut_range_is_continued_from_its_own_byte(served, server, tmp_path):
    root, md5 = served
    size = (root / TRAIN_TAR).stat().st_size
    third = quarters(size)[2]
    cut = int(third.split("=")[1].split("-")[0]) + 100
    server.cut_range_at[TRAIN_TAR] = cut  # the answer to the third range stops 100 bytes in
    report = ranged(server, tmp_path, [TRAIN_TAR], md5)
    assert f"bytes={cut}-{third.split('-')[1]}" in range_requests(server, TRAIN_TAR)
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR] and report["files"][TRAIN_TAR]["retries"] == 1


def killed_ranges(root, out, done):
    """What a killed job leaves of the train archive in 4 ranges: the part file at full size holding ``done`` bytes
    of each range, and the record of them. Returns the ranges' (start, end)."""
    data = (root / TRAIN_TAR).read_bytes()
    bounds = [(int(a), int(b) + 1) for a, b in (q.split("=")[1].split("-") for q in quarters(len(data)))]
    part = bytearray(len(data))
    for (start, _), written in zip(bounds, done):
        part[start:start + written] = data[start:start + written]
    (out / (TRAIN_TAR + PART_SUFFIX)).write_bytes(bytes(part))
    (out / (TRAIN_TAR + PART_SUFFIX + ".ranges")).write_text(json.dumps(
        {"total": len(data), "ranges": [[a, b, d] for (a, b), d in zip(bounds, done)]}))
    return bounds


def test_ranges_left_by_a_killed_job_are_each_continued_where_they_stopped(served, server, tmp_path):
    root, md5 = served
    size = (root / TRAIN_TAR).stat().st_size
    done = [-(-size // 4), 0, 700, 50]  # the first range complete, the second not begun
    bounds = killed_ranges(root, tmp_path, done)
    server.fail_first[TRAIN_TAR] = 1  # a 503 first: retried, nothing lost
    report = ranged(server, tmp_path, [TRAIN_TAR], md5)
    missing = [f"bytes={a + d}-{b - 1}" for (a, b), d in list(zip(bounds, done))[1:]]
    asked = range_requests(server, TRAIN_TAR)
    assert sorted(set(asked)) == sorted(missing) and len(asked) == len(missing) + 1  # one asked again after the 503
    assert server.sent(TRAIN_TAR) == size - sum(done)  # only the missing bytes
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR] and report["files"][TRAIN_TAR]["resumed_from"] == sum(done)
    assert not (tmp_path / (TRAIN_TAR + PART_SUFFIX + ".ranges")).exists()


def test_a_refused_link_keeps_the_ranges_already_fetched(served, server, tmp_path):
    root, md5 = served
    killed_ranges(root, tmp_path, [100, 200, 300, 400])
    before = json.loads((tmp_path / (TRAIN_TAR + PART_SUFFIX + ".ranges")).read_text())
    server.status[TRAIN_TAR] = 403  # an expired link: the user gets a fresh one and runs again
    with pytest.raises(DownloadError, match="HTTP 403"):
        ranged(server, tmp_path, [TRAIN_TAR], md5)
    assert json.loads((tmp_path / (TRAIN_TAR + PART_SUFFIX + ".ranges")).read_text()) == before
    assert (tmp_path / (TRAIN_TAR + PART_SUFFIX)).stat().st_size == (root / TRAIN_TAR).stat().st_size


@pytest.mark.parametrize("record, part_size", [({"total": 5000, "ranges": [[0, 5000, 10]]}, 4000),  # another size
                                               ({"total": 5000, "ranges": [[0, 2000, 10], [3000, 5000, 0]]}, 5000),
                                               ("not json", 5000), ({"total": 5000, "ranges": [[0, 5000, 10]]}, None)])
def test_a_range_record_that_does_not_describe_the_part_file_starts_the_file_again(served, server, tmp_path, caplog,
                                                                                   record, part_size):
    root, md5 = served
    if part_size is not None:
        (tmp_path / (TRAIN_TAR + PART_SUFFIX)).write_bytes(b"x" * part_size)
    (tmp_path / (TRAIN_TAR + PART_SUFFIX + ".ranges")).write_text(record if isinstance(record, str) else
                                                                  json.dumps(record))
    ranged(server, tmp_path, [TRAIN_TAR], md5)
    assert "the file starts again" in caplog.text and file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR]
    assert server.sent(TRAIN_TAR) >= (root / TRAIN_TAR).stat().st_size


def test_ranges_of_a_file_that_changed_on_the_server_fall_back_to_one_stream(served, server, tmp_path, caplog):
    """The record's file had 5000 bytes; the server's answer says another size."""
    root, md5 = served
    (tmp_path / (TRAIN_TAR + PART_SUFFIX)).write_bytes(bytes(5000))
    (tmp_path / (TRAIN_TAR + PART_SUFFIX + ".ranges")).write_text(json.dumps({"total": 5000,
                                                                              "ranges": [[0, 5000, 0]]}))
    report = ranged(server, tmp_path, [TRAIN_TAR], md5)
    assert "the file starts again in one stream" in caplog.text
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR] and report["files"][TRAIN_TAR]["checksum"] == "ok"


def test_a_server_answering_ranges_with_the_whole_file_falls_back_to_one_stream(served, tmp_path, caplog):
    root, md5 = served
    with ArchiveServer(root, bounded_ranges=False) as server:
        ranged(server, tmp_path, [TRAIN_TAR], None)  # --skip-checksum: nothing would catch a wrong file
        statuses = [(r["range"], r["status"]) for r in server.requests]
    assert statuses[0] == ("bytes=0-", 206) and statuses[-1] == (None, 200)  # the fallback asks for the file
    assert any(status == 200 for _, status in statuses[1:-1])
    assert "with the whole file (HTTP 200); the file starts again in one stream" in caplog.text
    assert (tmp_path / TRAIN_TAR).read_bytes() == (root / TRAIN_TAR).read_bytes()


def test_an_empty_file_is_downloaded_with_ranges_on(tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "empty.bin").write_bytes(b"")
    with ArchiveServer(tmp_path / "served") as server:
        ranged(server, tmp_path / "out", ["empty.bin"], None)
    assert (tmp_path / "out" / "empty.bin").read_bytes() == b""


def test_without_range_support_a_large_file_comes_in_one_stream(served, tmp_path):
    root, md5 = served
    with ArchiveServer(root, ranges=False) as server:
        ranged(server, tmp_path, [TRAIN_TAR], md5)
    assert [(r["range"], r["status"]) for r in server.requests] == [("bytes=0-", 200)]
    assert file_md5(tmp_path / TRAIN_TAR) == md5[TRAIN_TAR]
