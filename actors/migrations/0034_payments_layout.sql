-- Where a payment's ledger postings meet its provider (docs/payments.md, "Ledger model").
-- Before this version every hold and posting named the provider's one clearing account per
-- currency, which lives on one shard: a merchant account on another shard made each of
-- them a cross-shard transfer, and that one shard carried every payment. From this version
-- a provider also has a clearing account per ledger partition, and a step posts against
-- the one in its merchant account's partition, so payments' postings stay on the
-- merchant's shard (and database).
--
-- A ledger that already holds payments keeps the one account: a capture or void must name
-- the accounts of the hold it resolves, and those holds name it. An operator may switch
-- once no payment, payout or dispute has a hold open (docs/operations.md).
CREATE TABLE payments_layout (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    clearing_per_partition boolean NOT NULL
);
INSERT INTO payments_layout (clearing_per_partition)
SELECT NOT EXISTS (SELECT 1 FROM payments) AND NOT EXISTS (SELECT 1 FROM payouts);

-- The service reads it; only the owner changes it.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON payments_layout FROM txproc_app;
GRANT SELECT ON payments_layout TO txproc_app;
