"""``/v1/webhook_endpoints`` over real HTTP against the session's processor, with a real
HTTP receiver on 127.0.0.1 taking the outbox relay's deliveries: a tenant's endpoint gets
its own tenant's events only, of the types it named, signed with its own secret; another
tenant can neither see nor remove it; bad input is a 4xx with a code; and the
``txproc webhooks`` command works on the same endpoints."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest

from actors.app.runtime import Processor
from actors.database import database_url_with_name
from actors.payments import outbox
from processor.client import Client
from tests.payments_support import authorize, card_token, key, merchant
from tests.receiver import Receiver, receiving
from tests.running import IdSource, token_for

SCOPES = ("payments:write", "payments:read", "webhooks:read", "webhooks:write")


def _http(processor: Processor, tenant: str, scopes: tuple[str, ...] = SCOPES
          ) -> httpx.AsyncClient:
    token = token_for(processor, scopes, tenant=tenant, subject="ops")
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{processor.http_port}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _tenant(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _secret(endpoint: dict[str, str]) -> bytes:
    text = endpoint["secret"]
    assert text.startswith("whsec_")
    return base64.b64decode(text.removeprefix("whsec_"))


async def _create(http: httpx.AsyncClient, body: dict[str, object],
                  idem: str | None = None) -> httpx.Response:
    return await http.post("/v1/webhook_endpoints", json=body,
                           headers={"idempotency-key": idem or key()})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as r:
        yield r


async def _merchant_of(processor: Processor, ids: IdSource, tenant: str) -> int:
    async with Client("127.0.0.1", processor.rpc_port,
                      token_for(processor, tenant=tenant, subject="m")) as client:
        return await merchant(client, ids)


async def test_an_endpoint_gets_its_tenants_events_of_its_types_signed_with_its_secret(
        processor: Processor, ids: IdSource, receiver: Receiver) -> None:
    """Tenant A's endpoint for payment.authorized receives A's authorizations and nothing
    else (no processing event, no event of tenant B), signed with its own secret; A's
    endpoint for every type receives A's processing and authorized events; B's endpoint
    receives B's only."""
    a, b = _tenant("hooks-a"), _tenant("hooks-b")
    async with _http(processor, a) as alpha, _http(processor, b) as beta:
        only = await _create(alpha, {"url": receiver.url("/a-authorized"),
                                     "events": ["payment.authorized"]})
        every = await _create(alpha, {"url": receiver.url("/a-all")})
        other = await _create(beta, {"url": receiver.url("/b-all"), "events": None})
        for r in (only, every, other):
            assert r.status_code == 201, r.text
        assert only.json()["events"] == ["payment.authorized"] and every.json()["events"] == []
        a_merchant = await _merchant_of(processor, ids, a)
        b_merchant = await _merchant_of(processor, ids, b)
        paid = await authorize(alpha, a_merchant, token=card_token())
        theirs = await authorize(beta, b_merchant, token=card_token())
        assert (paid.status_code, theirs.status_code) == (201, 201), (paid.text, theirs.text)
        payment, other_payment = paid.json()["id"], theirs.json()["id"]

        got = await receiver.wait_for("/a-authorized", 1)
        everything = await receiver.wait_for("/a-all", 2)
        b_got = await receiver.wait_for("/b-all", 2)

    envelopes = [json.loads(d.body) for d in got]
    assert [(e["type"], e["aggregate_id"]) for e in envelopes] == [
        ("payment.authorized", payment)]
    assert envelopes[0]["data"]["id"] == payment
    assert "payment_method" not in envelopes[0]["data"]
    assert {(json.loads(d.body)["type"], json.loads(d.body)["aggregate_id"])
            for d in everything} == {("payment.processing", payment),
                                     ("payment.authorized", payment)}
    assert {json.loads(d.body)["aggregate_id"] for d in b_got} == {other_payment}
    # Each endpoint's deliveries verify with its own secret and with no other key.
    now_s = time.time()
    for deliveries, endpoint in ((got, only), (everything, every), (b_got, other)):
        for d in deliveries:
            assert outbox.verify(_secret(endpoint.json()), d.headers, d.body, now_s=now_s)
            for stranger in (only, every, other):
                if stranger is not endpoint:
                    assert not outbox.verify(_secret(stranger.json()), d.headers, d.body,
                                             now_s=now_s)
            assert d.headers[outbox.HEADER_EVENT_TYPE] == json.loads(d.body)["type"]


