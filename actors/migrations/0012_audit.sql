-- Who made each change (docs/security.md, "Audit"). Every state-changing request a front
-- accepts writes one audit record before anything of it is applied; the rows it creates
-- (accounts, transfers) carry the record's id in ``origin``. Written with
-- synchronous_commit off: the record's commit precedes, in the WAL, the commit of any row
-- that names it, so whenever such a row is durable its record is too (on one server).
-- Rows written before audit records existed carry origin 0.

CREATE TABLE audit_requests (
    id          bigint      PRIMARY KEY CHECK (id > 0),
    tenant      bigint      NOT NULL,  -- the tenant's slot (processor.identity.tenant_slot)
    tenant_name text        NOT NULL,
    subject     text        NOT NULL,
    token_id    text        NOT NULL,  -- the token's jti
    request_id  text        NOT NULL,  -- X-Request-Id, or the RPC connection and request id
    operation   text        NOT NULL,  -- e.g. create_transfers, payments.authorize
    items       integer     NOT NULL,
    at          timestamptz NOT NULL
);
CREATE INDEX audit_requests_tenant_at ON audit_requests (tenant, at);

-- Append-only like the ledger's rows (migration 0011).
CREATE TRIGGER audit_requests_append_only BEFORE UPDATE OR DELETE ON audit_requests
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER audit_requests_no_truncate BEFORE TRUNCATE ON audit_requests
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

ALTER TABLE accounts ADD COLUMN origin bigint NOT NULL DEFAULT 0;
ALTER TABLE transfers ADD COLUMN origin bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW account_balances AS
SELECT a.id, a.currency, a.flags, a.code, a.user_data,
       a.debits_pending + coalesce(r.debits_pending, 0) + coalesce(u.debits_pending, 0)
           AS debits_pending,
       a.debits_posted + coalesce(r.debits_posted, 0) + coalesce(u.debits_posted, 0)
           AS debits_posted,
       a.credits_pending + coalesce(r.credits_pending, 0) + coalesce(u.credits_pending, 0)
           AS credits_pending,
       a.credits_posted + coalesce(r.credits_posted, 0) + coalesce(u.credits_posted, 0)
           AS credits_posted,
       a."timestamp", a.partition, a.tenant, a.origin
FROM accounts a
LEFT JOIN (
    SELECT p.account_id,
           sum(p.debits_pending)::bigint  AS debits_pending,
           sum(p.debits_posted)::bigint   AS debits_posted,
           sum(p.credits_pending)::bigint AS credits_pending,
           sum(p.credits_posted)::bigint  AS credits_posted
    FROM remote_postings_unfolded p
    GROUP BY p.account_id
) r ON r.account_id = a.id
LEFT JOIN (
    SELECT l.account_id,
           sum(l.debits_pending)::bigint  AS debits_pending,
           sum(l.debits_posted)::bigint   AS debits_posted,
           sum(l.credits_pending)::bigint AS credits_pending,
           sum(l.credits_posted)::bigint  AS credits_posted
    FROM unfolded_legs((SELECT array_agg(partition) FROM partition_checkpoints),
                       9223372036854775807) l
    GROUP BY l.account_id
) u ON u.account_id = a.id;

-- Payment steps name the request that started them, like accounts and transfers.
ALTER TABLE payment_steps ADD COLUMN origin bigint NOT NULL DEFAULT 0;
