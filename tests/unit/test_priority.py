"""The payments side's CPU priority (actors/priority.py), in a child process of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actors.priority import lower_priority, lower_session_priority


def _in_child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def test_every_thread_is_lowered_and_new_threads_inherit() -> None:
    out = _in_child(
        "import os, threading, time\n"
        "from actors.priority import lower_priority\n"
        "stop = threading.Event()\n"
        "early = threading.Thread(target=stop.wait); early.start()\n"
        "print(lower_priority(12))\n"
        "late = threading.Thread(target=stop.wait); late.start()\n"
        "print(sorted({os.getpriority(os.PRIO_PROCESS, int(t))"
        " for t in os.listdir('/proc/self/task')}))\n"
        "stop.set()\n")
    assert out.splitlines() == ["12", "[12]"]


def test_never_raises_priority_and_zero_leaves_it() -> None:
    out = _in_child(
        "import os\n"
        "from actors.priority import lower_priority\n"
        "os.nice(15)\n"
        "print(lower_priority(10), lower_priority(0))\n")
    assert out == "15 15"


def test_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        lower_priority(20)


def test_only_a_local_postgres_backend_is_lowered() -> None:
    # This test process is not PostgreSQL: nothing happens to it.
    before = os.getpriority(os.PRIO_PROCESS, 0)
    assert lower_session_priority(os.getpid(), 10) is False
    assert lower_session_priority(2**22 + 12345, 10) is False  # no such process
    assert lower_session_priority(os.getpid(), 0) is False
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
