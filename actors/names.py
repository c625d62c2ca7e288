"""The Ray namespace every txproc actor lives in (their names are each domain's own)."""

from __future__ import annotations

__all__ = ["NAMESPACE"]

NAMESPACE = "txproc"
