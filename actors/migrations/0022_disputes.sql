-- Disputes (chargebacks; docs/payments.md "Disputes", processor/payments/disputes.py).
-- A dispute is opened by a provider's webhook on a captured payment and decided by another;
-- its money moves as saga steps of its own (payment_steps with subject_id the dispute's
-- id: dispute_hold, dispute_evidence, dispute_won, dispute_lost), so the recovery worker,
-- the fencing and the step log apply to it unchanged, and its steps never block the
-- payment's.
CREATE TABLE disputes (
    -- dp_ and 24 hex digits, derived from the provider and its dispute id, so the same
    -- notice always names the same dispute.
    id                  text        PRIMARY KEY,
    payment_id          text        NOT NULL REFERENCES payments (id),
    provider            text        NOT NULL,
    provider_dispute_id text        NOT NULL,
    merchant_account_id bigint      NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    fee                 bigint      NOT NULL CHECK (fee >= 0),
    currency            text        NOT NULL,
    reason              text        NOT NULL DEFAULT '',
    status              text        NOT NULL
                        CHECK (status IN ('needs_response', 'under_review', 'won', 'lost')),
    evidence_due_at     timestamptz,
    -- The first of the dispute_hold step's ledger ids (the amount's hold; the fee's is the
    -- next); 0 when the ledger refused the holds (docs/runbooks/disputes.md).
    hold_transfer_id    bigint      NOT NULL DEFAULT 0,
    -- {"text": ..., "files": [...]}: what the merchant submitted (bounded by the API).
    evidence            jsonb       CHECK (evidence IS NULL OR jsonb_typeof(evidence) = 'object'),
    error               text        NOT NULL DEFAULT '',
    -- The payment's principal: a dispute is visible to the tenant of its payment.
    principal           text        NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_dispute_id)
);
-- Lists (GET /v1/disputes): one tenant's disputes, newest first, as payments (0020).
CREATE INDEX disputes_tenant_created ON disputes
    ((split_part(principal, '/', 1)), created_at DESC, id DESC);
CREATE INDEX disputes_payment ON disputes (payment_id);

-- A dispute notice names the payment by the provider's id of its authorization.
CREATE INDEX payments_provider_ref ON payments (provider, provider_ref) WHERE provider_ref <> '';
-- The default privileges of 0015, less DELETE: a dispute is history, never removed.
REVOKE DELETE ON disputes FROM txproc_app;

