-- Queries of the operator surface: `stagesync status`, the status page and
-- the scrape-time gauges of /metrics. All of them stay cheap with millions
-- of finished rows: they read the open-change index, the finished_at index
-- or attempts_created_idx (created_at).

-- name: StatusBacklog :many
-- Backlog per configured target. oldest_pending_at means something only
-- when pending > 0 (sqlc can't type a nullable view column, hence the
-- coalesce).
SELECT target, pending, processing,
       coalesce(oldest_pending_at, 'epoch'::timestamptz)::timestamptz AS oldest_pending_at
FROM stagesync.backlog
ORDER BY target;

-- name: AttemptsCountSince :many
-- Remote requests since a time per target, method and outcome. Batch ETag
-- lookups carry no resource id and are counted apart.
SELECT target, method, (resource_id IS NULL)::boolean AS batch, outcome, count(*)::bigint AS n
FROM stagesync.attempts
WHERE created_at >= @since::timestamptz
GROUP BY target, method, (resource_id IS NULL), outcome
ORDER BY target, method, batch, outcome;

-- name: ChangesFinishedSince :many
-- Changes that reached a terminal state since a time, per target and state:
-- the throughput of status --watch and the status page.
SELECT target, status, count(*)::bigint AS n
FROM stagesync.changes
WHERE finished_at >= @since::timestamptz
GROUP BY target, status
ORDER BY target, status;
