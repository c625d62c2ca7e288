-- The transactional outbox of payment events (actors/outbox.py). An event is written in the
-- same transaction as the state change it reports, together with one delivery row per active
-- subscriber; a relay posts the deliveries over HTTP, at least once, and moves the ones that
-- keep failing to dead_letters, from where an operator replays them.

-- Where events go. Subscribers are never deleted, only deactivated, because deliveries and
-- dead letters refer to them; a deactivated subscriber's pending deliveries wait (parked)
-- until it is active again.
CREATE TABLE event_subscribers (
    name       text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    url        text        NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 2048),
    active     boolean     NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Append-only: the trigger below refuses UPDATE and DELETE. The id is what consumers
-- deduplicate on, so it is never reused.
CREATE TABLE events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type   text        NOT NULL CHECK (
        event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$' AND length(event_type) <= 100
    ),
    aggregate_id text        NOT NULL CHECK (length(aggregate_id) BETWEEN 1 AND 200),
    payload      jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

-- One row per (event, subscriber) until it is delivered (delivered_at set, the row stays as
-- history) or dead-lettered (the row moves to dead_letters). While an attempt is in flight,
-- next_attempt_at is the end of the relay's lease on it: if the relay dies, the delivery is
-- due again then. attempts counts attempts started, and fences a relay whose lease ran out.
-- enqueued_at starts the delivery deadline; a replay resets it.
CREATE TABLE outbox_deliveries (
    event_id        bigint      NOT NULL REFERENCES events (id),
    subscriber      text        NOT NULL REFERENCES event_subscribers (name),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    -- Short and free of secrets: a status code or an exception class, never a body or a URL.
    last_error      text        CHECK (length(last_error) BETWEEN 1 AND 200),
    delivered_at    timestamptz,
    PRIMARY KEY (event_id, subscriber),
    CHECK (delivered_at IS NULL OR attempts >= 1)
);
-- "Due and undelivered": the relay's claim walks this small index in due order.
CREATE INDEX outbox_deliveries_due ON outbox_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL;

-- Deliveries that exhausted their attempts, their deadline, or were refused for good. A
-- replay marks the row replayed and puts the delivery back; it may die again later, so a
-- delivery can have several rows here but at most one not yet replayed.
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    bigint      NOT NULL REFERENCES events (id),
    subscriber  text        NOT NULL REFERENCES event_subscribers (name),
    attempts    integer     NOT NULL CHECK (attempts >= 1),
    last_error  text        NOT NULL CHECK (length(last_error) BETWEEN 1 AND 200),
    dead_at     timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
CREATE UNIQUE INDEX dead_letters_open ON dead_letters (event_id, subscriber)
    WHERE replayed_at IS NULL;
