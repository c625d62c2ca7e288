-- Per-tenant account counts for --max-accounts-per-tenant (actors/ledger/quota.py): a
-- front reserves a request's accounts here before creating them. The processor's own
-- accounts (tenant 0) are not counted. Filled from the accounts that exist, so the quota
-- holds for tenants made before it was switched on (a front starting with the quota on
-- recounts too).
CREATE TABLE tenant_accounts (
    tenant bigint PRIMARY KEY,
    accounts bigint NOT NULL CHECK (accounts >= 0)
);

INSERT INTO tenant_accounts (tenant, accounts)
SELECT tenant, count(*) FROM accounts WHERE tenant <> 0 GROUP BY tenant;
