-- The legs a commit leaves for another shard's accounts, as one row per commit and owning
-- shard (arrays of accounts and their four balance deltas) instead of one row per account.
-- A cross-shard batch of 8,189 transfers touches thousands of the other shard's accounts:
-- a row each, with a sequence and three indexes, cost about as much PostgreSQL time as the
-- transfers themselves (docs/design.md §13). The owner folds a block whole at its
-- checkpoint by deleting it; between checkpoints the table holds about a second of blocks,
-- so it has no index at all.
CREATE TABLE remote_posting_blocks (
    shard           integer  NOT NULL,
    account_ids     bigint[] NOT NULL,
    debits_pending  bigint[] NOT NULL,
    debits_posted   bigint[] NOT NULL,
    credits_pending bigint[] NOT NULL,
    credits_posted  bigint[] NOT NULL,
    CHECK (cardinality(account_ids) = cardinality(debits_pending)
           AND cardinality(account_ids) = cardinality(debits_posted)
           AND cardinality(account_ids) = cardinality(credits_pending)
           AND cardinality(account_ids) = cardinality(credits_posted))
);
ALTER TABLE remote_posting_blocks SET (autovacuum_vacuum_scale_factor = 0.0,
                                       autovacuum_vacuum_threshold = 1000);
-- A block of thousands of accounts is stored out of line; compressing it first cost more
-- than twice the insert (16.5 against 6.3 ms for 5,000 accounts, measured here), for
-- rows that live about a second.
ALTER TABLE remote_posting_blocks
    ALTER COLUMN account_ids SET STORAGE EXTERNAL,
    ALTER COLUMN debits_pending SET STORAGE EXTERNAL,
    ALTER COLUMN debits_posted SET STORAGE EXTERNAL,
    ALTER COLUMN credits_pending SET STORAGE EXTERNAL,
    ALTER COLUMN credits_posted SET STORAGE EXTERNAL;

-- Postings not folded yet move over, one block per owning shard.
INSERT INTO remote_posting_blocks
SELECT m.shard, array_agg(p.account_id), array_agg(p.debits_pending),
       array_agg(p.debits_posted), array_agg(p.credits_pending), array_agg(p.credits_posted)
FROM remote_postings p JOIN partition_map m ON m.partition = p.partition
GROUP BY m.shard;

-- Every posting not folded yet, one row per account leg.
CREATE VIEW remote_postings_unfolded AS
SELECT b.shard, l.account_id, l.debits_pending, l.debits_posted, l.credits_pending,
       l.credits_posted
FROM remote_posting_blocks b,
     unnest(b.account_ids, b.debits_pending, b.debits_posted, b.credits_pending,
            b.credits_posted)
         AS l(account_id, debits_pending, debits_posted, credits_pending, credits_posted);

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
       a."timestamp", a.partition
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

DROP TABLE remote_postings;
