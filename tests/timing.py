"""One scale for every wait in the tests: each limit is written for a busy 2-core machine and
multiplied by K2_TEST_TIME_SCALE (default 1), so a slower machine raises them all together
instead of one fixed constant tripping at a time. Limits bound waits; no test asserts speed."""

from __future__ import annotations

import os

SCALE = float(os.environ.get("K2_TEST_TIME_SCALE", "1"))


def seconds(limit: float) -> float:
    return limit * SCALE
