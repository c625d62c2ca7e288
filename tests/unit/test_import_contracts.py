"""The import contracts in pyproject.toml hold (import-linter), and the linter does fail a
contract that is broken: which way imports point is checked by a tool, not by habit."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from importlinter import cli

REPO = Path(__file__).resolve().parents[2]


def _lint(config: Path, monkeypatch: pytest.MonkeyPatch, cwd: Path) -> int:
    monkeypatch.chdir(cwd)
    return cli.lint_imports(config_filename=str(config), no_cache=True, no_logo=True)


def test_the_project_keeps_its_import_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _lint(REPO / "pyproject.toml", monkeypatch, REPO) == cli.EXIT_STATUS_SUCCESS


def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same kind of layers contract over a two-package tree whose lower layer imports
    the upper one: the linter must report it."""
    for name, body in (("upper", ""), ("lower", "import upper\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["upper", "lower"]

        [[tool.importlinter.contracts]]
        name = "upper -> lower"
        type = "layers"
        layers = ["upper", "lower"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _lint(config, monkeypatch, tmp_path) == cli.EXIT_STATUS_ERROR
