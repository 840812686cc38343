"""Ending child processes the way every launcher here does: SIGTERM, a grace period, SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence


def terminate(
    procs: Sequence[subprocess.Popen], grace_s: float, signal_first: bool = True
) -> list[int]:
    """SIGTERM (optionally) the live processes, wait up to grace_s in all, SIGKILL what is left;
    returns their exit codes in order. Only these pids are touched."""
    if signal_first:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes
