-- Liveness of `stagesync run` processes, decided by PostgreSQL itself: each
-- process holds the session-level advisory lock stagesync.processes.lock_key
-- on a dedicated connection for its whole life, and PostgreSQL releases it
-- the moment that session ends (the process died, or its connection did).
-- No timer decides who is alive, so a live but slow job is never taken away
-- from its process, and a dead process's jobs are handed back in seconds.
--
-- Both functions read River's job table in public (db.Migrate gives
-- rivermigrate no schema; River's migrations run before ours).

-- +goose Up
-- +goose StatementBegin
-- The processes holding their liveness lock right now. pg_locks is read
-- once (materialized): it lists every lock of the server, so it is the one
-- cost of this function, a few microseconds per thousand locks held.
-- A bigint advisory key k shows in pg_locks as classid = k >> 32,
-- objid = k & 0xffffffff, objsubid = 1; lock keys are positive, so the
-- shift needs no sign handling. The lock counts only when a session of the
-- process's own login holds it: any role may take advisory locks, and one
-- holding (or queueing for) a dead process's key would otherwise keep it
-- "alive" and its jobs unrescued.
CREATE FUNCTION stagesync.live_processes()
RETURNS TABLE (client_id text, targets text[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH held AS MATERIALIZED (
        SELECT (l.classid::bigint << 32) | l.objid::bigint AS lock_key, a.usename::text AS login
        FROM pg_catalog.pg_locks l
        JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                            WHERE d.datname = pg_catalog.current_database())
    )
    SELECT p.client_id, p.targets
    FROM stagesync.processes p
    WHERE (p.lock_key, p.login) IN (SELECT held.lock_key, held.login FROM held);
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Hands back the running stagesync jobs of dead processes: a process is
-- dead when it has a processes row but no longer holds its lock. Its
-- running jobs become available at once (or discarded when River's
-- attempts are used up, as River's own rescuer does), each with an error
-- entry naming the dead process, so any live process works them next.
-- A dead process's row is kept until its heartbeat is forget_after old:
-- a job fetch the process sent just before it died can still commit after
-- its lock is gone, and such a job is handed back by a later call. Its
-- target_health rows go with it (ON DELETE CASCADE). The caller (self) is
-- never declared dead by itself: its own lock may be re-taken in a moment.
-- Two processes calling this at once hand each job back once: the UPDATE
-- re-checks state = 'running' on the row it waited for.
CREATE FUNCTION stagesync.rescue_dead_processes(self text, forget_after interval)
RETURNS TABLE (client_id text, jobs integer, forgotten boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH live AS MATERIALIZED (
        SELECT lp.client_id FROM stagesync.live_processes() lp
    ),
    dead AS MATERIALIZED (
        SELECT p.client_id, p.heartbeat_at
        FROM stagesync.processes p
        WHERE p.client_id <> rescue_dead_processes.self
          AND p.client_id NOT IN (SELECT live.client_id FROM live)
    ),
    rescued AS (
        UPDATE public.river_job j
        SET state = CASE WHEN j.attempt >= j.max_attempts
                         THEN 'discarded'::public.river_job_state
                         ELSE 'available'::public.river_job_state END,
            -- To the front of its queue (River fetches by priority, then
            -- scheduled_at): the dead process's work was started first and
            -- goes first, ahead of the jobs waiting (another process's
            -- claim may have queued those with an earlier scheduled_at).
            scheduled_at = LEAST(j.scheduled_at, now(),
                                 (SELECT min(o.scheduled_at) FROM public.river_job o
                                  WHERE o.state = 'available' AND o.queue = j.queue)),
            finalized_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
            errors = pg_catalog.array_append(j.errors, pg_catalog.jsonb_build_object(
                'at', now(),
                'attempt', GREATEST(j.attempt, 0),
                'error', pg_catalog.format(
                    'process %s died (PostgreSQL ended its session and released its liveness lock); job handed back by %s',
                    j.attempted_by[pg_catalog.cardinality(j.attempted_by)], rescue_dead_processes.self),
                'trace', '')),
            metadata = j.metadata || pg_catalog.jsonb_build_object(
                'stagesync:rescued_from', j.attempted_by[pg_catalog.cardinality(j.attempted_by)])
        WHERE j.state = 'running'
          AND j.kind LIKE 'stagesync\_%'
          AND j.attempted_by[pg_catalog.cardinality(j.attempted_by)] IN (SELECT dead.client_id FROM dead)
        RETURNING j.attempted_by[pg_catalog.cardinality(j.attempted_by)] AS client_id
    ),
    forgotten AS (
        DELETE FROM stagesync.processes p
        USING dead
        WHERE p.client_id = dead.client_id
          AND dead.heartbeat_at < now() - rescue_dead_processes.forget_after
        RETURNING p.client_id
    )
    SELECT dead.client_id,
           (SELECT count(*) FROM rescued r WHERE r.client_id = dead.client_id)::integer,
           EXISTS (SELECT 1 FROM forgotten f WHERE f.client_id = dead.client_id)
    FROM dead
    ORDER BY dead.client_id;
$$;
-- +goose StatementEnd

REVOKE ALL ON FUNCTION stagesync.live_processes() FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.rescue_dead_processes(text, interval) FROM PUBLIC;
-- Operators may ask which processes are alive (status, the status page).
GRANT EXECUTE ON FUNCTION stagesync.live_processes() TO stagesync_reporting;

-- +goose Down
REVOKE ALL ON FUNCTION stagesync.live_processes() FROM stagesync_reporting;
DROP FUNCTION stagesync.rescue_dead_processes(text, interval);
DROP FUNCTION stagesync.live_processes();
