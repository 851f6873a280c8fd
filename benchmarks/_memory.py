"""Peak resident memory of a call on the CPU, shared by run.py and volumes.py (Linux: /proc/self)."""

from __future__ import annotations

from collections.abc import Callable


def rss(key: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident set of the second call of ``fn`` above the resident set before the first (a fresh process)."""
    base = rss("VmRSS")
    fn()
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak to the current resident set
        clear.write("5")
    fn()
    return rss("VmHWM") - base
