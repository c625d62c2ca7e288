-- Revoked bearer tokens (docs/security.md, "Tokens"). A row revokes either one token, by
-- its id (jti), or every token of a subject of a tenant issued up to revoked_at (to the
-- second: a token's iat is whole seconds). Written by `txproc token revoke`; every front
-- reads the rows in force twice a second. A row is kept until expires_at, by then every
-- token it covers has expired too (the longest lifetime a token is issued with).

CREATE TABLE revoked_tokens (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    jti        text,
    tenant     text,
    subject    text,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CHECK ((jti IS NOT NULL AND tenant IS NULL AND subject IS NULL)
           OR (jti IS NULL AND tenant IS NOT NULL AND subject IS NOT NULL)),
    CHECK (expires_at > revoked_at)
);
CREATE INDEX revoked_tokens_expires_at ON revoked_tokens (expires_at);
