-- Payments, payouts and their saga steps (processor/payments.py, docs/payments.md).
-- A step row is written before every external call and again after it; the partial unique
-- index below lets a payment or payout have at most one unfinished step at a time.

-- Ledger transfer ids of payment steps: four per step (step, post, release, spare), from the
-- processor's own range (PaymentsConfig.system_id_base = 2^62).
CREATE SEQUENCE payment_transfer_ids AS bigint
    START WITH 4611686018427387904 MINVALUE 4611686018427387904 INCREMENT BY 4;
CREATE SEQUENCE payment_step_ids AS bigint START WITH 1;

CREATE TABLE payments (
    id                  text        PRIMARY KEY,
    merchant_account_id bigint      NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    currency            text        NOT NULL,
    payment_method      text        NOT NULL,
    status              text        NOT NULL,
    provider            text        NOT NULL DEFAULT '',
    provider_ref        text        NOT NULL DEFAULT '',
    hold_transfer_id    bigint      NOT NULL DEFAULT 0,
    captured_amount     bigint      NOT NULL DEFAULT 0 CHECK (captured_amount >= 0),
    refunded_amount     bigint      NOT NULL DEFAULT 0
                        CHECK (refunded_amount >= 0 AND refunded_amount <= captured_amount),
    decline_code        text        NOT NULL DEFAULT '',
    error               text        NOT NULL DEFAULT '',
    risk_reason         text        NOT NULL DEFAULT '',
    risk_source         text        NOT NULL DEFAULT '',
    reference           text        NOT NULL DEFAULT '',
    -- Capture as soon as the authorization succeeds (capture: true), whoever finishes it:
    -- the request that started it or, after a crash, the recovery worker.
    auto_capture        boolean     NOT NULL DEFAULT false,
    -- The identity of the request that created it (hash of principal, Idempotency-Key and
    -- fingerprint); the id derives from it, and its automatic capture is keyed by it.
    request_key         text        NOT NULL DEFAULT '',
    principal           text        NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_status ON payments (status) WHERE status = 'processing';

CREATE TABLE payouts (
    id                  text        PRIMARY KEY,
    merchant_account_id bigint      NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    currency            text        NOT NULL,
    destination         text        NOT NULL,
    status              text        NOT NULL,
    provider            text        NOT NULL DEFAULT '',
    provider_ref        text        NOT NULL DEFAULT '',
    decline_code        text        NOT NULL DEFAULT '',
    error               text        NOT NULL DEFAULT '',
    reference           text        NOT NULL DEFAULT '',
    principal           text        NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payment_steps (
    id                  bigint      PRIMARY KEY,
    subject_id          text        NOT NULL,
    kind                text        NOT NULL,
    phase               text        NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    currency            text        NOT NULL,
    provider            text        NOT NULL,
    provider_key        text        NOT NULL,
    transfer_id         bigint      NOT NULL UNIQUE,
    merchant_account_id bigint      NOT NULL,
    payment_method      text        NOT NULL DEFAULT '',
    destination         text        NOT NULL DEFAULT '',
    hold_transfer_id    bigint      NOT NULL DEFAULT 0,
    auth_ref            text        NOT NULL DEFAULT '',
    provider_ref        text        NOT NULL DEFAULT '',
    tried               text[]      NOT NULL DEFAULT '{}',
    decline_code        text        NOT NULL DEFAULT '',
    error               text        NOT NULL DEFAULT '',
    -- Optimistic fence: every write names the version it read, so a runner whose claim
    -- was taken over stops instead of overwriting its successor.
    version             integer     NOT NULL DEFAULT 0,
    -- When the recovery worker may look at the step: a live runner's claim expiry, or
    -- when a parked step (pending, unknown, ledger unavailable) should be asked again.
    due_at              timestamptz NOT NULL,
    checks              integer     NOT NULL DEFAULT 0,
    -- The Idempotency-Key (hashed with its principal) of the request that started it: a
    -- request executed again after its claim was taken over finds its step, not a new one.
    request_key         text        NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX payment_steps_one_open ON payment_steps (subject_id)
    WHERE phase NOT IN ('succeeded', 'failed', 'compensated');
CREATE INDEX payment_steps_due ON payment_steps (due_at)
    WHERE phase NOT IN ('succeeded', 'failed', 'compensated');
CREATE INDEX payment_steps_subject ON payment_steps (subject_id);
CREATE UNIQUE INDEX payment_steps_request ON payment_steps (subject_id, request_key)
    WHERE request_key <> '';
-- Provider keys of the main call, and of failover attempts, each map to one step.
CREATE TABLE payment_step_keys (
    provider_key        text        PRIMARY KEY,
    step_id             bigint      NOT NULL REFERENCES payment_steps (id)
);

-- Every phase a step passed through, append-only: the audit trail of the saga.
CREATE TABLE payment_step_log (
    step_id             bigint      NOT NULL,
    version             integer     NOT NULL,
    phase               text        NOT NULL,
    provider            text        NOT NULL,
    detail              text        NOT NULL DEFAULT '',
    at                  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step_id, version)
);

-- Idempotency-Key claims of the payments API, per principal (the token's subject).
CREATE TABLE idempotency_keys (
    principal           text        NOT NULL,
    key                 text        NOT NULL,
    fingerprint         bytea       NOT NULL,
    state               text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    status              integer     NOT NULL DEFAULT 0,
    body                bytea       NOT NULL DEFAULT '',
    claimed_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Provider webhooks already applied: a repeated event id is acknowledged and ignored.
CREATE TABLE webhook_events (
    provider            text        NOT NULL,
    event_id            text        NOT NULL,
    step_id             bigint,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
