-- A change whose merged write conflicted a second time waits for a retry
-- job. The read before that write may already have settled some of its
-- fields: the remote held its value (already_equal), or a policy kept the
-- remote's (kept_theirs). settled records those decisions for the retry,
-- which drops the fields instead of merging them again against a newer
-- read, where a person's later edit would look like a change to undo.
-- Set only while the change is open (a terminal change has none, so a
-- requeued change starts afresh); not insertable by the upstream role
-- (its INSERT grant names its columns).

-- +goose Up
ALTER TABLE stagesync.changes ADD COLUMN settled jsonb;

-- +goose Down
ALTER TABLE stagesync.changes DROP COLUMN settled;
