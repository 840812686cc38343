"""The job supervisor: rank environment, restart of the whole job, bounded retries, graceful stop.

The ranks here are tiny stand-in Python processes (no torch), so each job starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from services.common.processes import RestartPolicy
from services.experts.supervisor import JobSpec, Supervisor
from tests.e2e.suite_fixtures import free_port
from tests.timing import seconds

FAST = RestartPolicy(max_restarts=3, backoff_s=0.01, max_backoff_s=0.02, healthy_after_s=60)


def rank_script(tmp_path: Path, body: str) -> list[str]:
    """A rank that records its environment (one JSON line per start), then runs `body`."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import json, os, sys, time, signal\n"
        f"log = {str(tmp_path / 'starts.jsonl')!r}\n"
        "keys = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_SIZE',\n"
        "        'LOCAL_WORLD_SIZE', 'K2_EXPERTS_GENERATION']\n"
        "with open(log, 'a') as f:\n"
        "    f.write(json.dumps({k: os.environ.get(k) for k in keys} | {'pid': os.getpid()}) + '\\n')\n"
        + body
    )
    return [sys.executable, str(script)]


def until(condition, limit_s: float = 30.0) -> None:
    """Wait for condition() (the asserts after it say what was expected)."""
    deadline = time.monotonic() + seconds(limit_s)
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def starts(tmp_path: Path) -> list[dict]:
    path = tmp_path / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ranks_get_the_rendezvous_environment_and_a_crash_loop_gives_up(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("LOCAL_SIZE", "3")  # must not reach the ranks (DeepSpeed's shm path)
    body = (
        "while sum(1 for _ in open(log)) % 3:\n"  # every rank of this job has started
        "    time.sleep(0.01)\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit(3)\n"
        "time.sleep(30)\n"
    )
    command = rank_script(tmp_path, body)
    sup = Supervisor(JobSpec(command, 3, "127.0.0.1", free_port()), FAST, grace_s=2)
    assert sup.run() == 1  # rank 1 dies at every start: 1 start + 3 restarts, then give up
    assert sup.starts == 4
    seen = starts(tmp_path)
    assert len(seen) == 12
    assert sorted(s["RANK"] for s in seen[:3]) == ["0", "1", "2"]
    for s in seen:
        assert s["RANK"] == s["LOCAL_RANK"] and s["WORLD_SIZE"] == "3"
        assert (s["MASTER_ADDR"], s["MASTER_PORT"], s["LOCAL_SIZE"]) == (
            "127.0.0.1",
            str(sup.job.master_port),
            None,
        )
    assert all(p.poll() is not None for p in sup.procs)  # the survivors were ended each time


# Two ranks; once both of the first job have started, rank 1 dies (once).
RANK_1_DIES_ONCE = (
    "while sum(1 for _ in open(log)) % 2:\n"  # both ranks of this job have started
    "    time.sleep(0.01)\n"
    "if os.environ['RANK'] == '1' and sum(1 for _ in open(log)) == 2:\n"
    "    sys.exit(9)\n"
    "time.sleep(30)\n"
)


def two_ranks(tmp_path: Path, body: str) -> Supervisor:
    return Supervisor(
        JobSpec(rank_script(tmp_path, body), 2, "127.0.0.1", free_port()), FAST, grace_s=2
    )


def test_a_dead_rank_restarts_the_whole_job(tmp_path: Path) -> None:
    """Rank 1 dies once; the supervisor ends rank 0 and starts both again, then stops on request."""
    sup = two_ranks(tmp_path, RANK_1_DIES_ONCE)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run()))
    thread.start()
    try:
        until(lambda: len(starts(tmp_path)) >= 4)
        first_job = starts(tmp_path)[:2]
        assert len(starts(tmp_path)) == 4 and sup.starts == 2
    finally:
        sup.request_stop()
        thread.join(seconds(30))
    assert result == [0]
    assert all(p.poll() is not None for p in sup.procs)
    assert {s["pid"] for s in first_job}.isdisjoint(p.pid for p in sup.procs)


