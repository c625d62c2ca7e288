"""Risk: a decision on each payment from what it is given.

The public interface of the risk domain: the rules, their configuration, the decision and
the bounded velocity window the risk actor keeps. Other domains import from here, never
from the modules inside (an import-linter contract, pyproject.toml). Risk imports neither
the ledger's nor payments' code.
"""

from processor.risk.rules import (
    EVENTS_PER_TOKEN_MAX,
    FallbackCause,
    RiskConfig,
    RiskDecision,
    RiskReason,
    RiskSource,
    VelocityWindow,
    evaluate,
    fallback,
)

__all__ = [
    "EVENTS_PER_TOKEN_MAX",
    "FallbackCause",
    "RiskConfig",
    "RiskDecision",
    "RiskReason",
    "RiskSource",
    "VelocityWindow",
    "evaluate",
    "fallback",
]
