"""How many cores this process may run on, and how to share them between processes.

`os.cpu_count()` is the host's count. Under `taskset`, a container's cpuset (`docker run
--cpuset-cpus`) or Kubernetes CPU pinning a process may use fewer; sizing torch's threads from the
host's count then runs more threads than cores, and every step waits for the threads that lost
their core.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may be scheduled on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform (macOS): every core
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """Threads for each of `processes` processes that share this process's cores, at least 1."""
    return max(1, usable_cores() // max(1, processes))
