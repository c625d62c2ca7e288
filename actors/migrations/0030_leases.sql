-- Leases for the work that must run in exactly one place (docs/design.md §12, "Leases"):
-- the payments recovery worker, the outbox relay and the reconciliation scheduler. One row
-- per job. The holder renews it every second or so; once expires_at has passed (on this
-- server's clock, the one clock every contender shares) another contender may take it
-- over, and the fence goes up by one. A holder's work that a stale holder could spoil
-- checks its fence in the write's own transaction (actors/lease.py, check_fence).
-- processor/lease.py decides; actors/lease.py holds the SQL.
CREATE TABLE leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    fence bigint NOT NULL CHECK (fence >= 1),
    expires_at timestamptz NOT NULL
);

-- The service inserts, renews and takes over rows; it never deletes one (a released lease
-- is one whose expires_at is in the past, so its fence survives the release).
REVOKE DELETE, TRUNCATE ON leases FROM txproc_app;
