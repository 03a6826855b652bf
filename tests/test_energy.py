"""Energy from counters only: RAPL-like trees in tmp_path read by the real reader (the zones it counts, wrap-around),
a training that records the joules a counter moved by, and "not available" where no counter can be read."""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest

from pipeline.core import energy
from pipeline.core.energy import EnergyMeter, rapl_counters
from pipeline.core.rank_figures import RankSample, run_energy
from pipeline.core.records import EPOCHS_FILE, PERF_FILE, RANKS_FILE
from pipeline.report.build import report
from pipeline.train.trainer import train
from train_helpers import read_rows, tiny_config, tiny_data

RANGE_UJ = 262_143_328_850  # a common package max_energy_range_uj


def zone(root: Path, name: str, label: str, energy_uj: int | None, range_uj: int = RANGE_UJ) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "name").write_text(label + "\n")
    (folder / "max_energy_range_uj").write_text(f"{range_uj}\n")
    if energy_uj is not None:
        set_energy(folder, energy_uj)
    return folder


def set_energy(folder: Path, energy_uj: int) -> None:
    """As the kernel shows it: the whole number at once."""
    tmp = folder / ".energy_uj"
    tmp.write_text(f"{energy_uj}\n")
    os.replace(tmp, folder / "energy_uj")


def test_the_packages_and_dram_are_counted_not_psys_nor_their_parts_nor_what_cannot_be_read(tmp_path):
    zone(tmp_path, "intel-rapl:0", "package-0", 1_000)
    zone(tmp_path, "intel-rapl:0:0", "core", 500)  # inside package-0: counted there already
    zone(tmp_path, "intel-rapl:0:1", "dram", 2_000)
    zone(tmp_path, "intel-rapl:1", "psys", 9_000)  # the whole platform: would count the packages twice
    zone(tmp_path, "intel-rapl:2", "package-1", None)  # energy_uj unreadable (root's only, on Linux >= 5.10)
    zone(tmp_path, "intel-rapl-mmio:0", "package-0", 7_000)  # the same package through MMIO
    counters = rapl_counters(tmp_path)
    assert [c.read() for c in counters] == [1_000, 2_000]
    assert {c.source for c in counters} == {"rapl"} and {c.wraps_at for c in counters} == {RANGE_UJ + 1}


def test_a_counter_that_wraps_around_between_reads_is_added_up_across_the_wrap(tmp_path):
    package = zone(tmp_path, "intel-rapl:0", "package-0", 999_900, range_uj=999_999)
    meter = EnergyMeter(rapl_counters(tmp_path), sample_s=3600).start()
    set_energy(package, 400_000)  # wrapped: 999_999 - 999_900 + 1 + 400_000 = 400_100 uJ
    meter.sample()
    set_energy(package, 900_000)  # + 500_000
    assert meter.stop() == pytest.approx(0.9001)
    assert EnergyMeter([]).start().stop() is None  # no counter: no figure, never a zero


def test_a_counter_that_stops_answering_gives_no_figure(tmp_path):
    package = zone(tmp_path, "intel-rapl:0", "package-0", 1_000)
    meter = EnergyMeter(rapl_counters(tmp_path), sample_s=3600).start()
    (package / "energy_uj").unlink()
    assert meter.stop() is None


@pytest.fixture
def powercap(tmp_path, monkeypatch) -> Path:
    """The node's powercap tree, for the training run, as a folder of this test."""
    root = tmp_path / "powercap"
    root.mkdir()
    monkeypatch.setattr(energy, "POWERCAP", root)
    energy.process_counters.cache_clear()
    yield root
    energy.process_counters.cache_clear()


