-- Signed requests (RFC 9421; docs/security.md, "Signed requests"). A client key is an
-- HMAC-SHA256 secret that one principal (tenant and subject) signs its HTTP requests with;
-- written by `txproc keys create-client`, revoked by `txproc keys revoke-client`. Every
-- front reads the keys not revoked twice a second. The secret is stored as it is: a
-- verifier of an HMAC needs the key itself (the database is inside the trust boundary,
-- as the token keys' directory is).

CREATE TABLE client_keys (
    key_id      text        PRIMARY KEY CHECK (key_id ~ '^ck_[0-9a-f]{32}$'),
    tenant      text        NOT NULL,
    tenant_slot bigint      NOT NULL,  -- processor.identity.tenant_slot(tenant)
    subject     text        NOT NULL,
    secret      bytea       NOT NULL CHECK (octet_length(secret) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);
CREATE INDEX client_keys_principal ON client_keys (tenant, subject);

-- Nonces of signed requests already accepted: a request whose (key, nonce) is here is a
-- replay. Every front inserts with ON CONFLICT DO NOTHING, so two fronts on one database
-- agree on which of two copies came first. A row is kept NONCE_KEEP_S (120 s,
-- actors/edge/signatures.py), longer than any signature is accepted (30 s old to 5 s
-- ahead) plus clock skew between the fronts, then pruned; an older copy is refused by its
-- `created` alone. No foreign key: the insert is on the request's path, and a nonce of a
-- key revoked since is harmless.
CREATE TABLE request_nonces (
    key_id  text        NOT NULL,
    nonce   text        NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX request_nonces_seen_at ON request_nonces (seen_at);
