-- Each claim of an Idempotency-Key gets a random fence (actors/payments/store.py): only
-- the request holding the current claim may store the key's answer or release it, so a
-- request whose claim lapsed and was taken over can neither overwrite its successor's
-- answer nor delete its claim. Rows claimed before this migration carry 0, which no new
-- claim takes.
ALTER TABLE idempotency_keys ADD COLUMN claim bigint NOT NULL DEFAULT 0;
