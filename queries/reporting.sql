-- name: BacklogList :many
SELECT target, pending, processing,
       coalesce(extract(epoch FROM oldest_pending_age), 0)::float8 AS oldest_pending_seconds
FROM stagesync.backlog
ORDER BY target;

-- name: ConflictRatesSince :many
SELECT target, hour, requests, conflicts, conflict_rate, applied, merged, noop, dead, rejected,
       coalesce(p50_ms, 0)::float8 AS p50_ms, coalesce(p95_ms, 0)::float8 AS p95_ms
FROM stagesync.conflict_rates
WHERE hour >= @since::timestamptz
ORDER BY hour, target;

-- name: DeadLettersLatest :many
SELECT * FROM stagesync.dead_letters LIMIT @max;

-- name: ChangesCountByStatus :many
SELECT target, status, count(*) AS n
FROM stagesync.changes
GROUP BY target, status
ORDER BY target, status;

-- name: Requeue :one
SELECT stagesync.requeue(
    ids => sqlc.narg(ids)::bigint[],
    target => sqlc.narg(target)::text,
    since => sqlc.narg(since)::timestamptz,
    until => sqlc.narg(until)::timestamptz,
    include_rejected => @include_rejected::boolean
)::integer AS moved;

-- name: RiverQueueDepth :many
SELECT queue::text AS queue, state::text AS state, jobs::bigint AS jobs
FROM stagesync.river_queue_depth();
