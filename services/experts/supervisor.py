"""The expert job's supervisor: starts the DeepSpeed job's rank processes and restarts the job.

The ranks of a DeepSpeed job live and die together: once one is gone the others' collectives can
only fail, so when any rank exits the supervisor ends the rest and starts the whole job again,
after a backoff that doubles with each consecutive failure. A job that stayed up for
`healthy_after_s` resets the count; `max_restarts` consecutive failures end the supervisor with a
non-zero status (the launcher then sees the instance gone). SIGTERM / SIGINT stop the job
gracefully: rank 0 drains its in-flight calls and tells the followers to stop.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.processes import terminate

log = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    healthy_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Backoff before restart number `failures` (1, 2, ...) of a failing streak."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))


@dataclass(frozen=True)
class JobSpec:
    """How to start rank r: `command` with the torch.distributed rendezvous environment."""

    command: Sequence[str]
    ranks: int
    master_addr: str
    master_port: int

    def env(self, rank: int) -> dict[str, str]:
        env = dict(os.environ)
        # DeepSpeed's CPU shared-memory all-reduce spins forever on a dead peer's segment; it is
        # used only when LOCAL_SIZE equals the world size, so never pass LOCAL_SIZE on.
        env.pop("LOCAL_SIZE", None)
        return env | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(self.ranks),
            "LOCAL_WORLD_SIZE": str(self.ranks),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


class Supervisor:
    def __init__(
        self, job: JobSpec, policy: RestartPolicy = RestartPolicy(), grace_s: float = 15.0
    ) -> None:
        self.job, self.policy, self.grace_s = job, policy, grace_s
        self.procs: list[subprocess.Popen] = []
        self.starts = 0  # jobs started so far (1 + restarts)
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Keep the job up until asked to stop (0) or the restart budget is spent (1)."""
        failures = 0
        while True:
            started = time.monotonic()
            self._start()
            dead = self._wait_for_exit()
            if dead is None:
                self._end(graceful=True)
                return 0
            log.error(
                "rank %d exited with code %s; restarting the job", dead, self.procs[dead].poll()
            )
            self._end(graceful=False)
            failures = (
                1 if time.monotonic() - started > self.policy.healthy_after_s else failures + 1
            )
            if failures > self.policy.max_restarts:
                log.error("%d consecutive failures; giving up", failures)
                return 1
            if self._stop.wait(self.policy.delay(failures)):
                return 0

    def _start(self) -> None:
        self.starts += 1
        self.procs = [
            subprocess.Popen(list(self.job.command), env=self.job.env(r))
            for r in range(self.job.ranks)
        ]
        log.info("job %d started: rank pids %s", self.starts, [p.pid for p in self.procs])

    def _wait_for_exit(self) -> int | None:
        """The first rank found exited, or None when a stop was requested."""
        while not self._stop.wait(POLL_S):
            for rank, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    return rank
        return None

    def _end(self, graceful: bool) -> None:
        """Graceful: rank 0 drains and then stops the followers itself. Otherwise, or for any
        rank still alive after that, SIGTERM and then SIGKILL."""
        if graceful:
            terminate(self.procs[:1], self.grace_s)
            terminate(self.procs[1:], 2.0, signal_first=False)
        terminate(self.procs, 3.0)
