-- The ledger's tables. Transfers, failures and resolutions are append-only; the balance
-- columns of accounts are a running sum maintained in the same transaction as the
-- transfers that change them, so a row always equals the sum of its committed postings.

CREATE TABLE accounts (
    id              bigint   PRIMARY KEY CHECK (id > 0),
    currency        char(3)  NOT NULL,
    flags           integer  NOT NULL,
    code            integer  NOT NULL,
    user_data       text     NOT NULL,
    debits_pending  bigint   NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted   bigint   NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending bigint   NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted  bigint   NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    "timestamp"     bigint   NOT NULL,
    partition       integer  NOT NULL
);
CREATE INDEX accounts_partition ON accounts (partition);

CREATE TABLE transfers (
    id                bigint  PRIMARY KEY CHECK (id > 0),
    debit_account_id  bigint  NOT NULL,
    credit_account_id bigint  NOT NULL,
    amount            bigint  NOT NULL CHECK (amount > 0),
    currency          char(3) NOT NULL,
    flags             integer NOT NULL,
    pending_id        bigint  NOT NULL,
    timeout_s         integer NOT NULL,
    code              integer NOT NULL,
    user_data         text    NOT NULL,
    "timestamp"       bigint  NOT NULL,
    -- The partition of the debit account: the shard owning it coordinated this transfer
    -- and owns it if it is pending.
    partition         integer NOT NULL
);
-- Open holds are found at recovery by partition among pending transfers.
CREATE INDEX transfers_pending_partition ON transfers (partition) WHERE (flags & 2) <> 0;

-- A transfer id that failed on a rule depending on ledger state; it can never succeed.
CREATE TABLE failed_transfers (
    id          bigint   PRIMARY KEY,
    result      smallint NOT NULL,
    "timestamp" bigint   NOT NULL
);

-- How each pending transfer was resolved; the primary key makes resolution happen once.
-- kind: 1 posted, 2 voided, 3 expired. transfer_id is the post/void transfer (0 if expired).
CREATE TABLE pending_resolutions (
    pending_id  bigint   PRIMARY KEY,
    kind        smallint NOT NULL CHECK (kind IN (1, 2, 3)),
    transfer_id bigint   NOT NULL,
    "timestamp" bigint   NOT NULL
);

-- Each shard incarnation takes the next epoch at recovery. Commits lock the epochs they
-- depend on FOR SHARE, so a zombie incarnation can never commit after its successor
-- started (docs/design.md, "Fencing").
CREATE TABLE shard_epochs (
    shard integer PRIMARY KEY,
    epoch bigint  NOT NULL
);

-- The partition map as data: partition -> shard -> database. Written once at first start;
-- a later start with another layout is refused rather than silently re-sharding.
CREATE TABLE partition_map (
    partition    integer PRIMARY KEY,
    shard        integer NOT NULL,
    database_key text    NOT NULL
);
