-- Webhook endpoints that tenants manage through the API (POST /v1/webhook_endpoints,
-- docs/payments.md "Webhook endpoints"). An endpoint is a subscriber of the outbox like
-- those of `txproc serve --event-subscriber` (0004), so it gets the relay's retries,
-- backoff, dead letters and replay unchanged; what sets it apart:
--
-- * tenant: the tenant slot (processor.identity.tenant_slot, in decimal, as principals
--   carry it) whose events it receives; NULL for an operator's subscriber, which receives
--   every tenant's events;
-- * event_types: the event types it wants; NULL for every type;
-- * secret: the key its deliveries are signed with (32 bytes, shown to the tenant once);
--   NULL for an operator's subscriber, signed with the relay's key. Stored as it is: the
--   relay needs the key itself to sign (the database is inside the trust boundary, as for
--   client_keys, 0014);
-- * removed_at: when the tenant removed it. The row stays (deliveries already made and
--   dead letters refer to it); it is inactive and never active again.
--
-- Endpoint names are their ids (we_ and 24 hex digits); `--event-subscriber` refuses such
-- names, so an operator's flags never take over or deactivate a tenant's endpoint.
ALTER TABLE event_subscribers
    ADD COLUMN tenant      text CHECK (tenant ~ '^[0-9]{1,19}$'),
    ADD COLUMN event_types text[] CHECK (cardinality(event_types) BETWEEN 1 AND 32),
    ADD COLUMN secret      bytea CHECK (octet_length(secret) = 32),
    ADD COLUMN removed_at  timestamptz,
    ADD CONSTRAINT event_subscribers_endpoint CHECK (
        (tenant IS NULL AND secret IS NULL AND event_types IS NULL AND removed_at IS NULL)
        OR (tenant IS NOT NULL AND secret IS NOT NULL AND name ~ '^we_[0-9a-f]{24}$')),
    ADD CONSTRAINT event_subscribers_removed CHECK (removed_at IS NULL OR NOT active);

-- A tenant's endpoints, for its listing (by id) and for the fan-out of each of its events.
CREATE INDEX event_subscribers_tenant ON event_subscribers (tenant, name)
    WHERE tenant IS NOT NULL AND removed_at IS NULL;
