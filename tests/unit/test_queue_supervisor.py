"""The one supervisor of queue workers on this machine: start N, restart the dead, stop them all."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from cosmoforge.processes import Supervisor

SLEEPER = "import time; time.sleep(120)"
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(120)
"""


def _sleepers(index: int, restarts: int) -> list[str]:
    return [sys.executable, "-c", SLEEPER, f"w{index}-{restarts}"]


def test_a_dead_worker_is_replaced_under_its_index() -> None:
    pool = Supervisor(2, _sleepers).start()
    try:
        assert pool.supervise() == 0
        first, second = pool.processes
        first.kill()
        first.wait()
        assert pool.supervise() == 1 and pool.restarts == 1
        assert pool.processes[1] is second and pool.processes[0].poll() is None
        assert pool.processes[0].args[-1] == "w0-1"  # the replacement knows it is one
    finally:
        pool.stop(timeout=10)
    assert [process.returncode for process in pool.processes] == [-signal.SIGTERM, -signal.SIGTERM]


def test_stop_terminates_then_kills_what_ignores_it() -> None:
    pool = Supervisor(1, lambda index, restarts: [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    pool.start()
    stdout = pool.processes[0].stdout
    assert stdout is not None and stdout.readline() == b"ready\n"
    started = time.monotonic()
    pool.stop(timeout=1.0)
    assert pool.processes[0].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
    stdout.close()
