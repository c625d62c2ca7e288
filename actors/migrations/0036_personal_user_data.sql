-- Personal user_data (docs/design.md §17, "user_data a tenant marks personal").
--
-- A tenant listed here has its accounts' and transfers' user_data treated as the name of a
-- data subject: the edge stores a pseudonym in its place ("~s" and the subject's key id,
-- processor/privacy.py), and keeps the value itself sealed with the subject's data key in
-- personal_values. The ledger's rows, its hash chain and its archives hold only the
-- pseudonym, so `txproc erase` of the subject (destroying its key, deleting its value)
-- changes nothing they cover, and every read shows the value gone.
--
-- One row per tenant that opted in; set by the operator's `txproc tenants
-- personal-user-data`, never by the service, and never taken back (a tenant's earlier
-- pseudonyms would otherwise be shown as they are stored).
CREATE TABLE tenant_privacy (
    tenant_slot        bigint      PRIMARY KEY CHECK (tenant_slot > 0),
    personal_user_data boolean     NOT NULL,
    set_at             timestamptz NOT NULL DEFAULT now(),
    set_by             text        NOT NULL
);

-- The value behind each pseudonym: the subject's reference sealed with its data key
-- (processor.privacy.seal_personal, bound to the row as "user_data:<key id>"). One per
-- subject key; the erasure deletes it with the key's destruction.
CREATE TABLE personal_values (
    subject_key_id bigint      PRIMARY KEY REFERENCES subject_keys (id),
    sealed         bytea       NOT NULL CHECK (octet_length(sealed) BETWEEN 29 AND 2048),
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The edge reads the list of tenants; it writes values and never deletes one.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON tenant_privacy FROM txproc_app;
GRANT SELECT ON tenant_privacy TO txproc_app;
REVOKE UPDATE, DELETE, TRUNCATE ON personal_values FROM txproc_app;
GRANT SELECT, INSERT ON personal_values TO txproc_app;
