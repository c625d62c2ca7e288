-- The role the service connects as (docs/security.md, "The database"): txproc_app may log
-- in and run the service's statements, and nothing more. It is no superuser, creates no
-- database or role, owns nothing, and holds no UPDATE, DELETE or TRUNCATE on the ledger's
-- history (transfers, failed_transfers, pending_resolutions, audit_requests, events,
-- payment_step_log): those rows are append-only by privilege here as well as by trigger
-- (0004, 0011, 0012). Migrations and operator commands (txproc migrate, token revoke, dlq,
-- audit, keys) run as the administrative role that owns the tables.
--
-- The grants below are what the service's statements need, table by table
-- (actors/ledger/store.py, actors/payments/store.py and outbox.py, actors/edge/*.py,
-- actors/ops/metrics_server.py). A table created by a later migration gets the default
-- privileges set at the end (read and change rows); a later append-only table revokes
-- UPDATE and DELETE in its own migration. tests/db/test_app_role.py lists every table with
-- the privileges it must have, so a new table without a decision fails there.
--
-- The role is created here without a password: roles belong to the whole server and its
-- password is not SQL to keep in a file. actors/database.py (app_role_url) sets it, as a
-- SCRAM verifier, from the password file the service reads.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'txproc_app') THEN
        CREATE ROLE txproc_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
            NOBYPASSRLS;
    END IF;
EXCEPTION
    -- The migration of another database on the same server created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN
        NULL;
    WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'migration 0015 creates the role txproc_app, which needs CREATEROLE'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'create it once as an administrator (CREATE ROLE txproc_app LOGIN)'
                         ' or migrate as a role with CREATEROLE';
END
$$;

-- The ledger (actors/ledger/store.py). Balance rows change only in the four sums that
-- checkpoints fold into; an account's currency, flags, tenant or id never change.
GRANT SELECT, INSERT ON accounts TO txproc_app;
GRANT UPDATE (debits_pending, debits_posted, credits_pending, credits_posted)
    ON accounts TO txproc_app;
GRANT SELECT, INSERT ON transfers, failed_transfers, pending_resolutions TO txproc_app;
-- Postings left for another shard, deleted by the owner when it folds them.
GRANT SELECT, INSERT, DELETE ON remote_posting_blocks TO txproc_app;
-- Epochs move at every recovery; commits lock them FOR SHARE, which needs UPDATE.
GRANT SELECT, INSERT, UPDATE ON shard_epochs TO txproc_app;
GRANT SELECT, UPDATE ON partition_checkpoints TO txproc_app;
-- Written once, at the first start, by the administrative role (runtime.start_processor).
GRANT SELECT ON partition_map TO txproc_app;
GRANT SELECT ON account_balances, remote_postings_unfolded TO txproc_app;

-- Summarizing the timestamp indexes after a checkpoint is reserved to their owner, so the
-- service does it through this function, which runs as the owner and does only that.
CREATE FUNCTION ledger_summarize_new_ranges() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT pg_catalog.brin_summarize_new_values('transfers_timestamp'::regclass);
    SELECT pg_catalog.brin_summarize_new_values('pending_resolutions_timestamp'::regclass);
$$;
REVOKE ALL ON FUNCTION ledger_summarize_new_ranges() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger_summarize_new_ranges() TO txproc_app;

-- Who made each change (actors/edge/audit.py): written, never changed.
GRANT SELECT, INSERT ON audit_requests TO txproc_app;

-- Payments (actors/payments/store.py). Steps, payments and payouts move through their
-- states; the step log and the webhooks seen only grow.
GRANT SELECT, INSERT, UPDATE ON payments, payouts, payment_steps TO txproc_app;
GRANT SELECT, INSERT ON payment_step_keys, payment_step_log, webhook_events TO txproc_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO txproc_app;
GRANT USAGE ON SEQUENCE payment_step_ids, payment_transfer_ids TO txproc_app;

-- The outbox (actors/payments/outbox.py). Events are append-only (0004); deliveries are
-- claimed, marked and moved to dead letters; replaying a dead letter is the operator's
-- `txproc dlq replay`, so dead letters are only written here.
GRANT SELECT, INSERT ON events, dead_letters TO txproc_app;
GRANT SELECT, INSERT, UPDATE ON event_subscribers TO txproc_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_deliveries TO txproc_app;

-- Credentials the fronts read (actors/edge/credentials.py, signatures.py): revocations and
-- client keys are written by the operator's commands; nonces are claimed and pruned by
-- every front.
GRANT SELECT ON revoked_tokens, client_keys TO txproc_app;
GRANT SELECT, INSERT, DELETE ON request_nonces TO txproc_app;

-- Tables of later migrations, created by the role running this one.
ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO txproc_app;
ALTER DEFAULT PRIVILEGES GRANT USAGE ON SEQUENCES TO txproc_app;
