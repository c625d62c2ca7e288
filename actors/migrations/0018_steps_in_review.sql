-- Steps set aside for an operator (docs/runbooks/requires-review.md): still unfinished
-- long after they started, so the recovery worker stops rechecking them until someone
-- resolves them (`txproc payments review`). NULL for every other step.
ALTER TABLE payment_steps ADD COLUMN review_since timestamptz;
CREATE INDEX payment_steps_in_review ON payment_steps (review_since) WHERE review_since IS NOT NULL;
