-- Principals of the payments domain become <tenant slot>/<subject>
-- (processor.identity.principal_of), so that Idempotency-Keys are scoped by tenant and
-- principal and payments are visible to every principal of their tenant. Rows written
-- before tenants existed belong to the tenant "default" (slot 538834666855030335).

UPDATE payments SET principal = '538834666855030335/' || principal
    WHERE position('/' in principal) = 0;
UPDATE payouts SET principal = '538834666855030335/' || principal
    WHERE position('/' in principal) = 0;
UPDATE idempotency_keys SET principal = '538834666855030335/' || principal
    WHERE position('/' in principal) = 0;
