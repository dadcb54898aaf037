-- name: ConflictRatesSince :many
SELECT r.target::text AS target, r.hour::timestamptz AS hour,
       r.requests::bigint AS requests, r.conflicts::bigint AS conflicts,
       r.conflict_rate::float8 AS conflict_rate,
       r.applied::bigint AS applied, r.merged::bigint AS merged, r.noop::bigint AS noop,
       r.dead::bigint AS dead, r.rejected::bigint AS rejected,
       coalesce(r.p50_ms, 0)::float8 AS p50_ms, coalesce(r.p95_ms, 0)::float8 AS p95_ms
FROM stagesync.conflict_rates_since(@since::timestamptz)
    AS r (target, hour, requests, conflicts, conflict_rate, applied, merged, noop,
          dead, rejected, p50_ms, p95_ms)
ORDER BY 2, 1;

-- name: DeadLettersLatest :many
SELECT * FROM stagesync.dead_letters LIMIT @max;

-- name: ChangesCountByStatus :many
SELECT target, status, count(*) AS n
FROM stagesync.changes
GROUP BY target, status
ORDER BY target, status;

-- name: Requeue :one
-- With no filter, stagesync.requeue refuses unless everything is true.
SELECT stagesync.requeue(
    ids => sqlc.narg(ids)::bigint[],
    target => sqlc.narg(target)::text,
    since => sqlc.narg(since)::timestamptz,
    until => sqlc.narg(until)::timestamptz,
    include_rejected => @include_rejected::boolean,
    everything => @everything::boolean
)::integer AS moved;

-- name: RiverQueueDepth :many
SELECT queue::text AS queue, state::text AS state, jobs::bigint AS jobs
FROM stagesync.river_queue_depth();

-- name: ChangesMissing :many
-- The ids among @ids that no change has (never staged, or removed by
-- retention), so that requeue --id can say so instead of moving 0 quietly.
SELECT u.id::bigint AS id
FROM unnest(@ids::bigint[]) AS u (id)
WHERE NOT EXISTS (SELECT 1 FROM stagesync.changes c WHERE c.id = u.id)
ORDER BY u.id;
