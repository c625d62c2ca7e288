-- Settlement reconciliation (docs/reconciliation.md, actors/payments/reconciliation.py).
--
-- Every table here is append-only, by privilege and by trigger (ledger_append_only, 0011):
-- a run is one row written when it ends, a repeated run of the same (provider, date) is a
-- new attempt; an exception is written once and its resolution is a row of its own, so an
-- exception is open until a resolution names it. Nothing is updated or deleted, so the
-- records an auditor reads are the records the runs wrote.

CREATE TABLE reconciliation_runs (
    id                  bigserial   PRIMARY KEY,
    provider            text        NOT NULL,
    settled_on          date        NOT NULL,
    attempt             integer     NOT NULL CHECK (attempt >= 1),
    status              text        NOT NULL CHECK (status IN ('succeeded', 'failed')),
    -- Why a failed run failed (the report could not be fetched or read); '' otherwise.
    error               text        NOT NULL DEFAULT '',
    lines               integer     NOT NULL DEFAULT 0 CHECK (lines >= 0),
    matched_count       integer     NOT NULL DEFAULT 0 CHECK (matched_count >= 0),
    unmatched_count     integer     NOT NULL DEFAULT 0 CHECK (unmatched_count >= 0),
    -- Per currency: {"EUR": {"lines", "matched_count", "matched_amount", "unmatched_count",
    -- "unmatched_amount", "fees"}} (minor units).
    totals              jsonb       NOT NULL DEFAULT '{}'
                        CHECK (jsonb_typeof(totals) = 'object'),
    -- Exceptions this run closed: late settlements matched, discrepancies gone on a re-run.
    closed_count        integer     NOT NULL DEFAULT 0 CHECK (closed_count >= 0),
    fees_posted         integer     NOT NULL DEFAULT 0 CHECK (fees_posted >= 0),
    -- Who asked: "schedule", or the API's principal, or "cli:<OS user>".
    requested_by        text        NOT NULL,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    UNIQUE (provider, settled_on, attempt)
);
CREATE INDEX reconciliation_runs_listed ON reconciliation_runs (id DESC);
CREATE INDEX reconciliation_runs_day ON reconciliation_runs (provider, settled_on DESC);

CREATE TABLE reconciliation_exceptions (
    id                  bigserial   PRIMARY KEY,
    provider            text        NOT NULL,
    settled_on          date        NOT NULL,
    kind                text        NOT NULL CHECK (kind IN (
                            'missing', 'amount_mismatch', 'currency_mismatch', 'unknown',
                            'duplicate', 'unexpected_fee', 'status_mismatch',
                            'batch_mismatch')),
    -- Identifies the discrepancy across attempts of the same (provider, date): a repeated
    -- run finds it again instead of adding another (processor/payments/reconcile.py).
    key                 text        NOT NULL,
    amount              bigint      NOT NULL CHECK (amount >= 0),
    currency            text        NOT NULL,
    expected            jsonb,
    found               jsonb,
    -- Links to what it is about (0 or '' when none): the saga step, its payment or payout,
    -- the ledger transfer that posted it, the provider's reference.
    step_id             bigint      NOT NULL DEFAULT 0,
    subject_id          text        NOT NULL DEFAULT '',
    transfer_id         bigint      NOT NULL DEFAULT 0,
    provider_ref        text        NOT NULL DEFAULT '',
    run_id              bigint      NOT NULL REFERENCES reconciliation_runs (id),
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, settled_on, key)
);
CREATE INDEX reconciliation_exceptions_step ON reconciliation_exceptions (step_id)
    WHERE step_id <> 0;

CREATE TABLE reconciliation_resolutions (
    exception_id        bigint      PRIMARY KEY REFERENCES reconciliation_exceptions (id),
    -- An operator's word (accepted, corrected, written_off, provider_error, ...) or the
    -- run's: settled_late (matched on a later day's report), cleared (gone on a re-run).
    resolution          text        NOT NULL CHECK (resolution ~ '^[a-z][a-z_]{0,39}$'),
    note                text        NOT NULL DEFAULT '',
    -- The principal (tenant slot/subject) of the API, "cli:<OS user>", or "reconciliation".
    resolved_by         text        NOT NULL,
    run_id              bigint      REFERENCES reconciliation_runs (id),
    resolved_at         timestamptz NOT NULL DEFAULT now()
);

-- Which report matched each step (the first one to do so): a later day's line for it is a
-- duplicate, and a later run does not call it missing.
CREATE TABLE reconciliation_matches (
    provider            text        NOT NULL,
    record_key          text        NOT NULL,
    step_id             bigint      NOT NULL,
    settled_on          date        NOT NULL,
    run_id              bigint      NOT NULL REFERENCES reconciliation_runs (id),
    late                boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (provider, record_key)
);
CREATE INDEX reconciliation_matches_step ON reconciliation_matches (step_id);

-- The fees posted to the ledger: fee account -> clearing account, one derived transfer id
-- per step (a repeated run answers "exists" from the ledger and adds no row here).
CREATE TABLE reconciliation_fees (
    transfer_id         bigint      PRIMARY KEY,
    provider            text        NOT NULL,
    settled_on          date        NOT NULL,
    record_key          text        NOT NULL,
    debit_account_id    bigint      NOT NULL,
    credit_account_id   bigint      NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    currency            text        NOT NULL,
    run_id              bigint      NOT NULL REFERENCES reconciliation_runs (id)
);

CREATE TRIGGER reconciliation_runs_append_only BEFORE UPDATE OR DELETE ON reconciliation_runs
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_exceptions_append_only BEFORE UPDATE OR DELETE
    ON reconciliation_exceptions FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_resolutions_append_only BEFORE UPDATE OR DELETE
    ON reconciliation_resolutions FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_matches_append_only BEFORE UPDATE OR DELETE
    ON reconciliation_matches FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_fees_append_only BEFORE UPDATE OR DELETE ON reconciliation_fees
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_runs_no_truncate BEFORE TRUNCATE ON reconciliation_runs
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_exceptions_no_truncate BEFORE TRUNCATE
    ON reconciliation_exceptions FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_resolutions_no_truncate BEFORE TRUNCATE
    ON reconciliation_resolutions FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_matches_no_truncate BEFORE TRUNCATE ON reconciliation_matches
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER reconciliation_fees_no_truncate BEFORE TRUNCATE ON reconciliation_fees
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- The default privileges of 0015, less UPDATE and DELETE: these rows are history.
REVOKE UPDATE, DELETE ON reconciliation_runs, reconciliation_exceptions,
    reconciliation_resolutions, reconciliation_matches, reconciliation_fees FROM txproc_app;

-- Which steps a run of a provider's day reads: its money-moving steps by when they ended.
CREATE INDEX payment_steps_reconciled ON payment_steps (provider, updated_at)
    WHERE kind IN ('capture', 'refund', 'payout');
