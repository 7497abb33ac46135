"""Machine-load accounting shared by the benches (this 2-core machine is shared)."""

from __future__ import annotations

import os
import time


class CpuMonitor:
    """CPU time used by *other* processes during a phase (this machine is shared).

    Busy jiffies of the whole machine from /proc/stat minus this process's and its children's
    CPU time; reported as a fraction of the machine's capacity over the phase.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as fh:
                vals = [int(v) for v in fh.readline().split()[1:]]
        except OSError:
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def foreign_fraction(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        foreign = (busy - self.busy0) - (self._own() - self.own0)
        return max(0.0, foreign) / (wall * (os.cpu_count() or 1))
