-- Balance rows are checkpoints, not a running sum rewritten by every commit.
--
-- A shard's commits are totally ordered by its transfer timestamps (strictly increasing per
-- shard, across incarnations). Each partition records the timestamp up to which the effects
-- of the rows its shard wrote are in the balance rows of that shard's accounts; a shard
-- moves it forward in a checkpoint transaction that also folds the postings other shards
-- left it (docs/design.md §7). An account's committed balance is therefore
--   its row + its unfolded remote postings + the effects of the rows its own shard wrote
--   after the checkpoint,
-- which the view below computes and recovery reads.

-- Which legs of a transfer are on the writing shard's own accounts: 1 the debit leg, 2 the
-- credit leg. The other legs were written to remote_postings by the same commit. Rows
-- written before this migration are all folded already (below), so their value is unused.
ALTER TABLE transfers ADD COLUMN local_legs smallint NOT NULL DEFAULT 3
    CHECK (local_legs BETWEEN 0 AND 3);
ALTER TABLE transfers ALTER COLUMN local_legs DROP DEFAULT;

-- From now on, a transfer's partition is a partition of the shard that wrote it: its
-- debit account's when that shard owns it (always, for a pending transfer), else its
-- credit account's, else the first partition of the coordinating shard.
COMMENT ON COLUMN transfers.partition IS
    'a partition of the shard that wrote the row: the debit account''s when that shard owns it';

CREATE TABLE partition_checkpoints (
    partition   integer PRIMARY KEY,
    -- Every transfer and expiry the partition's shard wrote with a timestamp at or below
    -- this is folded into the balance rows of that shard's accounts.
    "timestamp" bigint  NOT NULL
);
-- Until now every commit folded its effects at once, so everything stored is folded.
INSERT INTO partition_checkpoints (partition, "timestamp")
SELECT p, greatest(coalesce((SELECT max("timestamp") FROM transfers), 0),
                   coalesce((SELECT max("timestamp") FROM pending_resolutions), 0))
FROM generate_series(0, 255) AS p;

-- The rows after a checkpoint are found by timestamp. Both tables are append-only and
-- written in timestamp order (per shard, and the shards' clocks are close), so a block
-- range index costs almost nothing per row and bounds the scan to recent pages. Shards
-- summarize new ranges at each checkpoint (brin_summarize_new_values).
CREATE INDEX transfers_timestamp ON transfers USING brin ("timestamp")
    WITH (pages_per_range = 32, autosummarize = on);
CREATE INDEX pending_resolutions_timestamp ON pending_resolutions USING brin ("timestamp")
    WITH (pages_per_range = 32, autosummarize = on);

-- The effects not yet in any balance row of the transfers and expiries written by the
-- shards of ``parts`` after their checkpoints and at or before ``upto``, one row per leg
-- on the writing shard's own accounts: (account, debits_pending, debits_posted,
-- credits_pending, credits_posted). A pending transfer adds its amount to pending; a post
-- or void releases its hold's whole amount and a post adds its own amount to posted; an
-- expiry releases the hold; a plain transfer adds to posted.
--
-- The planner cannot know that the rows after the oldest checkpoint are a thin recent
-- slice of tables that only grow (its estimate for "timestamp > a parameter" is a third
-- of the table), so the function turns sequential scans off: the timestamp indexes bound
-- the scan, and only posts and voids look their hold up by primary key.
CREATE FUNCTION unfolded_legs(parts integer[], upto bigint)
RETURNS TABLE (account_id bigint, debits_pending bigint, debits_posted bigint,
               credits_pending bigint, credits_posted bigint)
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    WITH lo AS MATERIALIZED (
        SELECT coalesce(min(c."timestamp"), 0) AS ts
        FROM partition_checkpoints c WHERE c.partition = ANY(parts)
    ), t AS MATERIALIZED (
        SELECT t.debit_account_id, t.credit_account_id, t.local_legs, t.amount, t.flags,
               t.pending_id
        FROM transfers t
        JOIN partition_checkpoints c ON c.partition = t.partition
        WHERE t."timestamp" > (SELECT ts FROM lo) AND t."timestamp" > c."timestamp"
          AND t."timestamp" <= upto AND t.partition = ANY(parts)
    ), e AS (
        SELECT t.debit_account_id AS d, t.credit_account_id AS c, t.local_legs AS legs,
               CASE WHEN (t.flags & 2) <> 0 THEN t.amount ELSE 0 END AS pend,
               CASE WHEN (t.flags & 2) = 0 THEN t.amount ELSE 0 END AS post
        FROM t WHERE (t.flags & 12) = 0
        UNION ALL
        SELECT t.debit_account_id, t.credit_account_id, t.local_legs, -p.amount,
               CASE WHEN (t.flags & 4) <> 0 THEN t.amount ELSE 0 END
        FROM t JOIN transfers p ON p.id = t.pending_id
        WHERE (t.flags & 12) <> 0
        UNION ALL
        SELECT p.debit_account_id, p.credit_account_id, p.local_legs, -p.amount, 0
        FROM pending_resolutions r
        JOIN transfers p ON p.id = r.pending_id
        JOIN partition_checkpoints c ON c.partition = p.partition
        WHERE r.kind = 3 AND r."timestamp" > (SELECT ts FROM lo)
          AND r."timestamp" > c."timestamp" AND r."timestamp" <= upto
          AND p.partition = ANY(parts)
    )
    SELECT d, pend, post, 0::bigint, 0::bigint FROM e WHERE (legs & 1) <> 0
    UNION ALL
    SELECT c, 0::bigint, 0::bigint, pend, post FROM e WHERE (legs & 2) <> 0
$$;

-- What readers see: each account's committed balances, exactly, at any moment.
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
LEFT JOIN LATERAL (
    SELECT sum(p.debits_pending)::bigint  AS debits_pending,
           sum(p.debits_posted)::bigint   AS debits_posted,
           sum(p.credits_pending)::bigint AS credits_pending,
           sum(p.credits_posted)::bigint  AS credits_posted
    FROM remote_postings p WHERE p.account_id = a.id
) r ON true
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

