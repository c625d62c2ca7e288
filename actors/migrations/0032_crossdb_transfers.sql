-- Transfers between two databases (docs/design.md §12, "Between databases"): the saga's
-- durable progress, one row per transfer, kept in the debit account's database (every
-- database has the table; only debit databases write it). A front writes the row before
-- the first step, moves `state` forward with a compare-and-set after each step, and a
-- relay (under a lease in this database) drives rows a dead front left behind. The steps
-- themselves are ledger transfers, idempotent by id, so driving a row twice is harmless.
CREATE TABLE crossdb_transfers (
    id                bigint PRIMARY KEY,
    tenant            bigint NOT NULL,
    debit_account_id  bigint NOT NULL,
    credit_account_id bigint NOT NULL,
    amount            bigint NOT NULL CHECK (amount > 0),
    currency          text NOT NULL,
    code              integer NOT NULL,
    user_data         text NOT NULL,
    debit_database    text NOT NULL,
    credit_database   text NOT NULL,
    -- started -> debited -> credited, or started -> refused (step 1 refused), or
    -- debited -> compensating -> compensated (step 2 refused, the debit made whole).
    state             text NOT NULL CHECK (state IN ('started', 'debited', 'credited',
                                                     'refused', 'compensating',
                                                     'compensated')),
    -- The answer the transfer gets: 0 (ok) once credited, else the refusing step's code.
    result            integer,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX crossdb_transfers_open ON crossdb_transfers (updated_at)
    WHERE state IN ('started', 'debited', 'compensating');

-- The service writes a row once and moves its state forward; the transfer's fields never
-- change and no row is deleted (the default privileges of 0015 would allow both).
REVOKE UPDATE, DELETE ON crossdb_transfers FROM txproc_app;
GRANT SELECT, INSERT ON crossdb_transfers TO txproc_app;
GRANT UPDATE (state, result, updated_at) ON crossdb_transfers TO txproc_app;
