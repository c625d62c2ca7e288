-- Erasure without breaking the record (docs/design.md §17, processor/privacy.py).
--
-- A payment or payout that names its data subject (customer_ref) keeps its personal fields
-- (customer_ref, reference, metadata) sealed in ``personal`` with that subject's data key,
-- and '' / '{}' in the clear columns. The data key is stored here, wrapped by a key
-- derived from the deployment's master key. `txproc erase` destroys it (wrapped_key NULL,
-- erased_at set), clears ``personal`` and scrubs the subject's event payloads, stored
-- answers and refund metadata. The row stays as the erasure's tombstone: its digest is a
-- keyed HMAC of (tenant slot, customer_ref), which names no one without the master key.
CREATE TABLE subject_keys (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_slot    bigint      NOT NULL CHECK (tenant_slot >= 0),
    subject_digest bytea       NOT NULL CHECK (octet_length(subject_digest) = 32),
    -- Version byte, nonce, AES-GCM ciphertext and tag of a 32-byte key: 61 bytes.
    wrapped_key    bytea       CHECK (octet_length(wrapped_key) BETWEEN 29 AND 128),
    created_at     timestamptz NOT NULL DEFAULT now(),
    erased_at      timestamptz,
    CHECK ((wrapped_key IS NULL) = (erased_at IS NOT NULL))
);
-- One live key per subject; a subject that comes back after its erasure gets a new one.
CREATE UNIQUE INDEX subject_keys_live ON subject_keys (tenant_slot, subject_digest)
    WHERE erased_at IS NULL;
CREATE INDEX subject_keys_subject ON subject_keys (tenant_slot, subject_digest);
-- The service creates keys; it never deletes one (a tombstone is what lets a second
-- erasure answer "already erased" and a restore re-apply it).
REVOKE DELETE, TRUNCATE ON subject_keys FROM txproc_app;

ALTER TABLE payments
    ADD COLUMN subject_key_id bigint REFERENCES subject_keys (id),
    ADD COLUMN personal bytea,
    ADD CONSTRAINT payments_personal_has_key CHECK (personal IS NULL OR subject_key_id IS NOT NULL);
ALTER TABLE payouts
    ADD COLUMN subject_key_id bigint REFERENCES subject_keys (id),
    ADD COLUMN personal bytea,
    ADD CONSTRAINT payouts_personal_has_key CHECK (personal IS NULL OR subject_key_id IS NOT NULL);
CREATE INDEX payments_subject_key ON payments (subject_key_id) WHERE subject_key_id IS NOT NULL;
CREATE INDEX payouts_subject_key ON payouts (subject_key_id) WHERE subject_key_id IS NOT NULL;

-- Events stay append-only, but for one thing: an erasure may rewrite the payload of an
-- event (never its id, type, aggregate or time) in a transaction that says so with
-- SET LOCAL txproc.erasure = 'on'. No hash chain covers events; the service's role has no
-- UPDATE on them (0015), so only the operator's `txproc erase` can.
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND coalesce(current_setting('txproc.erasure', true), '') = 'on'
       AND NEW.id = OLD.id AND NEW.event_type = OLD.event_type
       AND NEW.aggregate_id = OLD.aggregate_id AND NEW.created_at = OLD.created_at THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
