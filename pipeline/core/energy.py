"""Energy a process's hardware reports having used: read from counters, never estimated from power or time.

Counters read, where this process can:

- ``nvml``: its NVIDIA GPU's total energy since the driver loaded (``nvmlDeviceGetTotalEnergyConsumption``, mJ,
  Volta and later; needs pynvml). The GPU is found by its UUID, so CUDA_VISIBLE_DEVICES cannot mix GPUs up.
- ``rapl``: the node's CPU packages and their DRAM (``/sys/class/powercap/intel-rapl:*/energy_uj``, µJ; Intel and
  AMD), read by local rank 0 alone, as every process of the node shares them. The counter wraps at
  ``max_energy_range_uj`` (minutes at full power on some CPUs), so a thread reads it every SAMPLE_S and adds up.
  Since Linux 5.10 the files are root's unless the admins open them; then there is no figure.

An Ascend NPU reports its power (npu-smi, DCMI), not an energy counter: adding up samples of power would be an
estimate, so NPU runs have no figure, as any run without a readable counter ("not available" in the report).
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")
RAPL_ZONES = ("package-", "dram")  # zone names counted; psys (the whole platform) would count the packages twice
SAMPLE_S = 20.0  # between reads of a wrapping counter: RAPL's smallest range (~65 kJ) lasts over a minute at 1 kW


@dataclass(frozen=True)
class Counter:
    """One cumulative counter: ``read()`` its raw value, ``joules`` per unit, ``wraps_at`` (0: never wraps)."""

    source: str
    read: Callable[[], int]
    joules: float
    wraps_at: int = 0


def rapl_counters(root: Path) -> list[Counter]:
    """The CPU package and DRAM zones under ``root`` whose counters this process can read."""
    counters = []
    for zone in sorted(root.glob("intel-rapl:*")):
        try:
            name = (zone / "name").read_text().strip()
            if not name.startswith(RAPL_ZONES):
                continue
            wraps_at = int((zone / "max_energy_range_uj").read_text()) + 1
            reader = functools.partial(_read_int, zone / "energy_uj")
            reader()
        except (OSError, ValueError) as exc:
            log.info("RAPL zone %s not readable (%s): no CPU energy figure from it", zone, exc)
            continue
        counters.append(Counter("rapl", reader, 1e-6, wraps_at))
    return counters


def _read_int(path: Path) -> int:
    return int(path.read_text())


def nvml_counters(cuda_index: int) -> list[Counter]:
    """The energy counter of CUDA device ``cuda_index`` through NVML, or none (no pynvml, a GPU before Volta)."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        reader = functools.partial(pynvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        reader()
    except Exception as exc:  # ImportError, NVMLError_NotSupported, ...: no counter, no figure
        log.info("no NVML energy counter for GPU %d (%s: %s)", cuda_index, type(exc).__name__, exc)
        return []
    return [Counter("nvml", reader, 1e-3)]


@functools.lru_cache(maxsize=None)
def process_counters(device_type: str, device_index: int, local_rank: int) -> tuple[Counter, ...]:
    """What this process reads (found once per process): its GPU's counter, and the node's RAPL (under POWERCAP)
    on local rank 0."""
    counters = nvml_counters(device_index) if device_type == "cuda" else []
    if local_rank == 0:
        counters += rapl_counters(POWERCAP)
    return tuple(counters)


class EnergyMeter:
    """Joules the ``counters`` add up between ``start()`` and ``stop()``, wrap-arounds included."""

    def __init__(self, counters: tuple[Counter, ...] | list[Counter], sample_s: float = SAMPLE_S):
        self.counters, self.sample_s = tuple(counters), sample_s
        self.last: list[int] = []
        self.total_j = 0.0
        self.broken = ""  # why a counter stopped answering mid-way: then there is no figure
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        """The counters' kinds, e.g. ``nvml+rapl``; empty when there is none."""
        return "+".join(dict.fromkeys(c.source for c in self.counters))

    def _read(self, counter: Counter) -> int | None:
        """The counter's value; None (and no figure for this span) when it stops answering (a file gone, a driver
        reset): no figure rather than a wrong one."""
        try:
            return counter.read()
        except Exception as exc:
            self.broken = self.broken or f"{counter.source}: {type(exc).__name__}: {exc}"
            return None

    def start(self) -> "EnergyMeter":
        self.last = [self._read(c) or 0 for c in self.counters]
        if any(c.wraps_at for c in self.counters):
            self.thread = threading.Thread(target=self._sample_until_done, daemon=True, name="energy-meter")
            self.thread.start()
        return self

    def _sample_until_done(self) -> None:
        while not self.done.wait(self.sample_s):
            self.sample()

    def sample(self) -> None:
        """Add what each counter advanced since its last read (a counter seen lower has wrapped once)."""
        with self.lock:
            for i, counter in enumerate(self.counters):
                now = self._read(counter)
                if now is None:
                    continue
                delta = now - self.last[i]
                if delta < 0 and counter.wraps_at:
                    delta += counter.wraps_at
                self.total_j += max(delta, 0) * counter.joules
                self.last[i] = now

    def stop(self) -> float | None:
        """Joules since start(), or None without a counter."""
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        if not self.counters:
            return None
        self.sample()
        if self.broken:
            log.warning("energy counter stopped answering (%s): no energy figure for this span", self.broken)
            return None
        return self.total_j
