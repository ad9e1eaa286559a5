"""Peak resident memory of a block of code, without psutil.

Linux keeps the process's high-water mark (VmHWM in /proc/self/status) and resets it when "5" is
written to /proc/self/clear_refs, so two benchmarks run one after the other in one process each get
their own peak. Elsewhere `resource.getrusage` gives the peak since the process started, which is
an upper bound."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """ru_maxrss in MB (Linux reports kB, macOS bytes)."""
    value = resource.getrusage(who).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024


class PeakRSS:
    """`with PeakRSS() as rss: ...` then `rss.peak_mb`: the peak resident set of this process
    during the block (since process start where the high-water mark cannot be reset)."""

    def __enter__(self) -> "PeakRSS":
        self._resettable = _reset_hwm()
        self.peak_mb = 0.0
        return self

    def __exit__(self, *exc) -> None:
        hwm = _vm_hwm_mb() if self._resettable else None
        self.peak_mb = hwm if hwm is not None else maxrss_mb()
