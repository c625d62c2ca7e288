-- Account-ordered history, written off the commit path (docs/design.md §16).
--
-- One row per movement of an account: each leg of a transfer, and each expiry of a
-- pending transfer (which releases its hold at the expiry's instant). Rows are appended by
-- ONE background indexer (actors/ledger/indexer.py), never by the shards' commits: it reads
-- the transfers and expiries committed at or below the history horizon in timestamp
-- windows and inserts each window's rows sorted by account, in the same transaction that
-- advances account_history_position. So every movement with a timestamp at or below the
-- position is here exactly once, and none above it.
--
-- It is derived data: `TRUNCATE account_history; UPDATE account_history_position SET
-- "timestamp" = 0;` (as the owner) rebuilds it from the transfers, and `txproc verify`
-- compares it with a recomputation.
CREATE TABLE account_history (
    account_id      bigint   NOT NULL,
    "timestamp"     bigint   NOT NULL,
    -- The transfer; for an expiry, the pending transfer that expired.
    transfer_id     bigint   NOT NULL,
    -- 1: the account is the transfer's debit account; 2: its credit account.
    side            smallint NOT NULL CHECK (side IN (1, 2)),
    -- An expiry (no transfer of its own at this instant), listed in no history page.
    expiry          boolean  NOT NULL,
    -- The movement's effect on that side's pending and posted balances (a post or void
    -- releases its hold's whole amount from pending; an expiry likewise).
    pending_delta   bigint   NOT NULL,
    posted_delta    bigint   NOT NULL CHECK (posted_delta >= 0),
    -- For accounts with the `history` flag (4): the four balances after this movement,
    -- counting every movement of the account up to it in (timestamp, transfer_id) order.
    -- NULL for other accounts.
    debits_pending  bigint,
    debits_posted   bigint,
    credits_pending bigint,
    credits_posted  bigint,
    PRIMARY KEY (account_id, "timestamp", transfer_id)
);

-- Every movement at or below this timestamp is in account_history (one row, id 1).
CREATE TABLE account_history_position (
    id          smallint PRIMARY KEY CHECK (id = 1),
    "timestamp" bigint   NOT NULL CHECK ("timestamp" >= 0)
);
INSERT INTO account_history_position (id, "timestamp") VALUES (1, 0);

-- The indexer finds the (usually few) accounts with the history flag in each window.
CREATE INDEX accounts_history_flag ON accounts (id) WHERE (flags & 4) <> 0;

-- The service appends rows and moves the position; rebuilding is the owner's.
REVOKE ALL ON account_history, account_history_position FROM txproc_app;
GRANT SELECT, INSERT ON account_history TO txproc_app;
GRANT SELECT, UPDATE ON account_history_position TO txproc_app;