def test_a_training_records_the_joules_its_counter_moved_by_and_the_report_shows_kwh_and_j_per_image(
        tmp_path, powercap):
    package = zone(powercap, "intel-rapl:0", "package-0", 5_000_000)
    written = {"uj": 5_000_000}
    stop = threading.Event()

    def burn() -> None:  # a package using 1 W: 10,000 uJ every 10 ms
        while not stop.wait(0.01):
            written["uj"] += 10_000
            set_energy(package, written["uj"])

    writer = threading.Thread(target=burn, daemon=True)
    writer.start()
    try:
        train(tiny_config(tiny_data(tmp_path / "data"), tmp_path / "run", "--epochs", "1", "--no-tensorboard"))
    finally:
        stop.set()
        writer.join()
    (row,) = read_rows(tmp_path / "run" / EPOCHS_FILE)
    joules = float(row["energy_j"])
    assert 0 < joules <= (written["uj"] - 5_000_000) / 1e6 and row["energy_source"] == "rapl"
    (rank,) = read_rows(tmp_path / "run" / RANKS_FILE)
    assert (float(rank["energy_j"]), rank["energy_source"], rank["images"]) == (joules, "rapl", row["images"]) \
        and int(row["images"]) == 64  # every image of the epoch, warm-up included
    summary = report([tmp_path / "run"], echo=False).summary.iloc[0]
    assert summary["energy_kwh"] == pytest.approx(joules / 3.6e6, rel=1e-5)
    assert summary["j_per_image"] == pytest.approx(joules / 64, rel=1e-5) and summary["energy_source"] == "rapl"


def test_without_a_readable_counter_the_figure_is_not_available(tmp_path, powercap):
    zone(powercap, "intel-rapl:0", "package-0", None)  # as on a node that keeps energy_uj to root
    train(tiny_config(tiny_data(tmp_path / "data"), tmp_path / "run", "--max-steps", "4", "--no-tensorboard"))
    (row,) = read_rows(tmp_path / "run" / PERF_FILE)
    assert (row["energy_j"], row["energy_source"], row["images"]) == ("", "", "32")
    result = report([tmp_path / "run"], echo=False)
    summary = result.summary.iloc[0]
    assert summary["energy_source"] == "not available" and summary[["energy_kwh", "j_per_image"]].isna().all()
    assert "| not available |" in result.markdown


def node_samples(root: Path, host: str, moved_uj: int | None, readable: bool = True) -> list[RankSample]:
    """A node of two processes: local rank 0 reads the node's RAPL tree (its counter moved by ``moved_uj``, None:
    it stopped answering; not ``readable``: root's only), local rank 1 reads none, as on a CPU run."""
    package = zone(root / host, "intel-rapl:0", "package-0", 1_000_000 if readable else None)
    meters = [EnergyMeter(rapl_counters(root / host), sample_s=3600).start(), EnergyMeter([]).start()]
    if moved_uj is None:
        (package / "energy_uj").unlink()
    elif readable:
        set_energy(package, 1_000_000 + moved_uj)
    return [RankSample(host, 1, 8, 1.0, 0.0, (0.0, 0.0, 0.0), 8, meter.stop(), meter.source) for meter in meters]


@pytest.mark.parametrize("second, joules, warned", [
    (dict(moved_uj=3_000_000), 5.0, ""),
    (dict(moved_uj=None), math.nan, "the counters of rank(s) 2 stopped answering"),
    (dict(moved_uj=0, readable=False), math.nan, "the nodes read different counters (a: none/rapl; b: none/none)"),
])
def test_a_figure_only_when_every_node_read_the_same_counters_to_the_end(second, joules, warned, tmp_path, caplog):
    ranks = node_samples(tmp_path, "a", 2_000_000) + node_samples(tmp_path, "b", **second)
    assert [r.energy_source for r in ranks] == ["rapl", "", "rapl" if second.get("readable", True) else "", ""]
    total, source = run_energy(ranks)
    assert total == pytest.approx(joules, nan_ok=True) and source == "rapl"  # NaN: "not available" in the report
    assert (warned in caplog.text) if warned else "no energy figure" not in caplog.text