async def test_secret_shown_once_listed_and_read_without_it_then_removed(
        processor: Processor, ids: IdSource, receiver: Receiver) -> None:
    """The secret is in the creation's answer (and its replay under the same key) only;
    GET and the list show the endpoint without it; after DELETE the endpoint is gone from
    both, and its tenant's next event is not sent to it."""
    tenant = _tenant("hooks-c")
    async with _http(processor, tenant) as http:
        idem = key()
        created = await _create(http, {"url": receiver.url("/c")}, idem)
        assert created.status_code == 201, created.text
        endpoint = created.json()
        assert endpoint["id"].startswith("we_") and "secret" in endpoint
        replay = await _create(http, {"url": receiver.url("/c")}, idem)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.json() == endpoint
        second = await _create(http, {"url": receiver.url("/c2")})
        read = await http.get(f"/v1/webhook_endpoints/{endpoint['id']}")
        assert read.status_code == 200
        assert read.json() == {k: v for k, v in endpoint.items() if k != "secret"}
        listed = (await http.get("/v1/webhook_endpoints")).json()
        assert listed["next_cursor"] is None
        assert [e["id"] for e in listed["data"]] == [second.json()["id"], endpoint["id"]]
        assert all("secret" not in e for e in listed["data"])
        page = (await http.get("/v1/webhook_endpoints", params={"limit": 1})).json()
        assert [e["id"] for e in page["data"]] == [second.json()["id"]]
        rest = (await http.get("/v1/webhook_endpoints",
                               params={"limit": 1, "cursor": page["next_cursor"]})).json()
        assert [e["id"] for e in rest["data"]] == [endpoint["id"]]
        assert rest["next_cursor"] is None

        removed = await http.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
        assert removed.status_code == 200 and removed.json()["id"] == endpoint["id"]
        again = await http.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
        assert (again.status_code, again.json()["error"]["code"]) == (
            404, "webhook_endpoint_not_found")
        gone = await http.get(f"/v1/webhook_endpoints/{endpoint['id']}")
        assert gone.status_code == 404
        assert [e["id"] for e in (await http.get("/v1/webhook_endpoints")).json()["data"]] == [
            second.json()["id"]]
        paid = await authorize(http, await _merchant_of(processor, ids, tenant))
        assert paid.status_code == 201, paid.text
        assert len(await receiver.wait_for("/c2", 2)) == 2
    assert receiver.at("/c") == []


async def test_another_tenant_can_neither_see_nor_remove_an_endpoint(
        processor: Processor, receiver: Receiver) -> None:
    """Tenant E's endpoint answers tenant F exactly as an unknown id does, on GET and on
    DELETE, never shows in F's list, and F's DELETE leaves it working."""
    e, f = _tenant("hooks-e"), _tenant("hooks-f")
    async with _http(processor, e) as owner, _http(processor, f) as stranger:
        endpoint = (await _create(owner, {"url": receiver.url("/e")})).json()
        unknown = "we_" + "0" * 24
        for path in (f"/v1/webhook_endpoints/{endpoint['id']}",
                     f"/v1/webhook_endpoints/{unknown}"):
            for method in ("GET", "DELETE"):
                r = await stranger.request(method, path)
                assert (r.status_code, r.json()["error"]["code"]) == (
                    404, "webhook_endpoint_not_found"), (method, path)
        assert (await stranger.get("/v1/webhook_endpoints")).json() == {
            "data": [], "next_cursor": None}
        assert (await owner.get(f"/v1/webhook_endpoints/{endpoint['id']}")).status_code == 200


@pytest.mark.parametrize(("body", "code"), [
    ({"url": "ftp://example.com/hook"}, "webhook_url_invalid"),
    ({"url": "example.com/hook"}, "webhook_url_invalid"),
    ({"url": "http://user:pass@example.com/hook"}, "webhook_url_invalid"),
    ({"url": "https://token@example.com/hook"}, "webhook_url_invalid"),
    ({"url": "https://example.com/" + "a" * 2029}, "webhook_url_invalid"),
    ({"url": ""}, "invalid_body"),
    ({"url": "https://example.com/a b"}, "webhook_url_invalid"),
    ({"url": "https://example.com/hook#part"}, "webhook_url_invalid"),
    ({"url": "https://example.com:99999/hook"}, "webhook_url_invalid"),
    ({"url": "https:///hook"}, "webhook_url_invalid"),
    ({"url": "https://example.com/hook", "events": ["payment.exploded"]},
     "webhook_event_type_unknown"),
    ({"url": "https://example.com/hook", "events": []}, "invalid_body"),
    ({"url": "https://example.com/hook", "secret": "mine"}, "invalid_body"),
    ({"events": ["payment.captured"]}, "invalid_body"),
])
async def test_a_bad_endpoint_is_refused_with_its_code(
        processor: Processor, body: dict[str, object], code: str) -> None:
    """Each rule of an endpoint, broken, is a 400 with the rule's code; nothing is made."""
    tenant = _tenant("hooks-bad")
    async with _http(processor, tenant) as http:
        r = await _create(http, body)
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), r.text
        assert (await http.get("/v1/webhook_endpoints")).json()["data"] == []


