"""How much CPU other processes took while a benchmark window ran (Linux; zero elsewhere).

On a small machine one other busy process halves a CPU benchmark. Each timed window records the
cores that the rest of the machine used during it (all CPU time in /proc/stat minus this process's
own, in /proc/self/stat), so results say how clean they were and a window that someone else
shared can be measured again instead of reported."""
from __future__ import annotations

import os
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    return (sum(values[:8]) - idle - steal) / _TICKS


def _own_busy_s() -> float:
    times = os.times()
    # children: DataLoader workers of the baseline are part of the measured work
    return times.user + times.system + times.children_user + times.children_system


def _children_busy_s() -> float:
    """CPU time of live child processes (DataLoader workers), which os.times() only counts once
    they have been waited for."""
    total = 0.0
    try:
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    except OSError:
        return 0.0
    for pid in children:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total


class ForeignLoad:
    """`with ForeignLoad() as load: ...` then `load.cores`: the average number of cores that other
    processes kept busy during the block (0.0 where /proc is not available)."""

    def __enter__(self) -> "ForeignLoad":
        self._machine = _machine_busy_s()
        self._own = _own_busy_s() + _children_busy_s()
        self._start = time.perf_counter()
        self.cores = 0.0
        return self

    def __exit__(self, *exc) -> None:
        machine = _machine_busy_s()
        if machine is None or self._machine is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        own = _own_busy_s() + _children_busy_s() - self._own
        self.cores = max(0.0, (machine - self._machine - own) / elapsed)
