"""Child processes the way every launcher here runs them: each in its own process group, ended
with SIGTERM, a grace period and SIGKILL, group and all; restarted on a doubling backoff.

A service's group holds whatever it started without a session of its own (a compiler a JIT
build runs, a helper), so ending the group leaves nothing behind; a process that outlives its
leader in the group is killed too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

# Set by `k2serve up` for its processes: the JSON file where it counts their restarts
# ({"restarts": {process name: count}}), which the gateway exports as a metric.
SUPERVISOR_STATE_ENV = "K2SERVE_SUPERVISOR_STATE"


def spawn(cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group (and session: a terminal's Ctrl-C
    reaches only the launcher, which stops its children in order)."""
    return subprocess.Popen(list(cmd), env=env, start_new_session=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the group proc leads (its leader may have exited, and even been reaped)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def terminate(
    procs: Sequence[subprocess.Popen], grace_s: float, signal_first: bool = True
) -> list[int]:
    """SIGTERM (optionally) the groups of the live processes, wait up to grace_s in all for
    their leaders, then SIGKILL every group, whatever is left in it; returns the leaders' exit
    codes in order. Each process must lead its own group (`spawn`)."""
    if signal_first:
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            codes.append(proc.wait())
        _signal_group(proc, signal.SIGKILL)  # what the leader left behind
    return codes


@dataclass(frozen=True)
class RestartPolicy:
    """Restart on a doubling backoff; `max_restarts` failures in a row (each within
    `healthy_after_s` of its start) mean the process cannot run: give up."""

    max_restarts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    healthy_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Backoff before restart number `failures` (1, 2, ...) of a failing streak."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
