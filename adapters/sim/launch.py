"""Start a simulated provider as a child process, and give it secrets.

Used by the processor (to run against the simulators in development) and by the tests::

    write_secrets(path, "acme")            # fresh random secrets, mode 0600, if none yet
    sim = start_sim("acme", secrets_file=path, webhook_url="http://127.0.0.1:8000/hooks/acme")
    ...                                    # sim.url, sim.pid; await sim.set_faults({...})
    sim.stop()

The child is ``sys.executable -m adapters.sim.<name> --exit-with-parent``; ``start_sim``
returns once it printed ``listening on http://HOST:PORT`` (so it accepts connections), and
raises ``SimStartError`` if it exits or stays silent for ``startup_timeout_s``. The child
stops by itself when the process that started it ends (its stdin pipe closes).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from adapters.sim.core import PROVIDER_SECRET_FIELDS, generate_secrets, load_secrets

__all__ = ["SIM_NAMES", "SimProcess", "SimStartError", "start_sim", "write_secrets"]

SIM_NAMES = ("acme", "globex")
READY_PREFIX = "listening on "
ADMIN_TIMEOUT_S = 10.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding ``adapters``


class SimStartError(RuntimeError):
    """The simulator did not come up (it exited, or did not say it listens in time)."""


def write_secrets(path: Path, name: str) -> None:
    """Create ``path`` with fresh random secrets for provider ``name`` unless it exists.

    The file is created with mode 0600 (never readable by others, even for a moment). An
    existing file is left alone if it holds the secrets of ``name``; raises ``SecretsError``
    (a ``ValueError``) if it holds something else.
    """
    if name not in PROVIDER_SECRET_FIELDS:
        raise ValueError(f"unknown provider {name!r}; expected one of {SIM_NAMES}")
    path = Path(path)
    if path.exists():
        load_secrets(path, name)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(generate_secrets(name), indent=2).encode() + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it first: theirs is as good as ours
        load_secrets(path, name)
        return
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


class SimProcess:
    """A running simulator: where it listens, its process, and its admin API.

    The admin helpers (``set_faults``, ``charges``, ``reset``, ``stats``) are coroutines that
    call ``/_sim/*`` with the admin token from the secrets file.
    """

    def __init__(self, name: str, url: str, process: subprocess.Popen[bytes],
                 secrets_file: Path) -> None:
        self.name = name
        self.url = url
        self.process = process
        self.secrets_file = secrets_file
        host_port = url.removeprefix("http://")
        self.host, _, port = host_port.rpartition(":")
        self.port = int(port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> int:
        """Terminate (SIGTERM), wait up to ``timeout_s``, then kill; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self.process.stdin is not None:
            self.process.stdin.close()
        return self.process.returncode

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def admin_headers(self) -> dict[str, str]:
        token = load_secrets(self.secrets_file, self.name)["admin_token"]
        return {"authorization": f"Bearer {token}"}

    async def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        # Plain HTTP on loopback: no TLS context is needed, and building one costs ~50 ms.
        async with httpx.AsyncClient(timeout=ADMIN_TIMEOUT_S, verify=False) as client:
            answer = await client.request(method, f"{self.url}{path}",
                                          headers=self.admin_headers(), json=payload)
        answer.raise_for_status()
        return answer.json()

    async def set_faults(self, faults: dict[str, Any]) -> dict[str, Any]:
        """Replace the injected faults (see ``adapters.sim.faults.Faults``); {} clears them."""
        result: dict[str, Any] = await self._admin("PUT", "/_sim/faults", faults)
        return result

    async def add_discrepancies(self, *items: dict[str, Any]) -> dict[str, Any]:
        """Make the next settlement reports carry these discrepancies (see
        ``adapters.sim.settlement.Discrepancy``); answers what waits and what is bound."""
        result: dict[str, Any] = await self._admin("POST", "/_sim/reports/discrepancies",
                                                   {"discrepancies": list(items)})
        return result

    async def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._admin("GET", "/_sim/faults")
        return result

    async def charges(self) -> list[dict[str, Any]]:
        """The provider's own ledger: every recorded operation (declines included)."""
        result: dict[str, Any] = await self._admin("GET", "/_sim/charges")
        operations: list[dict[str, Any]] = result["operations"]
        return operations

    async def reset(self) -> None:
        await self._admin("POST", "/_sim/reset")

    async def open_dispute(self, authorization_id: str, amount: int, *, fee: int = 1500,
                           reason: str = "fraudulent") -> dict[str, Any]:
        """Open a dispute on a charge, as the payer's bank would; its webhook follows."""
        result: dict[str, Any] = await self._admin(
            "POST", "/_sim/disputes", {"authorization_id": authorization_id,
                                       "amount": amount, "fee": fee, "reason": reason})
        return result

    async def decide_dispute(self, dispute_id: str, outcome: str) -> dict[str, Any]:
        """Decide a dispute, ``won`` or ``lost``; its webhook follows."""
        result: dict[str, Any] = await self._admin(
            "POST", f"/_sim/disputes/{dispute_id}/decision", {"outcome": outcome})
        return result

    async def disputes(self) -> list[dict[str, Any]]:
        result: dict[str, Any] = await self._admin("GET", "/_sim/disputes")
        disputes: list[dict[str, Any]] = result["disputes"]
        return disputes

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._admin("GET", "/_sim/stats")
        return result


def start_sim(name: str, *, secrets_file: Path, port: int = 0, host: str = "127.0.0.1",
              webhook_url: str = "", report_dir: Path | None = None, seed: int | None = None,
              settle_delay_ms: float | None = None, webhook_backoff_ms: float | None = None,
              webhook_tls: tuple[str, str, str] = ("", "", ""),
              webhook_batch_max: int | None = None,
              webhook_batch_linger_ms: float | None = None,
              startup_timeout_s: float = 20.0) -> SimProcess:
    """Start simulator ``name`` and wait until it listens; raises ``SimStartError``.

    ``webhook_tls`` is (CA, client certificate, key), PEM paths, for webhooks over TLS.
    Secrets are created in ``secrets_file`` if it does not exist (see ``write_secrets``).
    The child inherits stderr (its warnings show up there) and is given nothing secret on
    its command line.
    """
    if name not in SIM_NAMES:
        raise ValueError(f"unknown provider {name!r}; expected one of {SIM_NAMES}")
    write_secrets(secrets_file, name)
    argv = [sys.executable, "-m", f"adapters.sim.{name}", "--port", str(port), "--host", host,
            "--secrets-file", str(secrets_file), "--exit-with-parent"]
    if webhook_url:
        argv += ["--webhook-url", webhook_url]
    for flag, path in zip(("--webhook-ca", "--webhook-cert", "--webhook-key"), webhook_tls,
                          strict=True):
        if path:
            argv += [flag, path]
    if report_dir is not None:
        argv += ["--report-dir", str(report_dir)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if settle_delay_ms is not None:
        argv += ["--settle-delay-ms", str(settle_delay_ms)]
    if webhook_backoff_ms is not None:
        argv += ["--webhook-backoff-ms", str(webhook_backoff_ms)]
    if webhook_batch_max is not None:
        argv += ["--webhook-batch-max", str(webhook_batch_max)]
    if webhook_batch_linger_ms is not None:
        argv += ["--webhook-batch-linger-ms", str(webhook_batch_linger_ms)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH", "")])])
    env["PYTHONUNBUFFERED"] = "1"
    # The child's stdin is a pipe nobody writes to: when this process ends, however it
    # ends, the pipe closes and the child stops (``--exit-with-parent``).
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env=env, close_fds=True)
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True,
                     name=f"sim-{name}-stdout").start()
    try:
        line = lines.get(timeout=startup_timeout_s)
    except queue.Empty:
        line = None
        reason = f"no '{READY_PREFIX}' line within {startup_timeout_s} s"
    else:
        reason = f"exited with status {process.poll()}"
    if line is None or not line.startswith(READY_PREFIX):
        _kill(process)
        raise SimStartError(f"simulator {name} did not start: {reason}")
    return SimProcess(name, line.removeprefix(READY_PREFIX).strip(), process, Path(secrets_file))


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Pass the child's stdout lines on, and keep draining it so it never blocks."""
    with_first = True
    for raw in iter(stream.readline, b""):
        if with_first:
            lines.put(raw.decode(errors="replace"))
            with_first = False
    if with_first:
        lines.put(None)  # it closed stdout (exited) before saying anything
    stream.close()


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stdin is not None:
        process.stdin.close()
