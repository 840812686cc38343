"""`python -m services.experts --deployment FILE --name NAME`: one expert pool (a DeepSpeed job).

This process is the job's supervisor: it starts `ranks` rank processes
(`python -m services.experts.rank` with the same arguments), restarts the whole job when one of
them dies, and stops it gracefully on SIGTERM / SIGINT. For a pool spanning nodes, `--node K`
runs node K's supervisor and ranks (supervisor.py).
"""

from __future__ import annotations

import signal
import sys

from services.common.main_args import parse
from services.experts.rendezvous import interface_for
from services.experts.supervisor import JobSpec, Supervisor


def main() -> None:
    _, me = parse("experts", __doc__)
    command = [sys.executable, "-m", "services.experts.rank", *sys.argv[1:]]
    nodes = me.pool_nodes()
    here, master = nodes[me.node], nodes[0]
    interface = interface_for(here.address)
    job = JobSpec(
        command, here.ranks, master.address, me.master_port, me.ranks, here.first_rank, interface
    )
    supervisor = Supervisor(job)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.request_stop())
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main()
