"""The operator commands start without what only `txproc serve` and the demo run.

Importing the command line and the modules behind its small commands (migrate, audit,
token, keys, dlq, webhooks, payments review, erase) loads no Ray, Numba, Starlette or
aiohttp: each of those imports cost about a second of every `txproc` invocation, and the
suite runs the command as a subprocess about a hundred times. The packages on the way
import their names when first read (processor/lazy.py); these tests hold them to the
imports their type checks and import contracts see.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Brought in by serve, demo and verify only; NumPy by the ledger and the batch types.
HEAVY = ("ray", "numba", "starlette", "aiohttp", "numpy")

# What the small commands import (actors/app/cli.py), the way they import it.
SMALL_COMMANDS = """
import actors.app.cli as cli
cli._parser()
from actors.app.databases import ensure_database
from actors.database import EmbeddedPostgresError
from actors.edge import create_client_key, revoke_client_key, revoke_subject, revoke_token_id
from actors.edge.audit import who_made
from actors.migrate import migrate
from actors.ops import operator_actor, record_audit_event
from actors.ops.audit_events import list_audit_events
from actors.payments import outbox, webhook_endpoints
from actors.payments.store import PaymentStore
from actors.payments.subjects import erase_subject
from processor.audit import audit_query_of
from processor.identity import load_or_create_ring, retire_key, rotate_key, tenant_slot
from processor.payments import check_endpoint
from processor.privacy import MasterKey
"""

LAZY_PACKAGES = ("processor", "processor.ledger", "actors.edge", "actors.ops", "actors.payments")


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(modules.intersection(HEAVY))


def test_the_small_commands_import_nothing_heavy() -> None:
    assert _heavy(_modules_after(SMALL_COMMANDS)) == []


def test_a_command_run_through_main_imports_nothing_heavy(tmp_path: Path) -> None:
    """``keys list`` and ``migrate --help`` as main runs them: parsing, logging, the event
    loop policy and the command's own imports."""
    code = textwrap.dedent(f"""
        import contextlib, io
        from actors.app.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["keys", "list", "--data-dir", {str(tmp_path)!r}]) == 0
            try:
                main(["migrate", "--help"])
            except SystemExit as exit:
                assert exit.code == 0
    """)
    assert _heavy(_modules_after(code)) == []


def test_serve_still_brings_what_it_runs() -> None:
    """The check above can fail: the runtime behind ``serve`` does load Ray and the
    kernels, through the same packages."""
    heavy = _heavy(_modules_after("import actors.app.runtime\n"
                                  "from processor.ledger import ArrayBook"))
    assert {"ray", "numba", "numpy"} <= set(heavy)


def _declared(package: ModuleType) -> dict[str, tuple[str, str]]:
    """``{name: (module, attribute)}`` of the imports under ``TYPE_CHECKING`` in
    ``package``'s ``__init__``: the ones mypy and the import contracts read."""
    tree = ast.parse(Path(package.__file__ or "").read_text())
    declared: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module
                for alias in statement.names:
                    declared[alias.asname or alias.name] = (statement.module, alias.name)
    return declared


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_a_lazy_package_gives_the_names_its_imports_declare(name: str) -> None:
    """Every name of ``__all__`` is declared under ``TYPE_CHECKING`` and read, on first
    use, from the module the declaration names; a name not declared is refused."""
    package = importlib.import_module(name)
    declared = _declared(package)
    assert set(declared) == set(package.__all__)
    for public, (module, attribute) in declared.items():
        if module == name:  # a submodule
            expected = importlib.import_module(f"{module}.{attribute}")
        else:
            expected = getattr(importlib.import_module(module), attribute)
        assert getattr(package, public) is expected, public
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = package.no_such_name


@pytest.mark.parametrize("name", (*LAZY_PACKAGES, "actors.ledger"))
def test_no_name_served_lazily_is_also_a_submodules(name: str) -> None:
    """A name served on first read that a submodule also has would become that module as
    soon as anything imports the submodule (the import binds it on the package, and the
    lazy lookup is never asked): ``from actors.ledger import verify`` once handed
    `txproc verify` a module. Such a name is imported at once instead."""
    package = importlib.import_module(name)
    submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
    lazy = {public for public, (module, _) in _declared(package).items() if module != name}
    assert not lazy & submodules


def test_a_shards_worker_loads_no_front() -> None:
    """Ray starts a shard's worker by importing ``actors.ledger.shard``: the front, its HTTP
    stack and the payments routes stay out of it (each shard start and restart paid about
    0.8 s of CPU for them)."""
    modules = _modules_after("import actors.ledger.shard")
    assert not {"actors.ledger.front", "starlette", "uvicorn", "actors.edge.http_api"} & modules
