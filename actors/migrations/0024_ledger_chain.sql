-- A tamper-evident ledger (docs/design.md §15): append-only by construction, a hash chain
-- per shard over every committed batch, and anchors of all shards' chain heads.

-- 1. Append-only by construction. Migration 0011 refuses UPDATE, DELETE and TRUNCATE of
-- transfers, failed_transfers and pending_resolutions. The other tables of the ledger
-- change only in the ways listed here, whoever sends the statement (the service's role
-- holds no more than these by privilege, migration 0015):
--
-- * accounts: an account's creation (its id, currency, flags, code, user_data, timestamp,
--   partition, tenant, origin) never changes and no account is removed. The four balance
--   sums are the checkpoint of its history (docs/design.md §7) and are rewritten by every
--   checkpoint; `txproc verify` re-derives them from the transfers. "UPDATE OF" fires only
--   when a statement sets one of the listed columns, so a checkpoint pays nothing for it.
CREATE TRIGGER accounts_creation_immutable
    BEFORE UPDATE OF id, currency, flags, code, user_data, "timestamp", partition, tenant,
                     origin ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- * partition_checkpoints and shard_epochs: positions that only move forward. A
--   checkpoint's position and an incarnation's epoch are rewritten in place (a row each,
--   updated every second), never moved back, re-keyed or removed.
CREATE FUNCTION ledger_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger table % only moves forward: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'TXA01';
END
$$;
CREATE TRIGGER partition_checkpoints_forward_only BEFORE UPDATE ON partition_checkpoints
    FOR EACH ROW WHEN (NEW."timestamp" < OLD."timestamp" OR NEW.partition <> OLD.partition)
    EXECUTE FUNCTION ledger_forward_only();
CREATE TRIGGER partition_checkpoints_no_delete BEFORE DELETE ON partition_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ledger_forward_only();
CREATE TRIGGER partition_checkpoints_no_truncate BEFORE TRUNCATE ON partition_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_forward_only();
CREATE TRIGGER shard_epochs_forward_only BEFORE UPDATE ON shard_epochs
    FOR EACH ROW WHEN (NEW.epoch < OLD.epoch OR NEW.shard <> OLD.shard)
    EXECUTE FUNCTION ledger_forward_only();
CREATE TRIGGER shard_epochs_no_delete BEFORE DELETE ON shard_epochs
    FOR EACH ROW EXECUTE FUNCTION ledger_forward_only();
CREATE TRIGGER shard_epochs_no_truncate BEFORE TRUNCATE ON shard_epochs
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_forward_only();

-- * partition_map: written once at the first start.
CREATE TRIGGER partition_map_append_only BEFORE UPDATE OR DELETE ON partition_map
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER partition_map_no_truncate BEFORE TRUNCATE ON partition_map
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- * remote_posting_blocks: still folded by its owner's checkpoint with DELETE ... RETURNING
--   (docs/design.md §15, "What is not append-only yet", says why and what replaces it);
--   never truncated. Its rows are derived: each is a sum of legs of transfers, which are
--   chained, and verify re-derives every balance without it.
CREATE TRIGGER remote_posting_blocks_no_truncate BEFORE TRUNCATE ON remote_posting_blocks
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- 2. The chain. A burned id records the shard that burned it, so verify can give every
-- row of the ledger to one shard's chain (transfers and accounts by their partition,
-- resolutions by their pending transfer's). NULL: burned before this migration.
ALTER TABLE failed_transfers ADD COLUMN shard integer;

-- One row per committed batch of a shard, written in the batch's own transaction (the
-- same one that checks its epoch fence, so a fenced-out incarnation cannot fork it):
-- ``digest`` is processor.ledger.chain.link_digest over the batch's rows in their
-- canonical encoding and ``prev_digest``, the digest of the shard's previous batch. Every
-- row of the batch carries a timestamp above the previous link's timestamp_max and at or
-- below its own (a shard's timestamps strictly increase across incarnations, and its
-- commits are written one at a time in timestamp order). seq 0 is a genesis: on a ledger
-- migrated with rows already in it, those rows (timestamp at or below its
-- timestamp_max) are before the chain, and its digest is 32 zero bytes.
CREATE TABLE ledger_chain (
    shard         integer NOT NULL CHECK (shard >= 0),
    seq           bigint  NOT NULL CHECK (seq >= 0),
    epoch         bigint  NOT NULL,
    timestamp_max bigint  NOT NULL,
    transfers     integer NOT NULL CHECK (transfers >= 0),
    accounts      integer NOT NULL CHECK (accounts >= 0),
    failed        integer NOT NULL CHECK (failed >= 0),
    resolutions   integer NOT NULL CHECK (resolutions >= 0),
    prev_digest   bytea   NOT NULL CHECK (octet_length(prev_digest) = 32),
    digest        bytea   NOT NULL CHECK (octet_length(digest) = 32),
    -- The four section digests the link digest covers (transfers, accounts, burned ids,
    -- resolutions), so verify can name the table whose rows changed.
    sections      bytea   NOT NULL CHECK (octet_length(sections) = 128),
    PRIMARY KEY (shard, seq)
);
CREATE TRIGGER ledger_chain_append_only BEFORE UPDATE OR DELETE ON ledger_chain
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_chain_no_truncate BEFORE TRUNCATE ON ledger_chain
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

INSERT INTO ledger_chain (shard, seq, epoch, timestamp_max, transfers, accounts, failed,
                          resolutions, prev_digest, digest, sections)
SELECT s.shard, 0, coalesce((SELECT e.epoch FROM shard_epochs e WHERE e.shard = s.shard), 0),
       greatest(
           coalesce((SELECT max(t."timestamp") FROM transfers t
                     JOIN partition_map m ON m.partition = t.partition
                     WHERE m.shard = s.shard), 0),
           coalesce((SELECT max(a."timestamp") FROM accounts a
                     JOIN partition_map m ON m.partition = a.partition
                     WHERE m.shard = s.shard), 0),
           coalesce((SELECT max(r."timestamp") FROM pending_resolutions r
                     JOIN transfers p ON p.id = r.pending_id
                     JOIN partition_map m ON m.partition = p.partition
                     WHERE m.shard = s.shard), 0)),
       0, 0, 0, 0, decode(repeat('00', 32), 'hex'),
       decode(repeat('00', 32), 'hex'), decode(repeat('00', 128), 'hex')
FROM (SELECT DISTINCT shard FROM partition_map) s;

-- All shards' chain heads at one moment, written by every shard now and then and when it
-- stops cleanly: a tail of a chain removed after an anchor named it is found missing.
CREATE TABLE ledger_anchors (
    id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL,
    reason  text        NOT NULL CHECK (reason IN ('periodic', 'shutdown', 'operator')),
    shards  integer[]   NOT NULL,
    seqs    bigint[]    NOT NULL,
    digests bytea[]     NOT NULL,
    CHECK (cardinality(shards) = cardinality(seqs)
           AND cardinality(shards) = cardinality(digests))
);
CREATE TRIGGER ledger_anchors_append_only BEFORE UPDATE OR DELETE ON ledger_anchors
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_anchors_no_truncate BEFORE TRUNCATE ON ledger_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Written, never changed, by the service (0015 granted every later table more).
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_chain, ledger_anchors FROM txproc_app;
-- An identity column draws from its sequence without the inserter's privilege on it.
REVOKE ALL ON SEQUENCE ledger_anchors_id_seq FROM txproc_app;
