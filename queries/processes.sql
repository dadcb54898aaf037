-- Queries of process liveness (processor/liveness.go). A `stagesync run`
-- process holds the session-level advisory lock lock_key on a dedicated
-- connection for its whole life; stagesync.live_processes() and
-- stagesync.rescue_dead_processes() (migration 00008) read pg_locks to tell
-- who is alive.

-- name: ProcessLockTry :one
-- Session-level, not transaction-level: the lock must outlive every
-- transaction and end only with the session, i.e. with the process.
SELECT pg_try_advisory_lock(@lock_key::bigint) AS locked;

-- name: ProcessRegister :exec
-- Called on the locked connection after the lock is taken, so no other
-- process ever sees this row without its lock (it would declare us dead).
-- Also after a reconnect: the row may have been forgotten meanwhile.
WITH registered AS (
    INSERT INTO stagesync.processes (client_id, lock_key, hostname, pid, targets)
    VALUES (@client_id, @lock_key, @hostname, @pid, @targets::text[])
    ON CONFLICT (client_id) DO UPDATE
    SET lock_key = EXCLUDED.lock_key,
        hostname = EXCLUDED.hostname,
        pid = EXCLUDED.pid,
        targets = EXCLUDED.targets,
        heartbeat_at = now()
    RETURNING client_id
)
SELECT pg_notify('stagesync_coord', 'processes') FROM registered;

-- name: ProcessHeartbeat :execrows
-- 0 rows: another process found us without our lock (our connection
-- dropped) and forgot us; the caller registers again.
UPDATE stagesync.processes
SET heartbeat_at = now()
WHERE client_id = @client_id AND lock_key = @lock_key;

-- name: ProcessUnregister :exec
-- A clean exit: the row (and its target_health rows) go, and the other
-- processes take a larger share of the targets' rate limits at once.
WITH gone AS (
    DELETE FROM stagesync.processes WHERE client_id = @client_id RETURNING client_id
)
SELECT pg_notify('stagesync_coord', 'processes') FROM gone;

-- name: ProcessUnlock :exec
SELECT pg_advisory_unlock(@lock_key::bigint);

-- name: ProcessesRescueDead :many
-- Hands back the running jobs of processes that no longer hold their lock
-- and forgets those whose heartbeat is older than forget_after. One row per
-- dead process still remembered.
SELECT r.client_id::text AS client_id, r.jobs::integer AS jobs, r.forgotten::boolean AS forgotten
FROM stagesync.rescue_dead_processes(@self::text, make_interval(secs => @forget_after_seconds::float8))
    AS r (client_id, jobs, forgotten);

-- name: ProcessesLivePerTarget :many
-- How many other live processes serve each target: this process's share of
-- a target's rate limit is rate_limit / (others + 1).
SELECT t.target::text AS target, count(*)::integer AS others
FROM stagesync.live_processes() AS lp (client_id, targets),
     unnest(lp.targets) AS t (target)
WHERE lp.client_id <> @self::text
GROUP BY t.target
ORDER BY t.target;
