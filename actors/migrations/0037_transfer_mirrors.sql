-- Mirrors: read-only copies of transfers stored in another database of the ledger, kept
-- where one of their accounts lives (docs/design.md §12, "Moving a shard").
--
-- A transfer is stored once, in the database of the shard that coordinated it, and its
-- shard's hash chain covers it there. When `txproc move-shard` separates the two accounts
-- of an older cross-shard transfer (one moves, one stays), the database that lost the
-- stored row keeps a mirror of it, so that what is computed per database from the rows
-- still holds: `txproc verify` re-derives each account's balances from the transfers and
-- mirrors with a leg on it, and account history and balances at an instant read both.
-- Mirrors are in no chain, no change stream, no transfer query and no lookup by id: each
-- transfer is listed once, where it is stored; `verify` over several databases checks each
-- mirror against its stored original.
--
-- The columns are the stored tables' (a migration adding a column to transfers or
-- pending_resolutions adds it here too). Only `move-shard` writes them, as the owner.
CREATE TABLE mirrored_transfers (LIKE transfers);
ALTER TABLE mirrored_transfers ADD PRIMARY KEY (id);
CREATE INDEX mirrored_transfers_timestamp ON mirrored_transfers ("timestamp");

-- How each mirrored pending transfer was resolved (posted, voided, expired).
CREATE TABLE mirrored_resolutions (LIKE pending_resolutions);
ALTER TABLE mirrored_resolutions ADD PRIMARY KEY (pending_id);
CREATE INDEX mirrored_resolutions_timestamp ON mirrored_resolutions ("timestamp");

-- Append-only like the rows they copy; a move sets the triggers aside inside its own
-- transaction when a mirror becomes a stored row again (its shard moved in).
CREATE TRIGGER mirrored_transfers_append_only BEFORE UPDATE OR DELETE ON mirrored_transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER mirrored_transfers_no_truncate BEFORE TRUNCATE ON mirrored_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER mirrored_resolutions_append_only BEFORE UPDATE OR DELETE
    ON mirrored_resolutions FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER mirrored_resolutions_no_truncate BEFORE TRUNCATE ON mirrored_resolutions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- What the readers of movements per account use: every transfer with a leg on an account
-- of this database, stored or mirrored. `mirrored` keeps a post's or void's hold, and a
-- resolution's pending transfer, on the same side (a post is coordinated by its hold's
-- shard, so both are stored or both mirrored; ids are unique per database only, so a
-- mirror's id may also be a stored transfer's).
CREATE VIEW transfers_and_mirrors AS
SELECT t.*, false AS mirrored FROM transfers t
UNION ALL
SELECT m.*, true FROM mirrored_transfers m;

CREATE VIEW resolutions_and_mirrors AS
SELECT r.*, false AS mirrored FROM pending_resolutions r
UNION ALL
SELECT m.*, true FROM mirrored_resolutions m;

-- Read-only for the service: the mirrors are written by the operator's move only, and the
-- views (which the default privileges would open to writes) only read.
REVOKE ALL ON mirrored_transfers, mirrored_resolutions, transfers_and_mirrors,
    resolutions_and_mirrors FROM txproc_app;
GRANT SELECT ON mirrored_transfers, mirrored_resolutions, transfers_and_mirrors,
    resolutions_and_mirrors TO txproc_app;
