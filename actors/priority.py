"""CPU priority of an actor's process: how a failure domain yields the CPU to another.

On a node that runs both the ledger and payments (every single-machine deployment), a
saturated payments side would otherwise take CPU time the ledger's front and shards need,
and the ledger's latency would follow payments' load. The payments-side actors (the
payments actor, the provider actors, the risk actor) lower their own priority with a nice
value (``PaymentsSection.cpu_nice``, 19 by default), so the kernel's scheduler gives the
ledger's processes the CPU first whenever both want it, and payments everything that is
left. Where the domains run on different nodes it changes nothing.

Linux keeps the nice value per thread: every thread of the process is lowered, and the
threads it starts later inherit the value from the one that starts them. Ray starts its
workers at nice 15 already (it favours its own daemons), so the payments side goes to 19
against the ledger's 15. Payments' database sessions are lowered too (each PostgreSQL
backend is its own scheduling group where the kernel groups by session: its group's nice
is set).
"""

from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["lower_priority", "lower_session_priority"]

log = logging.getLogger("txproc.priority")
NICE_MAX = 19


def lower_priority(nice: int) -> int:
    """Give every thread of this process at least ``nice`` (0..19); returns the lowest
    nice value now in force (the process's own). Never raises: a platform or a sandbox
    that refuses leaves the priority as it was, and says so in the log."""
    if not 0 <= nice <= NICE_MAX:
        raise ValueError(f"nice must be within 0..{NICE_MAX}, got {nice}")
    if nice == 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for thread in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            try:
                if os.getpriority(os.PRIO_PROCESS, thread) < nice:
                    os.setpriority(os.PRIO_PROCESS, thread, nice)
            except PermissionError as exc:
                log.warning("cannot lower the CPU priority to nice %d: %s", nice, exc)
                break
    return os.getpriority(os.PRIO_PROCESS, 0)


def lower_session_priority(server_pid: int, nice: int) -> bool:
    """Lower the CPU priority of the PostgreSQL backend ``server_pid`` serving one of this
    process's connections, when that backend runs on this machine; True if it did.

    Payments' queries then yield the CPU to the ledger's commits on a shared node, as the
    payments processes do. The pid is checked to be a local ``postgres`` process first (a
    remote server's pid means nothing here); anything refused is left as it was.
    """
    if nice <= 0:
        return False
    try:
        import psutil

        process = psutil.Process(server_pid)
        if not process.name().startswith("postgres"):
            return False
        if process.nice() < nice:
            process.nice(nice)
    except Exception:  # noqa: BLE001 - not here, not ours, or gone: nothing to do
        return False
    # Each backend is a session leader (PostgreSQL calls setsid), so where the kernel
    # groups CPU time by session (autogroup), the backend is a group of its own and its
    # nice value only ranks it against itself: the group's nice is what counts.
    with contextlib.suppress(OSError):
        with open(f"/proc/{server_pid}/autogroup", "w") as group:
            group.write(str(nice))
    return True
