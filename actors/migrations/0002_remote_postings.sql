-- Balance rows are updated only by the shard that owns them. A coordinator writes the legs
-- it commits for accounts of other shards here, append-only, in the same transaction as the
-- transfer; the owning shard folds them into its rows in its own commits. An account's
-- committed balance is its row plus its unfolded postings.
CREATE TABLE remote_postings (
    seq             bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      bigint  NOT NULL,
    partition       integer NOT NULL,
    debits_pending  bigint  NOT NULL,
    debits_posted   bigint  NOT NULL,
    credits_pending bigint  NOT NULL,
    credits_posted  bigint  NOT NULL
);
CREATE INDEX remote_postings_partition ON remote_postings (partition);

-- Every commit rewrites balance columns of the accounts it touches; free space on each page
-- lets PostgreSQL keep those updates on the page (HOT) instead of growing both indexes.
ALTER TABLE accounts SET (fillfactor = 50);
ALTER TABLE accounts SET (autovacuum_vacuum_scale_factor = 0.01,
                          autovacuum_vacuum_cost_delay = 0);
CREATE INDEX remote_postings_account ON remote_postings (account_id);

-- What readers see: each account with its committed balances, unfolded postings included.
CREATE VIEW account_balances AS
SELECT a.id, a.currency, a.flags, a.code, a.user_data,
       a.debits_pending + coalesce(r.debits_pending, 0)   AS debits_pending,
       a.debits_posted + coalesce(r.debits_posted, 0)     AS debits_posted,
       a.credits_pending + coalesce(r.credits_pending, 0) AS credits_pending,
       a.credits_posted + coalesce(r.credits_posted, 0)   AS credits_posted,
       a."timestamp", a.partition
FROM accounts a
LEFT JOIN LATERAL (
    SELECT sum(p.debits_pending)::bigint  AS debits_pending,
           sum(p.debits_posted)::bigint   AS debits_posted,
           sum(p.credits_pending)::bigint AS credits_pending,
           sum(p.credits_posted)::bigint  AS credits_posted
    FROM remote_postings p WHERE p.account_id = a.id
) r ON true;
