"""U+0000 in ``user_data`` never reaches PostgreSQL (whose text cannot hold it): refused as
a bad field on every path, and the shard that would have failed its group commit on it
keeps serving everyone else."""

from __future__ import annotations

import httpx
import pytest

from actors.app.runtime import Processor
from processor.batch import BatchInvalid, TransferBatch
from processor.client import Client, ClientError
from processor.codes import AccountResult
from processor.types import Account
from tests.running import IdSource, token_for

NUL = "before\x00after"


def test_a_columnar_batch_with_nul_is_invalid() -> None:
    with pytest.raises(BatchInvalid, match="U\\+0000"):
        TransferBatch.from_arrays(id=[1], debit_account_id=[2], credit_account_id=[3],
                                  amount=[4], currency="EUR", user_data=[NUL])


async def test_rpc_and_http_refuse_nul_and_the_shard_serves_on(
        processor: Processor, client: Client, ids: IdSource) -> None:
    bad, good, after = ids.take(3)
    # RPC: the request does not decode, so it is refused before any shard sees it.
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as sender:
        with pytest.raises(ClientError) as refused:
            await sender.create_accounts([Account(id=bad, currency="EUR", user_data=NUL)])
        # Before any shard: a shard that took it would have failed and answered unavailable.
        assert refused.value.code == "malformed_frame"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                                 headers={"Authorization": f"Bearer {token_for(processor)}"},
                                 timeout=30) as http:
        r = await http.post("/v1/accounts", json={"id": good, "currency": "EUR",
                                                  "user_data": NUL})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body")
    # Nothing was stored, and the shards take the next request at once.
    assert await client.lookup_accounts([bad, good]) == [None, None]
    assert await client.create_accounts([Account(id=after, currency="EUR")]) == [
        AccountResult.ok]
