-- name: ResourcesGet :many
SELECT resource_id, etag, etag_raw, snapshot, snapshot_fields, deleted, field_versions, in_doubt,
       write_version, delete_version
FROM stagesync.resources
WHERE target = @target AND resource_id = ANY (@resource_ids::text[]);

-- name: ResourcesUpsert :exec
-- Stores the last known state of many resources in one statement. Empty
-- strings stand for NULL in the parallel arrays; last_change_id 0 keeps
-- the stored one, and it never goes back (GREATEST ignores NULL): a
-- late-committed lower id finishing after a higher one leaves the higher.
-- snapshot_fields is a JSON array of field names (the fields a partial
-- snapshot covers) or '' for a whole representation. The
-- caller holds each resource's lock and read field_versions and in_doubt
-- under it, so it writes them whole. write_version and delete_version
-- (0: none) never go back, like last_change_id.
INSERT INTO stagesync.resources AS r (target, resource_id, etag, etag_raw, snapshot, snapshot_fields,
    deleted, fetched_at, updated_at, last_change_id, field_versions, in_doubt, write_version,
    delete_version)
SELECT @target::text, u.resource_id, nullif(u.etag, ''), u.etag_raw, nullif(u.snapshot, '')::jsonb,
       CASE WHEN u.snapshot_fields = '' THEN NULL
            ELSE ARRAY(SELECT jsonb_array_elements_text(u.snapshot_fields::jsonb)) END,
       u.deleted, now(), now(), nullif(u.last_change_id, 0),
       u.field_versions::jsonb, nullif(u.in_doubt, '')::jsonb, nullif(u.write_version, 0),
       nullif(u.delete_version, 0)
FROM (
    SELECT unnest(@resource_ids::text[]) AS resource_id,
           unnest(@etags::text[]) AS etag,
           unnest(@etag_raws::bytea[]) AS etag_raw,
           unnest(@snapshots::text[]) AS snapshot,
           unnest(@snapshot_fields::text[]) AS snapshot_fields,
           unnest(@deleted::boolean[]) AS deleted,
           unnest(@last_change_ids::bigint[]) AS last_change_id,
           unnest(@field_versions::text[]) AS field_versions,
           unnest(@in_doubts::text[]) AS in_doubt,
           unnest(@write_versions::bigint[]) AS write_version,
           unnest(@delete_versions::bigint[]) AS delete_version
) AS u
ON CONFLICT (target, resource_id) DO UPDATE
SET etag = EXCLUDED.etag,
    etag_raw = EXCLUDED.etag_raw,
    snapshot = EXCLUDED.snapshot,
    snapshot_fields = EXCLUDED.snapshot_fields,
    deleted = EXCLUDED.deleted,
    fetched_at = EXCLUDED.fetched_at,
    updated_at = now(),
    last_change_id = GREATEST(EXCLUDED.last_change_id, r.last_change_id),
    field_versions = EXCLUDED.field_versions,
    in_doubt = EXCLUDED.in_doubt,
    write_version = GREATEST(EXCLUDED.write_version, r.write_version),
    delete_version = GREATEST(EXCLUDED.delete_version, r.delete_version);

-- name: ResourceLocksTry :many
-- Session-level advisory locks, one per resource, taken without waiting so
-- two jobs holding overlapping resources can never deadlock. The key is a
-- 64-bit hash of target and id; a collision only serializes two resources.
SELECT r.id::text AS resource_id,
       pg_try_advisory_lock(hashtextextended(@target::text || '/' || r.id, 0)) AS locked
FROM unnest(@resource_ids::text[]) AS r (id);

-- name: ResourceLocksReleaseAll :exec
SELECT pg_advisory_unlock_all();

-- name: ResourceMarkInDoubt :exec
-- Keeps a write whose answer could not be recorded as the resource's
-- in-doubt write, touching nothing else.
INSERT INTO stagesync.resources AS r (target, resource_id, in_doubt)
VALUES (@target, @resource_id, @in_doubt::jsonb)
ON CONFLICT (target, resource_id) DO UPDATE
SET in_doubt = EXCLUDED.in_doubt, updated_at = now();
