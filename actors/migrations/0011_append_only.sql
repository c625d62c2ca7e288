-- The ledger's rows are append-only by trigger as well as by convention: a transfer, a
-- burned id or a resolution, once committed, is never changed or removed, so an UPDATE,
-- DELETE or TRUNCATE of them fails whoever sends it (the application's role, a mistaken
-- manual fix). Balance rows (accounts) are the running sum that checkpoints fold into and
-- are not covered; their history is the transfers. A deliberate repair is done by an
-- operator who disables the trigger by name, which PostgreSQL's log records.

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'TXA01';
END
$$;

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER failed_transfers_append_only BEFORE UPDATE OR DELETE ON failed_transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER failed_transfers_no_truncate BEFORE TRUNCATE ON failed_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER pending_resolutions_append_only BEFORE UPDATE OR DELETE ON pending_resolutions
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER pending_resolutions_no_truncate BEFORE TRUNCATE ON pending_resolutions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
