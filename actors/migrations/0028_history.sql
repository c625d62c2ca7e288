-- Account history, transfer queries and balances at an instant (docs/design.md, "History
-- and queries"), served from these tables by the front's own pool, never by the shards.
--
-- Every list is keyset-paginated on ("timestamp", id), so each index ends with both: a page
-- is one ordered range scan that stops after limit + 1 rows, however deep the cursor.
-- Each index costs every committed transfer one more B-tree insertion (docs/design.md §2
-- measured about 1.5 us per row for one keyed by account); the write benchmark before and
-- after this migration is reported in docs/design.md §13.

-- GET /v1/accounts/{id}/transfers and the balances at an instant: an account's legs, one
-- index per side (a transfer's two accounts differ, so the sides never repeat a row).
CREATE INDEX transfers_debit_history ON transfers (debit_account_id, "timestamp", id);
CREATE INDEX transfers_credit_history ON transfers (credit_account_id, "timestamp", id);

-- GET /v1/transfers?code=&user_data=: a tenant's transfers in time order; code and
-- user_data filter that scan, a bounded number of rows per request
-- (processor.history.QUERY_SCAN_ROWS_MAX). One index serves every combination of filters;
-- an index per filter would cost every transfer another insertion for each.
CREATE INDEX transfers_tenant_history ON transfers (tenant, "timestamp", id);
