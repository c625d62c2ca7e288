"""actors/edge/tenancy.py: what a tenant may read of the ledger, over a ledger in memory."""

from __future__ import annotations

from actors.edge.tenancy import visible_accounts, visible_transfers
from processor.types import Account, Transfer

A, B = 11, 22


class _Accounts:
    """The one LedgerService call the filter makes, answered from a dict."""

    def __init__(self, accounts: list[Account]) -> None:
        self.accounts = {a.id: a for a in accounts}
        self.calls = 0

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        self.calls += 1
        return [self.accounts.get(i) for i in ids]


def _t(tid: int, debit: int, credit: int, tenant: int) -> Transfer:
    return Transfer(id=tid, debit_account_id=debit, credit_account_id=credit, amount=1,
                    currency="USD", tenant=tenant)


ACCOUNTS = [Account(id=1, currency="USD", tenant=A), Account(id=2, currency="USD", tenant=B),
            Account(id=3, currency="USD", tenant=0)]


def test_accounts_of_other_tenants_read_as_unknown() -> None:
    found: list[Account | None] = [*ACCOUNTS, None]
    assert [a and a.id for a in visible_accounts(found, A)] == [1, None, None, None]
    assert visible_accounts(found, 0) == found


async def test_transfers_by_maker_or_by_the_accounts_the_processor_moved() -> None:
    service = _Accounts(ACCOUNTS)
    transfers: list[Transfer | None] = [
        _t(10, 1, 1, A),      # A's own
        _t(11, 2, 2, B),      # B's own
        _t(12, 3, 1, 0),      # the processor paid into A's account
        _t(13, 3, 2, 0),      # ... into B's
        _t(14, 3, 3, 0),      # between the processor's own accounts
        None,
    ]
    seen = await visible_transfers(service, transfers, A)  # type: ignore[arg-type]
    assert [t and t.id for t in seen] == [10, None, 12, None, None, None]
    assert service.calls == 1
    seen = await visible_transfers(service, transfers, B)  # type: ignore[arg-type]
    assert [t and t.id for t in seen] == [None, 11, None, 13, None, None]
    assert await visible_transfers(service, transfers, 0) == transfers  # type: ignore[arg-type]


async def test_no_lookup_when_no_transfer_is_the_processors() -> None:
    service = _Accounts(ACCOUNTS)
    await visible_transfers(service, [_t(1, 1, 1, A), _t(2, 2, 2, B)], A)  # type: ignore[arg-type]
    assert service.calls == 0
