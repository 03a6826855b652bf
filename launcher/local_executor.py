"""submitit's LocalExecutor with a job controller that makes only the job's own folder.

submitit's local controller (``submitit.local._local``) makes the folder it is given as it is given: the template
``<run dir>/logs/%j``, so every run dir got an empty ``logs/%j/`` beside the job's ``logs/<job id>/``. This one
fills in the job id first and is otherwise submitit's; ``LocalExecutor`` starts it in place of submitit's, with
the environment submitit's ``start_controller`` gives (setup.cfg pins the submitit range this is known in).

    python -m launcher.local_executor FOLDER   # what LocalExecutor runs; the rest comes from the environment
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths
from submitit.local import local


class Controller(local.Controller):
    def start_tasks(self) -> None:
        self.folder = JobPaths(self.folder, job_id=self.pid).folder  # logs/%j -> logs/<job id>
        super().start_tasks()


class LocalExecutor(submitit.LocalExecutor):
    def _submit_command(self, command: str) -> local.LocalJob[Any]:
        ntasks = self.parameters.get("tasks_per_node", 1)
        gpus = range(self.parameters.get("gpus_per_node", 0))
        setup = self.parameters.get("setup", ())
        env = dict(os.environ, SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
                   SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
                   SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                   SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                   SUBMITIT_STDERR_TO_STDOUT="1" if self.parameters.get("stderr_to_stdout") else "",
                   SUBMITIT_EXECUTOR="local", CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)),
                   SUBMITIT_LOCAL_WITH_SHELL="1" if setup else "")
        argv = [sys.executable, "-m", "launcher.local_executor", str(self.folder)]
        process = subprocess.Popen(" && ".join([*setup, shlex.join(argv)]) if setup else argv, shell=bool(setup),
                                   env=env)
        return local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


if __name__ == "__main__":
    Controller(Path(sys.argv[1])).run()
