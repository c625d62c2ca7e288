"""Fixtures of the database tests beyond the session's (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from actors.payments.store import PaymentStore


@pytest.fixture
async def store(app_db_url: str) -> AsyncIterator[PaymentStore]:
    """A PaymentStore connected as the service connects: every statement it runs must be
    granted to the application role."""
    s = await PaymentStore.connect(app_db_url, pool_size_max=8, connect_timeout_s=10,
                                   command_timeout_s=30)
    try:
        yield s
    finally:
        await s.close()
