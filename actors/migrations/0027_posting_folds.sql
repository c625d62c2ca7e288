-- Posting blocks are folded by a horizon, never deleted (docs/design.md §7, "Posting blocks
-- and the fold horizon", and §15).
--
-- Until now a shard's checkpoint folded the blocks other shards left for its accounts with
-- DELETE ... RETURNING: the one table on the money path still rewritten. From here on a
-- block is never changed or removed. It records the id of the transaction that inserted it
-- (xid8: 64 bits, never wraps). A checkpoint of shard S reads, in its fold statement's
-- snapshot, X = pg_snapshot_xmin(pg_current_snapshot()): every transaction whose id is
-- below X has ended, so the blocks of S with an id below X that this snapshot sees are
-- exactly the committed ones, and no other can ever appear. It folds those at or above its
-- previous horizon H (and below X) into the balance rows, and appends X as S's new horizon
-- to posting_folds, in the same statement. A reader counts the balance rows plus the
-- blocks of S at or above the newest horizon of S it sees: a block is in exactly one of
-- the two, whatever the reader's snapshot, because a fold's balance UPDATE and its horizon
-- commit together.

-- 1. Every block records its inserting transaction. Blocks not folded yet take this
-- migration's id (no horizon exists yet, so they stay unfolded until a checkpoint whose
-- snapshot begins after this migration committed).
ALTER TABLE remote_posting_blocks ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();

-- Whatever an INSERT names, the id stored is the inserting transaction's: the fold's
-- exactness rests on it (a block claiming an id below a horizon would never be counted).
-- And no block is ever stored below its shard's horizon. In one cluster that cannot
-- happen: a horizon is the xmin of a snapshot, and a transaction still running has an id
-- at or above every such xmin taken while or before it ran. It happens if the transaction
-- ids start again below the stored horizons (the ledger restored from a logical dump into
-- another cluster): the block would count as folded and never be. The insert refuses
-- instead (SQLSTATE TXP01), as the checkpoint does (docs/design.md §7).
CREATE FUNCTION remote_posting_block_xid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.xid := pg_current_xact_id();
    IF NEW.xid < posting_horizon(NEW.shard) THEN
        RAISE EXCEPTION 'posting block for shard % below its fold horizon %: the '
                        'transaction ids are behind the ledger''s (docs/design.md §7)',
                        NEW.shard, posting_horizon(NEW.shard)
            USING ERRCODE = 'TXP01';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER remote_posting_blocks_xid BEFORE INSERT ON remote_posting_blocks
    FOR EACH ROW EXECUTE FUNCTION remote_posting_block_xid();

-- Append-only from now on, like the rest of the ledger (0011, 0024: TRUNCATE was refused
-- already).
CREATE TRIGGER remote_posting_blocks_append_only BEFORE UPDATE OR DELETE
    ON remote_posting_blocks
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- The blocks of shard S from a horizon on: what every fold and every reader asks for. The
-- table now keeps every block (one row per cross-shard commit and remote shard), so this
-- index is what keeps those reads to the recent, unfolded tail.
CREATE INDEX remote_posting_blocks_shard_xid ON remote_posting_blocks (shard, xid);

-- 0006 tuned autovacuum for a table whose rows lived a second; it is insert-only now
-- (dead rows come only from rolled-back commits).
ALTER TABLE remote_posting_blocks RESET (autovacuum_vacuum_scale_factor,
                                         autovacuum_vacuum_threshold);

-- 2. The horizons. One row per checkpoint of a shard that folded at least one block: the
-- blocks of ``shard`` with an id below ``horizon`` are in its balance rows. ``seq`` numbers
-- a shard's folds from 1; two folds computing the same next seq (which the epoch fence
-- already rules out) collide on the primary key instead of folding a block twice.
CREATE TABLE posting_folds (
    shard   integer     NOT NULL CHECK (shard >= 0),
    seq     bigint      NOT NULL CHECK (seq > 0),
    horizon xid8        NOT NULL,
    epoch   bigint      NOT NULL,
    -- What this fold moved into the balance rows: blocks and account legs.
    blocks  integer     NOT NULL CHECK (blocks > 0),
    legs    bigint      NOT NULL CHECK (legs >= 0),
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (shard, seq)
);
CREATE TRIGGER posting_folds_append_only BEFORE UPDATE OR DELETE ON posting_folds
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER posting_folds_no_truncate BEFORE TRUNCATE ON posting_folds
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Shard ``s``'s newest horizon as the calling statement's snapshot sees it ('0': nothing
-- folded yet, every block counts).
CREATE FUNCTION posting_horizon(s integer) RETURNS xid8
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT f.horizon FROM posting_folds f WHERE f.shard = s
                     ORDER BY f.seq DESC LIMIT 1), '0'::xid8)
$$;

-- Every posting not folded yet, one row per account leg: per shard (shards are numbered
-- from 0), its blocks at or above its horizon, found through the (shard, xid) index.
-- OFFSET 0 keeps the per-shard subquery a subquery, run once per shard with its index
-- range: flattened, the planner (which guesses 1,000 shards) merge-joined every block
-- ever written and filtered by the horizon afterwards (1.3 s at 200,000 blocks, against
-- 1.5 ms). account_balances (0012) reads this view; its definition does not change.
CREATE OR REPLACE VIEW remote_postings_unfolded AS
SELECT b.shard, l.account_id, l.debits_pending, l.debits_posted, l.credits_pending,
       l.credits_posted
FROM generate_series(0, (SELECT max(shard) FROM remote_posting_blocks)) AS s(shard)
CROSS JOIN LATERAL (
    SELECT * FROM remote_posting_blocks p
    WHERE p.shard = s.shard AND p.xid >= posting_horizon(s.shard)
    OFFSET 0
) b
CROSS JOIN LATERAL unnest(b.account_ids, b.debits_pending, b.debits_posted,
                          b.credits_pending, b.credits_posted)
    AS l(account_id, debits_pending, debits_posted, credits_pending, credits_posted);

-- 3. Privileges: the service inserts blocks and folds, and never removes or changes
-- either (0015 granted DELETE on blocks; later tables get every row change by default).
REVOKE DELETE ON remote_posting_blocks FROM txproc_app;
REVOKE UPDATE, DELETE, TRUNCATE ON posting_folds FROM txproc_app;
GRANT SELECT, INSERT ON posting_folds TO txproc_app;
