"""Ports for the `txproc serve` processes tests start, chosen where nothing else will pick.

A port found free by binding port 0 comes from the kernel's ephemeral range, and is free
again the moment it is returned: the Ray instance a `serve` starts binds a dozen ports of
its own the same way (GCS, raylet, object manager, agents), and one of them took a front's
port before the front bound it (a CI run's `txproc serve` never became ready). These come
from between Ray's worker ports (10002-19999 by default) and the ephemeral range, which
neither the kernel nor Ray hands out unasked.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_port_pair"]

LOW = 20_000
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _high() -> int:
    """The first port of the kernel's ephemeral range (exclusive bound), or 0 when the
    range starts too low to leave room (then any free port is taken as the kernel gives)."""
    try:
        first = int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32_768
    return first if first > LOW + 1_000 else 0


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, consecutive: int = 1) -> int:
    """A port free now, with the ``consecutive - 1`` ports after it free too (for the
    fronts `serve --fronts N` places on consecutive ports)."""
    high = _high()
    chooser = random.SystemRandom()
    for _ in range(200):
        if high:
            port = chooser.randrange(LOW, high - consecutive)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        if all(_bindable(port + i) for i in range(consecutive)):
            return port
    raise AssertionError(f"no {consecutive} consecutive free ports")


def free_port_pair() -> int:
    """A free port whose successor is free too."""
    return free_port(consecutive=2)
