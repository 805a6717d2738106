"""Child processes on this machine: start N worker commands, restart the dead, stop them all.

On a cluster a Deployment or a Job keeps workers alive; on one machine (`cosmo run`,
`cosmo decontaminate-submit --spawn`) this plays that part: the caller calls `supervise()` while
work remains, and a worker that died (killed, out of memory) is replaced under the same index.
Stopping is terminate-then-kill, so a worker finishes what it holds unless it takes too long.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

log = logging.getLogger("cosmoforge.processes")

# (index, restarts so far) -> the child's command line: the index names the worker, the restart
# count lets a replacement tell itself apart from the one it replaces.
Command = Callable[[int, int], Sequence[str]]


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; returns once the process is gone."""
    stop_processes([process], timeout)


def stop_processes(processes: Sequence[subprocess.Popen[Any]], timeout: float = 30.0) -> None:
    """Terminate every process at once, then kill those still running after `timeout` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Supervisor:
    """`count` children running `command(index, restarts)`; dead ones restarted by `supervise()`."""

    def __init__(
        self,
        count: int,
        command: Command,
        *,
        name: str = "worker",
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> None:
        self.count, self.command, self.name = count, command, name
        self.stdout, self.stderr = stdout, stderr
        self.processes: list[subprocess.Popen[bytes]] = []
        self.restarts = 0

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(self.command(index, self.restarts)), stdout=self.stdout, stderr=self.stderr
        )

    def start(self) -> Supervisor:
        self.processes = [self._spawn(index) for index in range(self.count)]
        return self

    def supervise(self) -> int:
        """Replace every child that exited; returns how many were. Call it while work remains."""
        replaced = 0
        for index, process in enumerate(self.processes):
            code = process.poll()
            if code is None:
                continue
            log.warning("%s %d exited with %s; restarting it", self.name, index, code)
            self.restarts += 1
            replaced += 1
            self.processes[index] = self._spawn(index)
        return replaced

    def stop(self, timeout: float = 30.0) -> None:
        stop_processes(self.processes, timeout)

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
