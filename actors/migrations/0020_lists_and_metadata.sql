-- Lists of payments, payouts and refunds (GET /v1/payments, /v1/payouts, /v1/refunds) and
-- the metadata clients attach to them (docs/payments.md "Lists and metadata").
--
-- metadata: at most 20 string pairs (processor.payments.listing.check_metadata), on the
-- payment or payout, and on a refund's step. The default is a constant, so adding the
-- column rewrites no table.
ALTER TABLE payments ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(metadata) = 'object');
ALTER TABLE payouts ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(metadata) = 'object');
ALTER TABLE payment_steps ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(metadata) = 'object');

-- A list is one tenant's rows, newest first (creation time, then id), from a cursor. The
-- tenant is the slot in front of the principal (processor.identity.principal_of), the
-- same expression the store's queries use, so a page is a walk of one index range.
CREATE INDEX payments_tenant_created ON payments
    ((split_part(principal, '/', 1)), created_at DESC, id DESC);
CREATE INDEX payouts_tenant_created ON payouts
    ((split_part(principal, '/', 1)), created_at DESC, id DESC);
-- Refunds are steps; their tenant is their payment's (joined by its primary key).
CREATE INDEX payment_steps_refunds ON payment_steps (created_at DESC, id DESC)
    WHERE kind = 'refund';
-- metadata[key]=value filters: containment (@>) answered by a GIN index.
CREATE INDEX payments_metadata ON payments USING gin (metadata jsonb_path_ops);
CREATE INDEX payouts_metadata ON payouts USING gin (metadata jsonb_path_ops);
