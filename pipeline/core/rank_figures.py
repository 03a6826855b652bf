"""Each rank's own figures of an epoch (``ranks.csv``), and the rule that names a straggler from them.

The figures ride on the epoch's one gather of the throughput sums (pipeline/core/metrics.py): no collective per
step, none added at the epoch's end, and rank 0 writes the one table (atomically, like epochs.csv) instead of a
file per rank that a shared file system would show half-written to the report.

Under DDP every rank's step takes as long as the slowest one's (they meet in the gradients' all-reduce), so step
times do not tell ranks apart; what does is the time each waited for its own input: a rank whose data path is
slow (a slow disk, a busy node, a node's cache missing) waits for its batches while the others wait for it in the
all-reduce. A rank slow in its own compute is not told apart by these figures (every rank waits in the all-reduce
as long); its step time grows for all.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.core.records import RANK_COLUMNS, append_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSample:
    """What one rank sends at the end of an epoch (or performance run)."""

    host: str
    threads: int              # torch's intra-op threads
    images: int               # steady-state images (after the warm-up steps)
    elapsed_s: float          # steady-state wall clock
    data_wait_s: float        # of which blocked on the loader
    phases_ms: tuple[float, ...]  # StepClock.PHASES over the steady-state steps: input, fwd_bwd, optimizer
    span_images: int          # every image of the span, warm-up included: the energy's span
    energy_j: float | None    # read over the span (pipeline/core/energy.py); None: no counter, or it broke
    energy_source: str        # the counters it had (e.g. rapl on local rank 0 alone); empty: none


def run_energy(ranks: Sequence[RankSample]) -> tuple[float, str]:
    """The ranks' joules summed and their counters' kinds; NaN (no figure) where a counter stopped answering or
    the nodes differ in their counters (one node's RAPL closed to users): a sum of part of the run never stands
    for the whole. Ranks without a counter are expected (RAPL is read by local rank 0 alone)."""
    source = "+".join(dict.fromkeys(r.energy_source for r in ranks if r.energy_source))
    broken = [i for i, r in enumerate(ranks) if r.energy_source and r.energy_j is None]
    per_host: dict[str, list[str]] = {}
    for sample in ranks:
        per_host.setdefault(sample.host, []).append(sample.energy_source or "none")
    kinds = {host: "/".join(sorted(sources)) for host, sources in per_host.items()}
    if broken or len(set(kinds.values())) > 1:
        why = (f"the counters of rank(s) {', '.join(map(str, broken))} stopped answering" if broken else
               "the nodes read different counters (" + "; ".join(f"{h}: {k}" for h, k in kinds.items()) + ")")
        log.warning("no energy figure for this span: %s, and a sum of the others would be part of the run", why)
        return math.nan, source
    energies = [r.energy_j for r in ranks if r.energy_j is not None]
    return (math.fsum(energies) if energies else math.nan), source


def rank_row(rank: int, sample: RankSample, measured_steps: int) -> dict[str, Any]:
    """The ranks.csv columns of one rank (an epoch's row adds ``epoch``); per-step means in ms."""
    per_step = 1000.0 / measured_steps if measured_steps else math.nan
    input_ms, fwd_bwd_ms, optimizer_ms = sample.phases_ms
    return {"rank": rank, "host": sample.host, "threads": sample.threads,
            "step_ms": _rounded(sample.elapsed_s * per_step), "data_wait_ms": _rounded(sample.data_wait_s * per_step),
            "input_wait_ms": _rounded(input_ms * per_step / 1000),
            "compute_ms": _rounded((fwd_bwd_ms + optimizer_ms) * per_step / 1000), "images": sample.span_images,
            "energy_j": "" if sample.energy_j is None else round(sample.energy_j, 3),
            "energy_source": sample.energy_source}


def write_rank_rows(path: Path, epoch: int, ranks: Sequence[RankSample], measured_steps: int,
                    straggler_fraction: float) -> None:
    """Append an epoch's row of each rank to ranks.csv (rank 0), and log the straggler when there is one."""
    rows = [{"epoch": epoch, **rank_row(rank, sample, measured_steps)} for rank, sample in enumerate(ranks)]
    append_rows(path, rows, RANK_COLUMNS)
    straggler = find_straggler(rows, straggler_fraction)
    if straggler is not None:
        log.warning("epoch %d: %s", epoch, straggler.text)


def _rounded(value: float) -> float | str:
    return round(value, 3) if math.isfinite(value) else ""


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    wait_ms: float      # its input wait per step
    excess_ms: float    # more than the median rank's
    step_ms: float      # the median step time
    text: str


def find_straggler(rows: Sequence[Mapping[str, Any]], fraction: float) -> Straggler | None:
    """The rank (of one epoch's ``rows``, ranks.csv columns, numbers or their text) whose input wait per step
    exceeds the median rank's by more than ``fraction`` of the median step time; None when none does."""
    waits = [_number(r.get("input_wait_ms")) for r in rows]
    waits = [w if math.isfinite(w) else _number(r.get("data_wait_ms")) for w, r in zip(waits, rows)]
    steps = [_number(r.get("step_ms")) for r in rows]
    known = [i for i, (w, s) in enumerate(zip(waits, steps)) if math.isfinite(w) and math.isfinite(s)]
    if len(known) < 2:
        return None
    median_wait = statistics.median(waits[i] for i in known)
    median_step = statistics.median(steps[i] for i in known)
    worst = max(known, key=lambda i: waits[i])
    excess = waits[worst] - median_wait
    if median_step <= 0 or excess <= fraction * median_step:
        return None
    rank, host = int(_number(rows[worst].get("rank"))), str(rows[worst].get("host", "?"))
    text = (f"straggler: rank {rank} on {host} waited {waits[worst]:.1f} ms per step for its input, {excess:.1f} ms "
            f"more than the median rank ({100 * excess / median_step:.0f}% of the median step of {median_step:.1f} ms, "
            f"flagged above {100 * fraction:.0f}%): its data path sets every rank's pace")
    return Straggler(rank, host, waits[worst], excess, median_step, text)
