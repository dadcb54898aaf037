-- name: ResourcesGet :many
SELECT resource_id, etag, snapshot, deleted
FROM stagesync.resources
WHERE target = @target AND resource_id = ANY (@resource_ids::text[]);

-- name: ResourcesUpsert :exec
-- Stores the last known state of many resources in one statement. Empty
-- strings stand for NULL in the parallel arrays; last_change_id 0 keeps
-- the stored one.
INSERT INTO stagesync.resources AS r (target, resource_id, etag, snapshot, deleted, fetched_at, updated_at, last_change_id)
SELECT @target::text, u.resource_id, nullif(u.etag, ''), nullif(u.snapshot, '')::jsonb, u.deleted,
       now(), now(), nullif(u.last_change_id, 0)
FROM (
    SELECT unnest(@resource_ids::text[]) AS resource_id,
           unnest(@etags::text[]) AS etag,
           unnest(@snapshots::text[]) AS snapshot,
           unnest(@deleted::boolean[]) AS deleted,
           unnest(@last_change_ids::bigint[]) AS last_change_id
) AS u
ON CONFLICT (target, resource_id) DO UPDATE
SET etag = EXCLUDED.etag,
    snapshot = EXCLUDED.snapshot,
    deleted = EXCLUDED.deleted,
    fetched_at = EXCLUDED.fetched_at,
    updated_at = now(),
    last_change_id = coalesce(EXCLUDED.last_change_id, r.last_change_id);

-- name: ResourceLocksTry :many
-- Session-level advisory locks, one per resource, taken without waiting so
-- two jobs holding overlapping resources can never deadlock. The key is a
-- 64-bit hash of target and id; a collision only serializes two resources.
SELECT r.id::text AS resource_id,
       pg_try_advisory_lock(hashtextextended(@target::text || '/' || r.id, 0)) AS locked
FROM unnest(@resource_ids::text[]) AS r (id);

-- name: ResourceLocksReleaseAll :exec
SELECT pg_advisory_unlock_all();
