-- Every account and transfer belongs to a tenant (docs/security.md, "Tenants"): the slot
-- processor.identity.tenant_slot gives the tenant's name, 0 for the processor's own.
-- Rows written before tenants existed belong to the tenant named "default"
-- (538834666855030335), except the processor's own range (ids from 2^62: clearing
-- accounts and the postings of payment steps), which is the processor's.
-- No default is kept: every later insert names its tenant.

ALTER TABLE accounts ADD COLUMN tenant bigint NOT NULL DEFAULT 538834666855030335;
UPDATE accounts SET tenant = 0 WHERE id >= 4611686018427387904;
ALTER TABLE accounts ALTER COLUMN tenant DROP DEFAULT;

ALTER TABLE transfers ADD COLUMN tenant bigint NOT NULL DEFAULT 538834666855030335;
UPDATE transfers SET tenant = 0 WHERE id >= 4611686018427387904;
ALTER TABLE transfers ALTER COLUMN tenant DROP DEFAULT;

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
       a."timestamp", a.partition, a.tenant
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
