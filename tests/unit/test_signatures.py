"""Signed requests (RFC 9421): the pure signer and verifier, the edge's checks, the HTTP hook.

The pure module (processor/identity/signatures.py) is checked against a signature base
written out by hand here and an HMAC computed directly; then every refusal, one row per
rule; then the edge's checks over ASGI scopes (actors/edge/signatures.py) with an
in-memory nonce store; last the HTTP API over a fake ledger, on the Starlette routes and
on the single-transfer route served without the framework, signed by the httpx helper
(adapters/signing.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from actors.edge import RequestSignatures
from actors.edge.http_api import ACCEPT_SIGNATURE, OPENAPI, build_app
from adapters.signing import ClientKeyAuth
from processor.identity import (
    SIGNATURE_CODES,
    Claims,
    ClientKey,
    SignatureError,
    content_digest,
    issue_token,
    new_client_key,
    read_signature,
    require_content_digest,
    sign_request,
    verify_signature,
)
from tests.unit.test_http_api import (
    KEY,
    NOW_S,
    FakeLedger,
    account_json,
    assert_error,
    transfer_json,
)

URL = "https://ledger.test/v1/transfers"
BODY = b'{"id":10,"amount":500}'
AUTHORIZATION = "Bearer eyJ.token.here"
SECRET = bytes(range(100, 132))
CLIENT = ClientKey(key_id="ck_" + "ab" * 16, tenant="acme", subject="gateway-1", secret=SECRET)
KEYS = {CLIENT.key_id: CLIENT}
NONCE = "n0nce-0123456789abcdef"


def signed_fields(*, method: str = "POST", url: str = URL, body: bytes = BODY,
                  created_s: int = NOW_S, nonce: str = NONCE, secret: bytes = SECRET,
                  key_id: str = CLIENT.key_id) -> dict[str, str]:
    """The lower-cased header fields of a request signed with these values."""
    headers = {"Authorization": AUTHORIZATION}
    headers |= sign_request(method, url, headers, body, key_id=key_id, secret=secret,
                            created_s=created_s, nonce=nonce)
    return {name.lower(): value for name, value in headers.items()}


def verify(fields: dict[str, str], *, method: str = "POST", url: str = URL, body: bytes = BODY,
           now_s: float = NOW_S, tenant: str = "acme", subject: str = "gateway-1") -> ClientKey:
    """Every check the server makes, in its order (the nonce aside)."""
    key = verify_signature(read_signature(fields), method=method, target_uri=url,
                           fields=fields, keys=KEYS, tenant=tenant, subject=subject,
                           now_s=now_s)
    require_content_digest(fields.get("content-digest"), body)
    return key


# ---------------------------------------------------------------------------------------
# The pure module.


def test_signature_matches_a_hand_written_base_and_a_direct_hmac() -> None:
    """The Signature header is HMAC-SHA256 over the RFC 9421 base written out here by hand,
    and Content-Digest is the body's SHA-256 (RFC 9530), both computed without the module."""
    fields = signed_fields()
    digest = base64.b64encode(hashlib.sha256(BODY).digest()).decode()
    params = ('("@method" "@target-uri" "content-digest" "authorization")'
              f';created={NOW_S};keyid="{CLIENT.key_id}";nonce="{NONCE}";alg="hmac-sha256"')
    base = (
        '"@method": POST\n'
        f'"@target-uri": {URL}\n'
        f'"content-digest": sha-256=:{digest}:\n'
        f'"authorization": {AUTHORIZATION}\n'
        f'"@signature-params": {params}'
    )
    expected = base64.b64encode(hmac.new(SECRET, base.encode(), hashlib.sha256).digest())
    assert fields["content-digest"] == f"sha-256=:{digest}:"
    assert fields["signature-input"] == f"sig1={params}"
    assert fields["signature"] == f"sig1=:{expected.decode()}:"


def test_a_signature_made_by_hand_in_another_order_verifies() -> None:
    """A signer may cover the components in its own order, with spaces the structured
    fields allow and without alg: the verifier rebuilds the base in that order."""
    digest = content_digest(BODY)
    params = ('("authorization" "content-digest" "@target-uri" "@method")'
              f';keyid="{CLIENT.key_id}";nonce="{NONCE}";created={NOW_S}')
    base = (f'"authorization": {AUTHORIZATION}\n"content-digest": {digest}\n'
            f'"@target-uri": {URL}\n"@method": POST\n"@signature-params": {params}')
    value = base64.b64encode(hmac.new(SECRET, base.encode(), hashlib.sha256).digest()).decode()
    spaced_params = params.replace('("authorization" ', '(  "authorization"  ')
    fields = {"authorization": AUTHORIZATION, "content-digest": digest,
              "signature-input": f" lbl={spaced_params} ", "signature": f"lbl=:{value}:"}
    assert verify(fields) == CLIENT


