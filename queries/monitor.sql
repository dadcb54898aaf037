-- Queries of the monitor (processor/monitor.go): the conflict-rate alert of
-- every target, which process logs for a target, and the progress lines.
-- `status` and the status page read the alert through the same query, so the
-- log, /metrics, `status` and the page agree.

-- name: MonitorTargets :many
-- Every registered target's conflict-rate alert now, and whether it is
-- paused. The threshold and window are the ones registered in
-- targets.settings.alert by the last process (or `targets sync`) that wrote
-- the target, so every process and `status` use the same; a target
-- registered without them (an older version, a hand-written row) gets the
-- config defaults, 0.05 and 15m. Requests are the target's attempts rows
-- (every HTTP request, whatever its outcome: writes, the GETs after a
-- conflict, batch ETag lookups) made in the window; conflicts are those
-- answered 409/412. One range scan of attempts_created_idx over the longest
-- window serves every target; its cost grows with the requests in the
-- window (about 1 s per million on a 2-core machine), never with history.
WITH t AS (
    SELECT tg.name,
           CASE WHEN jsonb_typeof(tg.settings #> '{alert,conflict_rate}') = 'number'
                     AND (tg.settings #>> '{alert,conflict_rate}')::float8 > 0
                THEN (tg.settings #>> '{alert,conflict_rate}')::float8
                ELSE 0.05 END AS threshold,
           -- The window is stored as a Go duration ("15m0s"), which
           -- PostgreSQL reads as an interval; anything else gets 15m.
           CASE WHEN tg.settings #>> '{alert,window}' ~ '^([0-9]+h)?([0-9]+m)?([0-9]+(\.[0-9]+)?s)?$'
                     AND tg.settings #>> '{alert,window}' <> ''
                THEN (tg.settings #>> '{alert,window}')::interval
                ELSE interval '15 minutes' END AS alert_window,
           coalesce(tg.paused_until > now(), false) AS paused
    FROM stagesync.targets tg
)
SELECT t.name::text AS target,
       t.threshold::float8 AS threshold,
       extract(epoch FROM t.alert_window)::float8 AS window_seconds,
       count(at.target)::bigint AS requests,
       (count(at.target) FILTER (WHERE at.outcome = 'conflict'))::bigint AS conflicts,
       t.paused::boolean AS paused
FROM t
LEFT JOIN stagesync.attempts at
       ON at.target = t.name
      AND at.created_at >= now() - t.alert_window
      AND at.created_at >= now() - (SELECT max(w.alert_window) FROM t w)
GROUP BY t.name, t.threshold, t.alert_window, t.paused
ORDER BY t.name;

-- name: MonitorJITOff :exec
-- For the rest of the transaction: MonitorTargets' estimate over a busy
-- window tempts the planner into JIT compiling it, which costs more than the
-- count itself (0.6 s measured for a 1.3M-row window).
SELECT set_config('jit', 'off', true);

-- name: MonitorLoggers :many
-- Per target, the one process that logs the target's alert and progress
-- lines: of the live processes serving it (holding their liveness lock),
-- the one that started first, ties broken by client_id. A process that
-- starts later never takes the role from a running one; when the logging
-- process dies or stops, the next oldest takes over.
SELECT DISTINCT ON (t.target) t.target::text AS target, p.client_id
FROM stagesync.live_processes() AS lp (client_id, targets)
JOIN stagesync.processes p ON p.client_id = lp.client_id
CROSS JOIN LATERAL unnest(lp.targets) AS t (target)
ORDER BY t.target, p.started_at, p.client_id;

-- name: MonitorHotResources :many
-- The target's resources with the most conflicts since a time
-- (stagesync.hot_resources_since), for the alert's WARN line.
SELECT h.resource_id::text AS resource_id, h.conflicts::bigint AS conflicts,
       h.requests::bigint AS requests, h.changed_fields::text[] AS changed_fields
FROM stagesync.hot_resources_since(@since::timestamptz, NULL)
    AS h (target, resource_id, requests, conflicts, conflict_rate, merges, needs_review,
          last_conflict_at, changed_fields)
WHERE h.target = @target::text
ORDER BY h.conflicts DESC, h.resource_id
LIMIT @max_rows::integer;

-- name: MonitorProgress :many
-- One progress line's figures per target: the backlog now, and what
-- happened in [since, until): changes finished by state, requests and
-- conflicts. until is now() minus settle_seconds, so that a change whose
-- recording transaction began before until (finished_at is that
-- transaction's start) has committed when it is counted; the next line
-- starts at this line's until, so nothing is counted twice or skipped.
WITH b AS (
    SELECT now() - make_interval(secs => @settle_seconds::float8) AS until
)
SELECT t.target::text AS target,
       b.until::timestamptz AS until,
       coalesce(bl.pending, 0)::bigint AS pending,
       coalesce(bl.processing, 0)::bigint AS processing,
       coalesce(extract(epoch FROM now() - bl.oldest_pending_at), 0)::float8 AS oldest_pending_seconds,
       f.applied::bigint AS applied, f.merged::bigint AS merged, f.noop::bigint AS noop,
       f.dead::bigint AS dead, f.rejected::bigint AS rejected,
       a.requests::bigint AS requests, a.conflicts::bigint AS conflicts
FROM unnest(@targets::text[]) AS t (target)
CROSS JOIN b
LEFT JOIN stagesync.backlog bl ON bl.target = t.target
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE c.status = 'applied') AS applied,
           count(*) FILTER (WHERE c.status = 'merged') AS merged,
           count(*) FILTER (WHERE c.status = 'noop') AS noop,
           count(*) FILTER (WHERE c.status = 'dead') AS dead,
           count(*) FILTER (WHERE c.status = 'rejected') AS rejected
    FROM stagesync.changes c
    WHERE c.finished_at >= @since::timestamptz AND c.finished_at < b.until AND c.target = t.target
) f
CROSS JOIN LATERAL (
    SELECT count(*) AS requests, count(*) FILTER (WHERE at.outcome = 'conflict') AS conflicts
    FROM stagesync.attempts at
    WHERE at.created_at >= @since::timestamptz AND at.created_at < b.until AND at.target = t.target
) a
ORDER BY t.target;
