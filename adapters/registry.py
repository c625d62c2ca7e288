"""The payment providers the processor knows, by name.

``ADAPTERS[name].from_secrets_file(path, timeout_s=...)`` builds the adapter of a provider
from its secrets file (the format ``adapters.sim.launch.write_secrets`` writes). The
simulated providers of the same names live in ``adapters.sim``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Protocol

from adapters.acme import AcmeAdapter
from adapters.base import Adapter
from adapters.globex import GlobexAdapter

__all__ = ["ADAPTERS", "PROVIDER_NAMES", "AdapterClass"]


class AdapterClass(Protocol):
    """An adapter class: builds its adapter from a secrets file (raises ``ValueError`` if
    the file is not the provider's). ``timeout_s`` defaults to the provider's SLA."""

    name: str
    currencies: frozenset[str]

    def from_secrets_file(self, path: Path | str, *, timeout_s: float = ...) -> Adapter: ...


PROVIDER_NAMES: Final = ("acme", "globex")
# Typed with the protocols, so mypy checks that each class keeps the Adapter contract.
ADAPTERS: Final[dict[str, AdapterClass]] = {
    "acme": AcmeAdapter,
    "globex": GlobexAdapter,
}
