-- Multiple partial captures (docs/payments.md, "Captures"). A payment's captures are its
-- capture steps; the authorization's ledger hold is one pending transfer at a time, so a
-- capture that is not final posts its part and holds the rest again as a new pending
-- transfer (hold_transfer_id moves to it), and capturable_amount says what it holds.

-- What the authorization's hold still holds: what may still be captured. Payments
-- authorized before this migration hold all of their amount until captured or voided.
ALTER TABLE payments ADD COLUMN capturable_amount bigint NOT NULL DEFAULT 0
    CHECK (capturable_amount >= 0);
UPDATE payments SET capturable_amount = amount WHERE status = 'authorized';
-- Never more captured (and still held) than was authorized.
ALTER TABLE payments ADD CONSTRAINT payments_capture_within_authorized
    CHECK (captured_amount + capturable_amount <= amount);

-- capture: whether it closes the authorization (every capture before this one did).
ALTER TABLE payment_steps ADD COLUMN final_capture boolean NOT NULL DEFAULT true;
-- refund: the capture step it refunds (0: the payment as a whole).
ALTER TABLE payment_steps ADD COLUMN capture_id bigint NOT NULL DEFAULT 0;
-- capture, void: what the authorization's hold held when the step was created; a partial
-- capture: the timeout of the new hold of the rest (the time the old one had left).
ALTER TABLE payment_steps ADD COLUMN hold_amount bigint NOT NULL DEFAULT 0
    CHECK (hold_amount >= 0);
ALTER TABLE payment_steps ADD COLUMN hold_timeout_s bigint NOT NULL DEFAULT 0
    CHECK (hold_timeout_s >= 0);
