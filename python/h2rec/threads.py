"""CPU thread policy: how many intra-op threads torch uses, and how idle threads wait.

PyTorch's OpenMP threads spin while they wait for each other. On a machine whose cores other
processes also use, a spinning thread waits for a sibling that the kernel has descheduled, and
a step can take many times longer than on one thread (or make no progress at all in a process
started with ``setsid``). h2rec therefore

- asks OpenMP for passive waits (``OMP_WAIT_POLICY=PASSIVE``: an idle thread sleeps) unless the
  user set a policy; this must happen before torch is first imported, which importing
  :mod:`h2rec` does;
- uses as many threads as the CPUs this process may run on (its affinity mask, as set by
  ``taskset``, cgroups or a job scheduler), capped by ``OMP_NUM_THREADS`` when that is set, unless
  ``train.num_threads`` says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["available_cpus", "default_threads", "passive_waits", "set_threads"]

logger = logging.getLogger(__name__)


def passive_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless set; True when it can still take effect (torch not
    yet imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def set_threads(num_threads: int = 0) -> int:
    """Set torch's intra-op threads: ``num_threads``, or :func:`default_threads` when 0."""
    import torch

    n = num_threads if num_threads > 0 else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    logger.debug("torch intra-op threads: %d (OMP_WAIT_POLICY=%s)", n, os.environ.get("OMP_WAIT_POLICY"))
    return n
