"""The signals that mean "stop now, save, and come back": a scheduler's warning before a preemption or the time
limit (Slurm's ``--signal=USR1@T``) and SIGTERM (scancel, requeue, a node drain). The trainer acts on them
(pipeline.train.preemption); loader workers ignore them (pipeline.data.loaders)."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
