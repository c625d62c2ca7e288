"""What a caller's tenant may see of the ledger, for the HTTP and RPC edges.

Writes need nothing here: the edge stamps each account and transfer with the caller's
tenant slot (``Claims.tenant_slot``), and the ledger's rules refuse another tenant's
accounts and holds (docs/security.md, "Tenants"). Reads are answered from PostgreSQL by id,
so the edge drops what the caller's tenant does not own before answering, exactly as if the
id were unknown:

* an account is visible to its own tenant;
* a transfer is visible to the tenant that made it, and a transfer the processor made
  (tenant 0: a payment's posting, a payout's hold) to the tenant owning either of its
  accounts, which it moved money in or out of;
* the processor's own token (``ledger:system``) sees everything.
"""

from __future__ import annotations

from processor.identity import PROCESSOR_TENANT
from processor.service import LedgerService
from processor.types import Account, Transfer

__all__ = ["visible_accounts", "visible_transfers"]


def visible_accounts(accounts: list[Account | None], tenant: int) -> list[Account | None]:
    """``accounts`` with those of other tenants replaced by None."""
    if tenant == PROCESSOR_TENANT:
        return accounts
    return [a if a is not None and a.tenant == tenant else None for a in accounts]


async def visible_transfers(
    service: LedgerService, transfers: list[Transfer | None], tenant: int
) -> list[Transfer | None]:
    """``transfers`` with those ``tenant`` may not see replaced by None; the accounts of the
    processor's own transfers are looked up (one call for all of them) to decide."""
    if tenant == PROCESSOR_TENANT:
        return transfers
    theirs = [t for t in transfers if t is not None and t.tenant == PROCESSOR_TENANT]
    owners: dict[int, int] = {}
    if theirs:
        ids = sorted({i for t in theirs for i in (t.debit_account_id, t.credit_account_id)})
        found = await service.lookup_accounts(ids)
        owners = {a.id: a.tenant for a in found if a is not None}

    def visible(t: Transfer | None) -> bool:
        if t is None:
            return False
        if t.tenant == tenant:
            return True
        return t.tenant == PROCESSOR_TENANT and tenant in (
            owners.get(t.debit_account_id), owners.get(t.credit_account_id))

    return [t if visible(t) else None for t in transfers]