def test_stop_is_graceful_for_rank_0(tmp_path: Path) -> None:
    """SIGTERM goes to rank 0 only; rank 0 then ends the followers (here: by file) and exits 0."""
    done = tmp_path / "stopped"
    body = (
        "if os.environ['RANK'] == '0':\n"
        "    signal.signal(signal.SIGTERM, lambda *_: (open("
        + repr(str(done))
        + ", 'w').close(), sys.exit(0)))\n"
        "    time.sleep(30)\n"
        "while not os.path.exists(" + repr(str(done)) + "):\n"
        "    time.sleep(0.01)\n"
    )
    sup = Supervisor(
        JobSpec(rank_script(tmp_path, body), 2, "127.0.0.1", free_port()), FAST, grace_s=5
    )
    thread = threading.Thread(target=sup.run)
    thread.start()
    until(lambda: len(starts(tmp_path)) == 2)
    sup.request_stop()
    thread.join(seconds(30))
    assert [p.returncode for p in sup.procs] == [0, 0]  # nobody was killed
    assert sup.starts == 1


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def wait_for(check, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_pool_spanning_nodes_restarts_as_one_job(tmp_path: Path) -> None:
    """Node 0 (rank 0) and node 1 (rank 1), each under its own supervisor. Rank 1 dies in the
    first job: rank 0 then fails too (as its collectives would), node 0 starts generation 2 and
    node 1 follows it. In generation 2 rank 0 dies alone: node 1 ends its live rank and joins
    generation 3. Stand-in ranks: a 'broken' file plays the failing collective."""
    broken = tmp_path / "broken"
    body = (
        "gen = os.environ['K2_EXPERTS_GENERATION']\n"
        "n = gen.rsplit('.', 1)[1]\n"
        "if os.environ['RANK'] == '1' and n == '1':\n"
        f"    open({str(broken)!r}, 'w').close(); sys.exit(9)\n"
        "if os.environ['RANK'] == '0' and n == '2':\n"
        "    time.sleep(0.5); sys.exit(7)\n"
        f"while not (n == '1' and os.path.exists({str(broken)!r})):\n"
        "    time.sleep(0.01)\n"
        "sys.exit(1)\n"
    )
    command = rank_script(tmp_path, body)
    port = 29561
    node0 = Supervisor(JobSpec(command, 1, "127.0.0.1", port, world=2, first_rank=0), FAST, 2)
    node1 = Supervisor(JobSpec(command, 1, "127.0.0.1", port, world=2, first_rank=1), FAST, 2)
    threads = [threading.Thread(target=s.run) for s in (node1, node0)]  # node 1 waits for node 0
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: len({(s["RANK"], s["K2_EXPERTS_GENERATION"]) for s in starts(tmp_path)}) >= 6
        )
    finally:
        node0.request_stop()
        node1.request_stop()
        for t in threads:
            t.join(10)
    seen = starts(tmp_path)
    generations = sorted(
        {s["K2_EXPERTS_GENERATION"] for s in seen}, key=lambda g: int(g.rsplit(".", 1)[1])
    )
    assert len(generations) >= 3
    for g in generations[:3]:  # both ranks ran in each of the first three generations
        assert sorted(s["RANK"] for s in seen if s["K2_EXPERTS_GENERATION"] == g)[:2] == ["0", "1"]
    for s in seen:
        assert (s["WORLD_SIZE"], s["LOCAL_WORLD_SIZE"], s["LOCAL_RANK"]) == ("2", "1", "0")
        assert (s["MASTER_ADDR"], s["MASTER_PORT"]) == ("127.0.0.1", str(port))
    assert node1.starts >= 3 and node0.starts >= 3
    assert all(p.poll() is not None for p in node0.procs + node1.procs)


def test_ending_a_job_ends_what_its_ranks_started(tmp_path: Path) -> None:
    """Regression: a killed rank's children (a JIT build's ninja and
    compilers) survived it. Each rank leads its own process group, which the supervisor ends."""
    children = tmp_path / "children"
    body = (
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        f"open({str(children)!r}, 'a').write(f'{{child.pid}}\\n')\n"
    ) + RANK_1_DIES_ONCE
    sup = two_ranks(tmp_path, body)
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        until(lambda: children.exists() and len(children.read_text().split()) >= 4)
        first = [int(pid) for pid in children.read_text().split()[:2]]
        until(lambda: not any(alive(pid) for pid in first))
        assert not any(alive(pid) for pid in first), "the first job's children outlived it"
    finally:
        sup.request_stop()
        thread.join(seconds(30))
    assert not any(alive(int(pid)) for pid in children.read_text().split())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(") ")[-1][0] != "Z"
