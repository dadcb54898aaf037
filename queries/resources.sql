-- name: ResourcesGet :many
SELECT resource_id, etag, snapshot, deleted
FROM stagesync.resources
WHERE target = @target AND resource_id = ANY (@resource_ids::text[]);

-- name: ResourceUpsert :batchexec
INSERT INTO stagesync.resources (target, resource_id, etag, snapshot, deleted, fetched_at, updated_at, last_change_id)
VALUES (@target, @resource_id, @etag, @snapshot, @deleted, @fetched_at, now(), @last_change_id)
ON CONFLICT (target, resource_id) DO UPDATE
SET etag = EXCLUDED.etag,
    snapshot = EXCLUDED.snapshot,
    deleted = EXCLUDED.deleted,
    fetched_at = coalesce(EXCLUDED.fetched_at, stagesync.resources.fetched_at),
    updated_at = now(),
    last_change_id = coalesce(EXCLUDED.last_change_id, stagesync.resources.last_change_id);

-- name: ResourceLocksTry :many
-- Session-level advisory locks, one per resource, taken without waiting so
-- two jobs holding overlapping resources can never deadlock. The key is a
-- 64-bit hash of target and id; a collision only serializes two resources.
SELECT r.id::text AS resource_id,
       pg_try_advisory_lock(hashtextextended(@target::text || '/' || r.id, 0)) AS locked
FROM unnest(@resource_ids::text[]) AS r (id);

-- name: ResourceLocksReleaseAll :exec
SELECT pg_advisory_unlock_all();
