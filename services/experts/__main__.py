"""`python -m services.experts --deployment FILE --name NAME`: one expert pool (a DeepSpeed job).

This process is the job's supervisor: it starts `ranks` rank processes
(`python -m services.experts.rank` with the same arguments), restarts the whole job when one of
them dies, and stops it gracefully on SIGTERM / SIGINT.
"""

from __future__ import annotations

import signal
import sys

from services.common.main_args import parse
from services.experts.supervisor import JobSpec, Supervisor


def main() -> None:
    _, me = parse("experts", __doc__)
    command = [sys.executable, "-m", "services.experts.rank", *sys.argv[1:]]
    supervisor = Supervisor(JobSpec(command, me.ranks, me.address, me.master_port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.request_stop())
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main()
