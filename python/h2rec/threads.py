"""CPU thread policy: how many intra-op threads torch uses, and how idle threads wait.

PyTorch's OpenMP threads spin while they wait for each other. On a machine whose cores other
processes also use, a spinning thread waits for a sibling that the kernel has descheduled, and
a step can take many times longer than on one thread (or make no progress at all in a process
started with ``setsid``). h2rec therefore

- asks OpenMP for passive waits (``OMP_WAIT_POLICY=PASSIVE``: an idle thread sleeps) unless the
  user set a policy; this must happen before torch is first imported, which importing
  :mod:`h2rec` does;
- asks MKL for thread-count-independent results (``MKL_CBWR=AUTO,STRICT``) unless the user set
  a mode, so that training gives the same bits on 1 thread and on 8;
- uses as many threads as the CPUs this process may run on (its affinity mask, as set by
  ``taskset``, cgroups or a job scheduler), capped by ``OMP_NUM_THREADS`` when that is set, unless
  ``train.num_threads`` says otherwise;
- and, with ``train.num_threads=0``, looks again before every epoch at how many of those CPUs
  other processes leave idle (over a 0.1 s window of ``/proc/stat``), and uses that many
  threads, at least one. A CPU busy with niced work counts as busy: such work often spins, and
  a thread of ours sharing its CPU stalls the threads it synchronises with. Results do not depend on the
  thread count, so this changes speed only.
"""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = [
    "auto_threads",
    "available_cpus",
    "default_threads",
    "free_cpus",
    "passive_waits",
    "set_threads",
]

logger = logging.getLogger(__name__)


def passive_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` and ``MKL_CBWR=AUTO,STRICT`` unless set; True when the
    wait policy can still take effect (torch not yet imported). The MKL mode takes effect if no
    MKL routine has run yet in the process, torch imported or not."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # MKL's strict conditional numerical reproducibility: its GEMMs then give the same bits
    # whatever the thread count (without it a step's weight gradients differ in the last bits
    # between 1 and 2 threads; measured cost on one thread: none). MKL reads it when it first
    # runs, so setting it after torch's import still works, up to the first matrix product
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    return "torch" not in sys.modules


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return max(os.cpu_count() or 1, 1)


def default_threads() -> int:
    """The CPUs available, capped by a valid ``OMP_NUM_THREADS``."""
    n = available_cpus()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        n = min(n, int(env))
    return n


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (free ticks, total ticks)} from /proc/stat; free = idle + iowait."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            cpu = int(name[3:])
            if cpu not in cpus:
                continue
            v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[cpu] = (v[3] + v[4], sum(v))
    return out


def free_cpus(window: float = 0.1) -> float | None:
    """How many of this process's CPUs were idle over ``window`` seconds (a fraction per CPU,
    summed); None where /proc/stat is unreadable."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(cpus)
        time.sleep(window)
        after = _cpu_times(cpus)
    except (AttributeError, OSError, ValueError):
        return None
    free = 0.0
    for cpu, (f1, t1) in after.items():
        f0, t0 = before.get(cpu, (f1, t1))
        if t1 > t0:
            free += min(max((f1 - f0) / (t1 - t0), 0.0), 1.0)
    return free if after else None


def auto_threads(window: float = 0.1) -> int:
    """:func:`default_threads`, lowered to the CPUs that are free right now (at least one)."""
    n = default_threads()
    if n == 1:
        return 1
    free = free_cpus(window)
    if free is None:
        return n
    return max(1, min(n, int(free + 0.3)))


def set_threads(num_threads: int = 0) -> int:
    """Set torch's intra-op threads: ``num_threads``, or :func:`default_threads` when 0."""
    import torch

    n = num_threads if num_threads > 0 else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    logger.debug("torch intra-op threads: %d (OMP_WAIT_POLICY=%s)", n, os.environ.get("OMP_WAIT_POLICY"))
    return n
