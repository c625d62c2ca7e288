-- Anchors cover the audit log (docs/security.md, "Audit events"; docs/design.md §15): every
-- anchor of the ledger's chain heads also records the audit chain's head, the last event's
-- id and digest (0 and 32 zero bytes: no event yet), read in the anchor's own statement. A
-- tail of audit_events removed, or the chain rewritten from some event to its end, after
-- an anchor named it no longer matches the anchor: `txproc verify` names that event.
-- Anchors written before this migration have neither (NULL): they vouch for no event.
ALTER TABLE ledger_anchors
    ADD COLUMN audit_id bigint CHECK (audit_id >= 0),
    ADD COLUMN audit_digest bytea CHECK (octet_length(audit_digest) = 32),
    ADD CONSTRAINT ledger_anchors_audit_head
        CHECK ((audit_id IS NULL) = (audit_digest IS NULL));
