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

-- name: StatusTargetHealth :many
-- Per target: its pause (throttling, for every process) and what each live
-- process sees of it (one target_health row per target and process; none
-- for a target no process serves).
SELECT t.name AS target, t.paused_until, t.pause_reason,
       h.client_id, p.hostname, p.pid, h.inflight_limit, h.concurrency, h.rate_share,
       h.last_success_at, h.last_error_at, h.last_error, h.consecutive_failures,
       h.updated_at
FROM stagesync.targets t
LEFT JOIN stagesync.target_health h ON h.target = t.name
LEFT JOIN stagesync.processes p ON p.client_id = h.client_id
ORDER BY t.name, p.hostname, p.pid, h.client_id;

-- name: StatusProcesses :many
-- The live `stagesync run` processes.
SELECT client_id, hostname, pid, targets, started_at, heartbeat_at
FROM stagesync.processes
ORDER BY hostname, pid, client_id;

-- name: StatusHotResources :many
-- The hottest resources since a time (stagesync.hot_resources_since).
SELECT h.target::text AS target, h.resource_id::text AS resource_id,
       h.requests::bigint AS requests, h.conflicts::bigint AS conflicts,
       h.conflict_rate::float8 AS conflict_rate, h.merges::bigint AS merges,
       h.needs_review::bigint AS needs_review,
       coalesce(h.last_conflict_at, 'epoch'::timestamptz)::timestamptz AS last_conflict_at,
       h.changed_fields::text[] AS changed_fields
FROM stagesync.hot_resources_since(@since::timestamptz, @max_rows::integer)
    AS h (target, resource_id, requests, conflicts, conflict_rate, merges, needs_review,
          last_conflict_at, changed_fields);

-- name: StatusTargetAlerts :many
-- Each target's conflict-rate alert threshold as its process registered it
-- (settings.alert.conflict_rate; 0 for a target registered before the key
-- existed).
SELECT name AS target, coalesce((settings #>> '{alert,conflict_rate}')::float8, 0)::float8 AS conflict_rate
FROM stagesync.targets
ORDER BY name;

-- name: WatchBaseline :one
-- Where `status --watch` starts counting: every change open now has an id
-- >= low_id, and any change opened later (a late-committing insert, a
-- requeue) finishes after since. Run in the same snapshot as the first
-- WatchFinishedCount, whose count is the baseline subtracted later.
SELECT coalesce(
           (SELECT min(o.id) FROM stagesync.changes o WHERE o.status IN ('pending', 'processing')),
           (SELECT coalesce(max(a.id), 0) + 1 FROM stagesync.changes a))::bigint AS low_id,
       now()::timestamptz AS since;

-- name: WatchFinishedCount :one
-- Finished changes that belong to the watch (see WatchBaseline). Unlike
-- finished_at >= start alone, this never misses a change whose recording
-- transaction began before the watch and committed after it (finished_at is
-- that transaction's start), so done + open never shrinks.
SELECT count(*)::bigint AS n
FROM stagesync.changes
WHERE finished_at IS NOT NULL
  AND (id >= @low_id::bigint OR finished_at >= @since::timestamptz);

-- name: TargetsRegistered :many
-- The registered targets as `targets sync` and `check` compare them with a
-- config.
SELECT name, base_url, item_path, update_method, settings
FROM stagesync.targets
ORDER BY name;

-- name: CheckResourceID :one
-- A resource id `check` can GET: the target's most recently stored
-- resource, else its latest staged change's; empty when there is none.
SELECT coalesce(
           (SELECT r.resource_id FROM stagesync.resources r
            WHERE r.target = @target AND NOT r.deleted AND r.etag IS NOT NULL
            ORDER BY r.updated_at DESC LIMIT 1),
           (SELECT c.resource_id FROM stagesync.changes c
            WHERE c.target = @target AND c.op <> 'create'
            ORDER BY c.id DESC LIMIT 1),
           '')::text AS resource_id;

-- name: StatusTableSizes :many
-- The tables that grow with traffic and what they hold: size on disk with
-- indexes and TOAST, and the planner's row estimate (-1 before the first
-- ANALYZE). Read from the catalog, so it costs nothing however large they
-- are. River's job table is found the way River finds it.
SELECT c.relname::text AS table_name,
       pg_total_relation_size(c.oid)::bigint AS bytes,
       greatest(c.reltuples, -1)::bigint AS estimated_rows
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE (n.nspname = 'stagesync' AND c.relkind IN ('r', 'p'))
   OR c.oid = to_regclass('river_job')
ORDER BY pg_total_relation_size(c.oid) DESC, c.relname;
