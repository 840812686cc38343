"""The expert job's supervisor: starts the DeepSpeed job's rank processes and restarts the job.

The ranks of a DeepSpeed job live and die together: once one is gone the others' collectives can
only fail, so when any rank exits the supervisor ends the rest and starts the whole job again,
after a backoff that doubles with each consecutive failure. A job that stayed up for
`healthy_after_s` resets the count; `max_restarts` consecutive failures end the supervisor with a
non-zero status (the launcher then sees the instance gone). SIGTERM / SIGINT stop the job
gracefully: rank 0 drains its in-flight calls and tells the followers to stop.

A pool spanning nodes has one supervisor per node, each starting its node's ranks. Node 0's
supervisor (rank 0's) hosts the rendezvous and decides restarts as above, publishing a new
generation for each job (rendezvous.py); the others start their ranks into each new generation
and end them when it is replaced, or when one of theirs exits (which breaks the job, so node 0
restarts it within a collective timeout).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.processes import RestartPolicy, spawn, terminate
from services.experts.rendezvous import GENERATION_ENV, Rendezvous

log = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass(frozen=True)
class JobSpec:
    """How to start this node's ranks: `command` with the rendezvous environment.

    `ranks` run here as global ranks first_rank .. first_rank + ranks - 1 of a job of `world`
    ranks (0: of `ranks`, a pool on one node); the rendezvous is at master_addr:master_port.
    """

    command: Sequence[str]
    ranks: int
    master_addr: str
    master_port: int
    world: int = 0
    first_rank: int = 0
    interface: str | None = None  # this node's interface for the collectives (interface_for)

    @property
    def leads(self) -> bool:
        """Whether rank 0 runs here: this supervisor hosts the rendezvous and decides restarts."""
        return self.first_rank == 0

    def env(self, local: int, generation: str) -> dict[str, str]:
        env = dict(os.environ)
        # DeepSpeed's CPU shared-memory all-reduce spins forever on a dead peer's segment; it is
        # used only when LOCAL_SIZE equals the world size, so never pass LOCAL_SIZE on.
        env.pop("LOCAL_SIZE", None)
        if self.interface:  # the user's own choice, if any, wins
            env.setdefault("GLOO_SOCKET_IFNAME", self.interface)
            env.setdefault("NCCL_SOCKET_IFNAME", self.interface)
        return env | {
            "RANK": str(self.first_rank + local),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": str(self.world or self.ranks),
            "LOCAL_WORLD_SIZE": str(self.ranks),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            GENERATION_ENV: generation,
        }


class Supervisor:
    def __init__(
        self, job: JobSpec, policy: RestartPolicy | None = None, grace_s: float = 15.0
    ) -> None:
        policy = policy or RestartPolicy()
        self.job, self.policy, self.grace_s = job, policy, grace_s
        self.procs: list[subprocess.Popen] = []
        self.starts = 0  # jobs started so far (1 + restarts)
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Keep the job up until asked to stop (0) or, on node 0, until the restart budget is
        spent (1)."""
        if not self.job.leads:
            return self._follow()
        rendezvous = Rendezvous.host(self.job.master_addr, self.job.master_port)
        failures = 0
        while True:
            started = time.monotonic()
            self._start(rendezvous.publish())
            dead = self._wait_for_exit()
            if dead is None:
                self._end(graceful=True)
                return 0
            log.error(
                "rank %d exited with code %s; restarting the job",
                self.job.first_rank + dead,
                self.procs[dead].poll(),
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

    def _follow(self) -> int:
        """Another node: run this node's ranks in every generation node 0 publishes."""
        rendezvous, last = None, None
        while not self._stop.is_set():
            try:
                rendezvous = rendezvous or Rendezvous.connect(
                    self.job.master_addr, self.job.master_port
                )
                generation = rendezvous.current()
            except (RuntimeError, OSError) as e:  # node 0 not up (yet), or restarted
                log.info("waiting for the rendezvous at %s: %s", self.job.master_addr, e)
                rendezvous, generation = None, None
            if generation is None or generation == last:
                self._stop.wait(POLL_S)
                continue
            last = generation
            self._start(generation)
            dead = self._wait_for_exit(functools.partial(_moved_on, rendezvous, generation))
            if dead is not None and dead >= 0:
                code = self.procs[dead].poll()
                log.error("rank %d exited with code %s", self.job.first_rank + dead, code)
            self._end(graceful=False)
        return 0

    def _start(self, generation: str) -> None:
        self.starts += 1
        # Each rank leads its own process group, so ending a rank ends what it started too
        # (a compiler of a JIT build); ranks also die with this supervisor (rank.py).
        self.procs = [
            spawn(self.job.command, self.job.env(r, generation)) for r in range(self.job.ranks)
        ]
        log.info(
            "job %d (generation %s) started: rank pids %s",
            self.starts,
            generation,
            [p.pid for p in self.procs],
        )

    def _wait_for_exit(self, replaced: Callable[[], bool] = lambda: False) -> int | None:
        """The first local rank found exited, -1 once `replaced()` says the job is, or None
        when a stop was requested."""
        while not self._stop.wait(POLL_S):
            for rank, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    return rank
            if replaced():
                return -1
        return None

    def _end(self, graceful: bool) -> None:
        """Graceful: rank 0 drains and then stops the followers itself. Otherwise, or for any
        rank still alive after that, SIGTERM and then SIGKILL."""
        if graceful and self.job.leads:
            terminate(self.procs[:1], self.grace_s)
            terminate(self.procs[1:], 2.0, signal_first=False)
        terminate(self.procs, 3.0)


def _moved_on(rendezvous: Rendezvous | None, generation: str) -> bool:
    """Whether node 0 has published a newer generation (or its store went away)."""
    try:
        return rendezvous is None or rendezvous.current() != generation
    except (RuntimeError, OSError):
        return True
