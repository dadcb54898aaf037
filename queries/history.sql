-- Queries of `stagesync history` and the status page's history pages: one
-- change, or one resource, from staging to the end. Every lookup goes by an
-- index (changes by id, attempts and merges by resource, resources by key).

-- name: HistoryChangesGet :many
SELECT id, target, resource_id, op, fields, source, idempotency_key, status, attempts,
       last_error, outcome_detail, applied_etag, created_at, updated_at, finished_at
FROM stagesync.changes
WHERE id = ANY (@ids::bigint[])
ORDER BY id;

-- name: HistoryChangeEvents :many
-- Empty strings and status 0 stand for the NULLs of events that are not
-- requests (sqlc can't type a function's nullable columns).
SELECT h.at::timestamptz AS at, h.event::text AS event, coalesce(h.method, '')::text AS method,
       coalesce(h.url, '')::text AS url, coalesce(h.status_code, 0)::integer AS status_code,
       coalesce(h.outcome, '')::text AS outcome, h.detail::jsonb AS detail
FROM stagesync.change_history(@id::bigint)
    AS h (at, event, method, url, status_code, outcome, detail);

-- name: HistoryResourceEvents :many
-- NULLs as in HistoryChangeEvents.
SELECT h.at::timestamptz AS at, h.event::text AS event, h.change_ids::bigint[] AS change_ids,
       coalesce(h.method, '')::text AS method, coalesce(h.url, '')::text AS url,
       coalesce(h.status_code, 0)::integer AS status_code, coalesce(h.outcome, '')::text AS outcome,
       h.detail::jsonb AS detail
FROM stagesync.resource_history(@target::text, @resource_id::text)
    AS h (at, event, change_ids, method, url, status_code, outcome, detail);

-- name: HistoryResourceGet :one
-- What stagesync knows of the resource now: the ETag If-Match will send, the
-- snapshot the next merge starts from, and a write whose outcome is unknown.
SELECT etag, snapshot, deleted, fetched_at, updated_at, last_change_id, in_doubt, field_versions
FROM stagesync.resources
WHERE target = @target AND resource_id = @resource_id;

-- name: HistoryResourceTargets :many
-- The targets that know a resource id, for a search that names no target.
-- One index probe per target: stagesync knows a resource once it has a
-- stored state, a request about it, an open change or a change that ended
-- without a request of its own (changes_quiet_end_idx).
SELECT t.name::text AS target
FROM stagesync.targets t
WHERE EXISTS (SELECT 1 FROM stagesync.resources r WHERE r.target = t.name AND r.resource_id = @resource_id)
   OR EXISTS (SELECT 1 FROM stagesync.attempts a WHERE a.target = t.name AND a.resource_id = @resource_id)
   OR EXISTS (SELECT 1 FROM stagesync.changes c
              WHERE c.resource_id = @resource_id AND c.target = t.name
                AND c.status IN ('pending', 'processing'))
   OR EXISTS (SELECT 1 FROM stagesync.changes c
              WHERE c.target = t.name AND c.resource_id = @resource_id
                AND c.status IN ('noop', 'rejected', 'dead'))
ORDER BY t.name;
