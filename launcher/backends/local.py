"""This machine: submitit's LocalExecutor (a process per job, stages one after another) and its DebugExecutor (in
the launcher's own process, for pdb). One node only; nothing queues, so the launcher follows each job to its end
before it submits the next."""
from __future__ import annotations

from typing import Any, Sequence

from launcher.backends import register
from launcher.backends.base import Backend
from launcher.container import job_python, runtime_here
from launcher.executors import LaunchError, setup_lines, stage_request, stage_resources
from pipeline.core.config import Config


@register
class LocalBackend(Backend):
    name, title = "local", "the local executor"
    auto, order = True, 50

    def parameters(self, cfg: Config, stage: str, *, after: str | None = None, when: str = "afterok",
                   node_cpus: int | None = None, run_dirs: Sequence[str] = ()) -> dict[str, Any]:
        _, _, gpus = stage_resources(cfg, stage)
        params = {"timeout_min": stage_request(cfg, stage).time, "nodes": 1, "tasks_per_node": 1,
                  "gpus_per_node": gpus, "signal_delay_s": cfg.launch.signal_delay_s, "setup": setup_lines(cfg)}
        if cfg.launch.container:
            if self.in_process:
                raise LaunchError(f"--container runs a job in its own processes; the {self.name} executor runs it in "
                                  "this one: use --executor local")
            params["python"] = job_python(cfg, stage, runtime_here(cfg), run_dirs)
        return params

    def make_executor(self, folder: str, cfg: Config, python: str | None = None) -> Any:
        import submitit

        return submitit.LocalExecutor(folder, max_num_timeout=cfg.launch.max_requeues, python=python)


@register
class DebugBackend(LocalBackend):
    name, title = "debug", "the debug executor"
    auto, order, in_process = False, 90, True

    def make_executor(self, folder: str, cfg: Config, python: str | None = None) -> Any:
        import submitit

        return submitit.DebugExecutor(folder)