async def test_keys_scopes_ids_and_the_limit_are_enforced(processor: Processor) -> None:
    """No Idempotency-Key is 400, a token without the webhooks scopes is 403, an id of
    another shape 404, a bad list query 400, and the tenant's 17th endpoint 422."""
    tenant = _tenant("hooks-limits")
    async with _http(processor, tenant) as http, \
            _http(processor, tenant, ("payments:read",)) as reader:
        r = await http.post("/v1/webhook_endpoints", json={"url": "https://example.com/h"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "idempotency_key_missing")
        r = await reader.post("/v1/webhook_endpoints", json={"url": "https://example.com/h"},
                              headers={"idempotency-key": key()})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "scope_missing")
        for method in ("GET", "DELETE"):
            r = await reader.request(method, "/v1/webhook_endpoints/we_" + "1" * 24)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "scope_missing")
        r = await http.get("/v1/webhook_endpoints/not-an-id")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "webhook_endpoint_not_found")
        for params, code in (({"limit": "0"}, "invalid_query"), ({"limit": "101"},
                             "invalid_query"), ({"status": "paid"}, "invalid_query"),
                             ({"cursor": "nonsense"}, "invalid_cursor")):
            r = await http.get("/v1/webhook_endpoints", params=params)
            assert (r.status_code, r.json()["error"]["code"]) == (400, code), params
        for i in range(16):
            r = await _create(http, {"url": f"https://example.com/h{i}"})
            assert r.status_code == 201, r.text
        idem = key()
        r = await _create(http, {"url": "https://example.com/h16"}, idem)
        assert (r.status_code, r.json()["error"]["code"]) == (
            422, "webhook_endpoint_limit_reached")
        # Refused for a moment, not for good: after a removal the same request succeeds.
        first = (await http.get("/v1/webhook_endpoints", params={"limit": 1})).json()["data"]
        assert (await http.delete(f"/v1/webhook_endpoints/{first[0]['id']}")).status_code == 200
        r = await _create(http, {"url": "https://example.com/h16"}, idem)
        assert r.status_code == 201, r.text
        for endpoint in (await http.get("/v1/webhook_endpoints",
                                        params={"limit": 100})).json()["data"]:
            await http.delete(f"/v1/webhook_endpoints/{endpoint['id']}")


def _txproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors.app.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


async def test_the_command_line_adds_lists_and_removes_what_the_api_sees(
        processor: Processor, ids: IdSource, receiver: Receiver, pg_admin_url: str) -> None:
    """``txproc webhooks add`` makes an endpoint the tenant sees over the API and that
    receives the tenant's events signed with the secret it printed; ``list`` shows it;
    ``remove`` takes it away (404 over the API), and a second remove is exit code 1."""
    tenant = _tenant("hooks-cli")
    # The operator's URL to the processor's database, as an operator runs the command: the
    # service role's password in the processor's URL is the one its data directory held,
    # and a processor started later in the session (another data directory) sets another.
    url = database_url_with_name(
        pg_admin_url, urlsplit(processor.config.shard.database_url).path.lstrip("/"))
    added = _txproc("webhooks", "add", "--tenant", tenant, "--url", receiver.url("/cli"),
                    "--events", "payment.authorized,payment.captured", "--database-url", url)
    assert added.returncode == 0, added.stderr
    endpoint = json.loads(added.stdout)
    assert endpoint["events"] == ["payment.authorized", "payment.captured"]
    listed = _txproc("webhooks", "list", "--tenant", tenant, "--database-url", url)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [endpoint["id"]]
    assert "secret" not in listed.stdout
    refused = _txproc("webhooks", "add", "--tenant", tenant, "--url", "http://u:p@example.com",
                      "--database-url", url)
    assert refused.returncode == 2 and "credentials" in refused.stderr
    async with _http(processor, tenant) as http:
        seen = await http.get(f"/v1/webhook_endpoints/{endpoint['id']}")
        assert seen.status_code == 200 and seen.json()["url"] == receiver.url("/cli")
        paid = await authorize(http, await _merchant_of(processor, ids, tenant), capture=True)
        assert paid.status_code == 201, paid.text
        got = await receiver.wait_for("/cli", 2)
        assert sorted(json.loads(d.body)["type"] for d in got) == [
            "payment.authorized", "payment.captured"]
        assert all(outbox.verify(_secret(endpoint), d.headers, d.body, now_s=time.time())
                   for d in got)
        removed = _txproc("webhooks", "remove", endpoint["id"], "--database-url", url)
        assert removed.returncode == 0, removed.stderr
        assert (await http.get(f"/v1/webhook_endpoints/{endpoint['id']}")).status_code == 404
    again = _txproc("webhooks", "remove", endpoint["id"], "--database-url", url)
    assert again.returncode == 1 and "no webhook endpoint" in again.stderr
