-- Archive and restore of closed months (docs/design.md §16, "Archive and restore").
--
-- `transfers` stays one unpartitioned table (§16, "Time partitions: built, measured, not
-- landed": declarative partitions cost the write path 15-25%). A closed month is archived
-- by `txproc archive`: its rows of `transfers` and `pending_resolutions` are exported to
-- Parquet files with a manifest, checked, and then deleted in one transaction that records
-- the archive, the balances its rows added up to and the ids it took away. `txproc restore`
-- puts them back. Nothing here changes the commit path.

-- One row per archive. ``boundary`` is the first instant (nanoseconds since the epoch, UTC)
-- the archive does not cover. Per shard (``shards``), ``seqs``, ``cuts`` and ``digests``
-- name the shard's last chain link wholly below the boundary: the archive holds exactly the
-- transfers and resolutions of that shard's links up to it, so a link never straddles an
-- archive (rows of a link that crosses the boundary stay hot). ``manifest`` is the JSON
-- manifest written beside the files, byte for byte, and ``manifest_sha256`` its digest.
-- ``restored_at`` is set once, by `txproc restore`; a restored archive covers nothing.
CREATE TABLE ledger_archives (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._-]{1,100}$'),
    boundary        bigint      NOT NULL CHECK (boundary > 0),
    shards          integer[]   NOT NULL,
    seqs            bigint[]    NOT NULL,
    cuts            bigint[]    NOT NULL,
    digests         bytea[]     NOT NULL,
    transfers       bigint      NOT NULL CHECK (transfers >= 0),
    resolutions     bigint      NOT NULL CHECK (resolutions >= 0),
    manifest        bytea       NOT NULL,
    manifest_sha256 bytea       NOT NULL CHECK (octet_length(manifest_sha256) = 32),
    archived_at     timestamptz NOT NULL DEFAULT now(),
    restored_at     timestamptz,
    CHECK (cardinality(shards) = cardinality(seqs) AND cardinality(shards) = cardinality(cuts)
           AND cardinality(shards) = cardinality(digests))
);
-- The archive in force for reads: the newest not restored.
CREATE INDEX ledger_archives_active ON ledger_archives (boundary) WHERE restored_at IS NULL;

-- What each account's four balances held from the archived rows alone, at the archive's
-- cut: `txproc verify` starts its re-derivation from the sum of the checkpoints of the
-- archives in force. Every hold in an archive is resolved inside it (the archive refuses
-- otherwise), so the pending sums are zero; they are kept for the form of a balance.
CREATE TABLE archive_checkpoints (
    archive_id      bigint NOT NULL REFERENCES ledger_archives (id),
    account_id      bigint NOT NULL,
    debits_pending  bigint NOT NULL CHECK (debits_pending >= 0),
    debits_posted   bigint NOT NULL CHECK (debits_posted >= 0),
    credits_pending bigint NOT NULL CHECK (credits_pending >= 0),
    credits_posted  bigint NOT NULL CHECK (credits_posted >= 0),
    PRIMARY KEY (archive_id, account_id)
);

-- The ids of the transfers an archive in force took out of `transfers`, with their tenant:
-- a retry of one must never be applied again (the shards read it beside `failed_transfers`
-- for ids below their high-water mark, docs/design.md §8), and a read of one by id answers
-- `archived` to its own tenant only. Removed by the restore that puts the rows back.
CREATE TABLE archived_transfer_ids (
    id         bigint NOT NULL PRIMARY KEY,
    archive_id bigint NOT NULL REFERENCES ledger_archives (id),
    tenant     bigint NOT NULL
);

-- The archive's session flag. Transfers and resolutions stay append-only for everyone, but
-- for one thing: a DELETE in a transaction that sets `SET LOCAL txproc.archive = 'on'`,
-- which only `txproc archive` does (as the owner: the service's role holds no DELETE on
-- these tables, 0015, so it cannot, flag or not). UPDATE and TRUNCATE stay refused.
CREATE FUNCTION ledger_append_only_but_archive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND coalesce(current_setting('txproc.archive', true), '') = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'TXA01';
END
$$;
DROP TRIGGER transfers_append_only ON transfers;
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only_but_archive();
DROP TRIGGER pending_resolutions_append_only ON pending_resolutions;
CREATE TRIGGER pending_resolutions_append_only BEFORE UPDATE OR DELETE ON pending_resolutions
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only_but_archive();

-- The archive's own tables change only under the same flag: a record is never removed or
-- re-keyed, and is marked restored once; checkpoints are never changed; archived ids are
-- removed only by their restore.
CREATE FUNCTION ledger_archives_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('txproc.archive', true), '') = 'on' THEN
        IF TG_TABLE_NAME = 'archived_transfer_ids' AND TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        IF TG_TABLE_NAME = 'ledger_archives' AND TG_OP = 'UPDATE'
           AND OLD.restored_at IS NULL AND NEW.restored_at IS NOT NULL
           AND NEW.id = OLD.id AND NEW.name = OLD.name AND NEW.boundary = OLD.boundary
           AND NEW.manifest_sha256 = OLD.manifest_sha256 AND NEW.manifest = OLD.manifest
           AND NEW.seqs = OLD.seqs AND NEW.cuts = OLD.cuts AND NEW.digests = OLD.digests
           AND NEW.shards = OLD.shards THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'the archive table % refuses %', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'TXA01';
END
$$;
CREATE TRIGGER ledger_archives_guard BEFORE UPDATE OR DELETE ON ledger_archives
    FOR EACH ROW EXECUTE FUNCTION ledger_archives_guard();
CREATE TRIGGER ledger_archives_no_truncate BEFORE TRUNCATE ON ledger_archives
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER archive_checkpoints_guard BEFORE UPDATE OR DELETE ON archive_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ledger_archives_guard();
CREATE TRIGGER archive_checkpoints_no_truncate BEFORE TRUNCATE ON archive_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER archived_transfer_ids_guard BEFORE UPDATE OR DELETE ON archived_transfer_ids
    FOR EACH ROW EXECUTE FUNCTION ledger_archives_guard();
CREATE TRIGGER archived_transfer_ids_no_truncate BEFORE TRUNCATE ON archived_transfer_ids
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- The service reads these (the shards' id reads, history's `archived` answers, verify runs
-- as whoever calls it) and writes none of them: archiving is the operator's command.
REVOKE ALL ON ledger_archives, archive_checkpoints, archived_transfer_ids FROM txproc_app;
GRANT SELECT ON ledger_archives, archive_checkpoints, archived_transfer_ids TO txproc_app;
-- An identity column draws from its sequence without the inserter's privilege on it.
REVOKE ALL ON SEQUENCE ledger_archives_id_seq FROM txproc_app;