def test_round_trip_and_the_window_edges() -> None:
    """A signed request verifies from 30 s after its created to 5 s before it."""
    fields = signed_fields()
    for now_s in (NOW_S, NOW_S + 30, NOW_S - 5):
        assert verify(fields, now_s=now_s) == CLIENT


def test_new_client_key_draws_id_and_secret_from_the_randomness_given() -> None:
    """Ids are ck_ + 32 hex digits and secrets 32 bytes, both from the injected source."""
    draws = iter([bytes(16), bytes(range(32))])
    key = new_client_key("acme", "gw", random_bytes=lambda n: next(draws))
    assert key.key_id == "ck_" + "00" * 16 and key.secret == bytes(range(32))
    assert "secret" not in repr(key) and repr(bytes(range(32))) not in repr(key)
    with pytest.raises(ValueError):
        new_client_key("acme", "gw", random_bytes=lambda n: b"short")


def _replace(name: str, old: str, new: str) -> Callable[[dict[str, str]], dict[str, str]]:
    def change(fields: dict[str, str]) -> dict[str, str]:
        assert old in fields[name], (name, old)
        return fields | {name: fields[name].replace(old, new)}
    return change


def _drop(name: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda fields: {k: v for k, v in fields.items() if k != name}


def _set(name: str, value: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda fields: fields | {name: value}


SIG_INPUT = "signature-input"
REFUSED = [
    # (what, change to the signed fields, code)
    ("no Signature-Input", _drop(SIG_INPUT), "signature_invalid"),
    ("no Signature", _drop("signature"), "signature_invalid"),
    ("not a structured field", _set(SIG_INPUT, "garbage"), "signature_invalid"),
    ("two signatures", lambda f: f | {SIG_INPUT: f[SIG_INPUT] + ", " + f[SIG_INPUT]},
     "signature_invalid"),
    ("labels differ", _replace("signature", "sig1=", "sig2="), "signature_invalid"),
    ("a component missing", _replace(SIG_INPUT, ' "authorization"', ""), "signature_invalid"),
    ("content-digest not covered", _replace(SIG_INPUT, ' "content-digest"', ""),
     "signature_invalid"),
    ("a component twice", _replace(SIG_INPUT, '"authorization"', '"@method"'),
     "signature_invalid"),
    ("another component", _replace(SIG_INPUT, '"authorization"', '"authorization" "date"'),
     "signature_invalid"),
    ("a component parameter", _replace(SIG_INPUT, '"content-digest"', '"content-digest";sf'),
     "signature_invalid"),
    ("components not separated", _replace(SIG_INPUT, '" "', '""'), "signature_invalid"),
    ("another parameter", _replace(SIG_INPUT, ";alg=", ";expires=1;alg="), "signature_invalid"),
    ("a parameter twice", _replace(SIG_INPUT, ";alg=", f";created={NOW_S};alg="),
     "signature_invalid"),
    ("a boolean parameter", _replace(SIG_INPUT, f"created={NOW_S}", "created"),
     "signature_invalid"),
    ("created a string", _replace(SIG_INPUT, f"created={NOW_S}", f'created="{NOW_S}"'),
     "signature_invalid"),
    ("created negative", _replace(SIG_INPUT, f"created={NOW_S}", "created=-1"),
     "signature_invalid"),
    ("created a decimal", _replace(SIG_INPUT, f"created={NOW_S}", f"created={NOW_S}.5"),
     "signature_invalid"),
    ("no created", _replace(SIG_INPUT, f"created={NOW_S};", ""), "signature_invalid"),
    ("no keyid", _replace(SIG_INPUT, f';keyid="{CLIENT.key_id}"', ""), "signature_invalid"),
    ("no nonce", _replace(SIG_INPUT, f';nonce="{NONCE}"', ""), "signature_invalid"),
    ("a short nonce", _replace(SIG_INPUT, NONCE, "abc"), "signature_invalid"),
    ("another algorithm", _replace(SIG_INPUT, "hmac-sha256", "hmac-sha512"),
     "signature_invalid"),
    ("signature not base64", _replace("signature", "sig1=:", "sig1=:*"), "signature_invalid"),
    ("signature with a parameter", lambda f: f | {"signature": f["signature"] + ";x=1"},
     "signature_invalid"),
    ("an over-long field", _set("signature", "sig1=:" + "A" * 4000 + ":"), "signature_invalid"),
    ("signature of another key",
     lambda f: f | {"signature": signed_fields(secret=bytes(32))["signature"]},
     "signature_invalid"),
    ("unknown keyid", lambda f: signed_fields(key_id="ck_" + "cd" * 16), "signature_invalid"),
    ("created changed", _replace(SIG_INPUT, f"created={NOW_S}", f"created={NOW_S - 1}"),
     "signature_invalid"),
    ("nonce changed", _replace(SIG_INPUT, NONCE, NONCE.upper()), "signature_invalid"),
    ("authorization changed", _set("authorization", AUTHORIZATION + "x"), "signature_invalid"),
    ("authorization not ASCII", _set("authorization", "Bearer é"), "signature_invalid"),
    ("no authorization", _drop("authorization"), "signature_invalid"),
    ("no content-digest", _drop("content-digest"), "signature_invalid"),
    ("content-digest of another body", _set("content-digest", content_digest(b"{}")),
     "signature_invalid"),
    ("created 31 s old", lambda f: signed_fields(created_s=NOW_S - 31), "signature_expired"),
    ("created 6 s ahead", lambda f: signed_fields(created_s=NOW_S + 6), "signature_expired"),
]


@pytest.mark.parametrize(("what", "change", "code"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals(what: str, change: Callable[[dict[str, str]], dict[str, str]],
                  code: str) -> None:
    """Each rule refuses a request that breaks it, and only that rule's code is given."""
    with pytest.raises(SignatureError) as caught:
        verify(change(signed_fields()))
    assert caught.value.code == code
    assert SECRET.hex() not in caught.value.message and NONCE not in caught.value.message


REQUEST_CHANGED = [
    ("the body", {"body": b'{"id":10,"amount":5000}'}),
    ("the method", {"method": "PUT"}),
    ("the URI", {"url": URL.replace("/v1/transfers", "/v1/accounts")}),
    ("the host", {"url": URL.replace("ledger.test", "other.test")}),
    ("another subject", {"subject": "gateway-2"}),
    ("another tenant", {"tenant": "globex"}),
]


@pytest.mark.parametrize(("what", "change"), REQUEST_CHANGED, ids=[r[0] for r in REQUEST_CHANGED])
def test_a_signature_binds_request_and_principal(what: str, change: dict[str, object]) -> None:
    """The same signature over another body, method, URI or host, or sent with the token of
    another principal than the key's, is signature_invalid."""
    with pytest.raises(SignatureError) as caught:
        verify(signed_fields(), **change)  # type: ignore[arg-type]
    assert caught.value.code == "signature_invalid"


def test_content_digest_refuses_other_shapes() -> None:
    """Content-Digest holds exactly one sha-256 digest of the body; sha-512, two digests
    or parameters are refused."""
    good = content_digest(BODY)
    require_content_digest(good, BODY)
    sha512 = base64.b64encode(hashlib.sha512(BODY).digest()).decode()
    for field in (f"sha-512=:{sha512}:", f"{good}, sha-512=:{sha512}:", f"{good};x=1",
                  good.replace("sha-256=", "sha-256"), None):
        with pytest.raises(SignatureError):
            require_content_digest(field, BODY)


def test_sign_request_refuses_what_it_cannot_send() -> None:
    """The signer needs the Authorization it covers, an absolute URL and a usable nonce."""
    kwargs: dict[str, Any] = {"key_id": CLIENT.key_id, "secret": SECRET, "created_s": NOW_S,
                              "nonce": NONCE}
    with pytest.raises(ValueError):
        sign_request("POST", URL, {}, BODY, **kwargs)
    with pytest.raises(ValueError):
        sign_request("POST", "/v1/transfers", {"authorization": "x"}, BODY, **kwargs)
    with pytest.raises(ValueError):
        sign_request("POST", URL, {"authorization": "x"}, BODY,
                     **(kwargs | {"nonce": "short"}))


# ---------------------------------------------------------------------------------------
# The edge's checks over ASGI scopes.


class MemoryNonces:
    """The nonce store's contract in memory: a nonce of a key is new once."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    async def claim(self, key_id: str, nonce: str) -> bool:
        if (key_id, nonce) in self.seen:
            return False
        self.seen.add((key_id, nonce))
        return True


CLAIMS = Claims(subject="gateway-1", tenant="acme", scopes=frozenset({"transfers:write"}),
                expires_at_s=NOW_S + 900)


def scope_of(fields: dict[str, str], *, path: bytes = b"/v1/transfers",
             query: bytes = b"") -> dict[str, object]:
    headers = [(b"host", b"ledger.test")]
    headers += [(name.encode(), value.encode()) for name, value in fields.items()]
    return {"type": "http", "method": "POST", "scheme": "https", "path": path.decode(),
            "raw_path": path, "query_string": query, "headers": headers}


def signatures(*, required: bool) -> RequestSignatures:
    return RequestSignatures(required=required, nonces=MemoryNonces(),
                             clock_s=lambda: float(NOW_S), keys=KEYS)


async def test_edge_checks_unsigned_signed_and_replayed() -> None:
    """Unsigned passes unless signatures are required (signature_required); a signed
    request is admitted once, and its copy is request_replayed."""
    unsigned = scope_of({"authorization": AUTHORIZATION})
    assert signatures(required=False).check(CLAIMS, unsigned) is None
    with pytest.raises(SignatureError) as caught:
        signatures(required=True).check(CLAIMS, unsigned)
    assert caught.value.code == "signature_required"
    checks = signatures(required=True)
    signed = scope_of(signed_fields())
    verified = checks.check(CLAIMS, signed)
    assert verified is not None
    await checks.admit(verified, BODY)
    again = checks.check(CLAIMS, signed)
    assert again is not None
    with pytest.raises(SignatureError) as caught:
        await checks.admit(again, BODY)
    assert caught.value.code == "request_replayed"


async def test_edge_checks_a_signature_even_when_not_required() -> None:
    """Without the requirement a present signature is still checked: half a signature,
    another body or no nonce store (no key known) is refused."""
    half = scope_of(_drop("signature")(signed_fields()))
    with pytest.raises(SignatureError):
        signatures(required=False).check(CLAIMS, half)
    checks = signatures(required=False)
    verified = checks.check(CLAIMS, scope_of(signed_fields()))
    assert verified is not None
    with pytest.raises(SignatureError):
        await checks.admit(verified, BODY + b" ")
    with pytest.raises(SignatureError):
        RequestSignatures(required=False, nonces=None).check(CLAIMS, scope_of(signed_fields()))
    with pytest.raises(ValueError):
        RequestSignatures(required=False, nonces=None, keys=KEYS)


def test_edge_target_uri_is_the_raw_path_and_query() -> None:
    """@target-uri is scheme, Host, and the path and query as sent (percent-escapes kept);
    a raw_path that carries the query (as some test transports leave it) counts once."""
    url = URL.replace("/v1/transfers", "/v1/a%2Fb?x=1")
    fields = signed_fields(url=url)
    checks = signatures(required=True)
    assert checks.check(CLAIMS, scope_of(fields, path=b"/v1/a%2Fb", query=b"x=1"))
    assert checks.check(CLAIMS, scope_of(fields, path=b"/v1/a%2Fb?x=1", query=b"x=1"))
    with pytest.raises(SignatureError):
        checks.check(CLAIMS, scope_of(fields, path=b"/v1/a/b", query=b"x=1"))


# ---------------------------------------------------------------------------------------
# The HTTP API: the hook on the Starlette routes and on the single-transfer route.

HTTP_CLIENT = ClientKey(key_id="ck_" + "12" * 16, tenant="default", subject="local",
                        secret=SECRET)
HTTP_TOKEN = issue_token(KEY, ["accounts:write", "transfers:write", "accounts:read"],
                         ttl_s=3600, now_s=NOW_S)


def http_client(*, required: bool, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
    checks = RequestSignatures(required=required, nonces=MemoryNonces(),
                               clock_s=lambda: float(NOW_S), keys={HTTP_CLIENT.key_id: HTTP_CLIENT})
    ledger = FakeLedger()
    app = build_app(ledger, KEY, clock_s=lambda: float(NOW_S), ready=ledger.is_ready,
                    signatures=checks)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), auth=auth,
                             base_url="http://ledger.test",
                             headers={"Authorization": f"Bearer {HTTP_TOKEN}"})


def client_auth(nonce: str = NONCE, created_s: int = NOW_S) -> ClientKeyAuth:
    return ClientKeyAuth(HTTP_CLIENT.key_id, HTTP_CLIENT.secret, clock_s=lambda: created_s,
                         nonce=lambda: nonce)


@pytest.mark.parametrize("path", ["/v1/accounts", "/v1/transfers"])
async def test_http_hook_on_both_paths(path: str) -> None:
    """On a Starlette route and on the route served without it: unsigned is 401
    signature_required (with Accept-Signature), signed is served, the copy of a signed
    request is request_replayed, and a body changed after signing signature_invalid."""
    body = account_json(7) if path == "/v1/accounts" else transfer_json(
        11, debit_account_id=1, credit_account_id=2)
    async with http_client(required=True) as http:
        if path == "/v1/transfers":
            for account_id in (1, 2):  # signed too: the requirement covers accounts
                answer = await http.post("/v1/accounts", json=account_json(account_id),
                                         auth=client_auth(nonce=f"setup-nonce-{account_id:08}"))
                assert answer.status_code == 201, answer.text
        unsigned = await http.post(path, json=body)
        assert_error(unsigned, 401, "signature_required")
        assert unsigned.headers["accept-signature"] == ACCEPT_SIGNATURE
        assert unsigned.headers["www-authenticate"] == "Bearer"
        first = await http.post(path, json=body, auth=client_auth())
        assert first.status_code == 201, first.text
        assert_error(await http.post(path, json=body, auth=client_auth()), 401,
                     "request_replayed")
        request = http.build_request("POST", path, json=body)
        signed = next(client_auth(nonce="another-nonce-0123").auth_flow(request))
        assert b'"EUR"' in signed.content
        tampered = http.build_request("POST", path,
                                      content=signed.content.replace(b'"EUR"', b'"USD"'),
                                      headers=signed.headers)
        assert_error(await http.send(tampered), 401, "signature_invalid")


async def test_http_hook_when_not_required() -> None:
    """Without the requirement an unsigned request is served as before, a signed one is
    checked (31 s old: signature_expired), and GETs are never asked for a signature."""
    async with http_client(required=False) as http:
        assert (await http.post("/v1/accounts", json=account_json(3))).status_code == 201
        assert_error(await http.post("/v1/accounts", json=account_json(4),
                                     auth=client_auth(created_s=NOW_S - 31)),
                     401, "signature_expired")
        assert (await http.get("/v1/accounts/3")).status_code == 200


async def test_an_app_without_checks_refuses_signed_requests() -> None:
    """build_app without a front's checks knows no client key: a signature is refused
    rather than passed unchecked; unsigned requests are served."""
    ledger = FakeLedger()
    app = build_app(ledger, KEY, clock_s=lambda: float(NOW_S), ready=ledger.is_ready)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://ledger.test",
                                 headers={"Authorization": f"Bearer {HTTP_TOKEN}"}) as http:
        assert (await http.post("/v1/accounts", json=account_json(5))).status_code == 201
        assert_error(await http.post("/v1/accounts", json=account_json(6), auth=client_auth()),
                     401, "signature_invalid")


def test_openapi_documents_the_codes_on_every_state_changing_route() -> None:
    """Every POST and DELETE route with a token lists the signature codes under 401; no
    GET and not the provider webhook lists them."""
    for path, methods in OPENAPI["paths"].items():
        for method, operation in methods.items():
            unauthorized = operation["responses"].get("401", {})
            codes = set(unauthorized.get("x-error-codes", []))
            signed = method in ("post", "delete") and bool(operation["security"])
            assert (set(SIGNATURE_CODES) <= codes) == signed, (method, path)


def test_client_key_auth_reads_the_cli_output_and_refuses_other_text() -> None:
    """ClientKeyAuth.from_json takes create-client's JSON and refuses anything else."""
    text = json.dumps({"key_id": CLIENT.key_id, "secret": base64.b64encode(SECRET).decode(),
                       "tenant": "acme", "subject": "gateway-1"})
    assert repr(ClientKeyAuth.from_json(text)) == f"ClientKeyAuth(key_id={CLIENT.key_id!r})"
    for bad in ("{}", "[]", "not json", json.dumps({"key_id": "k", "secret": "***"}),
                json.dumps({"key_id": "k", "secret": base64.b64encode(b"x").decode()})):
        with pytest.raises(ValueError):
            ClientKeyAuth.from_json(bad)

