-- Less work around checkpoints (docs/design.md §7, §13).
--
-- The timestamp BRIN indexes are summarized by every checkpoint
-- (brin_summarize_new_values), so autosummarize only adds work: under ingest it asks
-- autovacuum for a summarization per filled range, the work-item queue overflows, and
-- each refused request writes a LOG line carrying the whole statement (thousands a
-- minute) while the checkpoint does the summarizing anyway.
ALTER INDEX transfers_timestamp SET (autosummarize = off);
ALTER INDEX pending_resolutions_timestamp SET (autosummarize = off);

-- Balance rows are rewritten only by checkpoints, each touched account once; room left
-- on every page lets those updates stay on the page (HOT: no new index entries), which
-- shortens the checkpoint's burst of work beside the commits. Applies to pages written
-- from now on (accounts created afterwards).
ALTER TABLE accounts SET (fillfactor = 70);
