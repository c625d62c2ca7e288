-- Audit events: operator and configuration actions (docs/security.md, "Audit events";
-- processor/audit.py). Where audit_requests (0012) says who sent each request that moved
-- money, an audit event says who changed how the processor runs: a signing key rotated or
-- retired, a token revoked, a client key or a webhook endpoint created or removed, dead
-- letters replayed, a payment step in review handed back.
--
-- The rows form one hash chain: digest = SHA-256(previous row's digest || the row's
-- canonical encoding), ids 1, 2, 3, ... without gaps. The writer (actors/ops/
-- audit_events.py) takes the last row and inserts the next under one advisory lock held
-- to its commit, so the chain is linear; `txproc verify` recomputes it.
CREATE TABLE audit_events (
    id             bigint      PRIMARY KEY CHECK (id > 0),
    -- The database's clock when the event was written.
    at             timestamptz NOT NULL,
    -- token: an API caller (its tenant, subject and token id); operator: a txproc command
    -- (subject is the operating-system user); service: the processor itself.
    actor_kind     text        NOT NULL CHECK (actor_kind IN ('token', 'operator', 'service')),
    actor_tenant   text        NOT NULL,
    actor_subject  text        NOT NULL CHECK (actor_subject <> ''),
    actor_token_id text        NOT NULL,
    -- The tenant the action concerns (processor.identity.tenant_slot), whose audit:read
    -- tokens see it; 0 for an action on the whole processor.
    tenant_slot    bigint      NOT NULL CHECK (tenant_slot >= 0),
    action         text        NOT NULL CHECK (action ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'),
    target_kind    text        NOT NULL,
    target_id      text        NOT NULL,
    -- What else the action was about; never a secret.
    details        jsonb       NOT NULL CHECK (jsonb_typeof(details) = 'object'),
    request_id     text        NOT NULL,
    digest         bytea       NOT NULL CHECK (octet_length(digest) = 32)
);
-- GET /v1/audit-events: one tenant's events, or one action's, after a cursor.
CREATE INDEX audit_events_tenant ON audit_events (tenant_slot, id);
CREATE INDEX audit_events_action ON audit_events (action, id);

-- Append-only like the ledger's rows (0011) and the audit records (0012).
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- The default privileges of 0015, less what would change history: the service appends
-- (webhook endpoints created and removed through the API) and reads (the API's listing).
REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM txproc_app;
