-- Reporting views, per-change history and the requeue function (SPEC §3.3,
-- §3.5). They read the tables of 00001 and are the analysts' interface.

-- +goose Up
-- Hours are UTC hours whatever the session's time zone, so two analysts
-- in different zones see the same buckets. The function takes the start of
-- the window so dashboards read only recent rows (the view, over all time,
-- can't push a filter through its FULL JOIN).
-- +goose StatementBegin
CREATE FUNCTION stagesync.conflict_rates_since(since timestamptz)
RETURNS TABLE (target text, hour timestamptz, requests bigint, conflicts bigint,
               conflict_rate float8, applied bigint, merged bigint, noop bigint,
               dead bigint, rejected bigint, p50_ms float8, p95_ms float8)
LANGUAGE sql STABLE AS $$
WITH requests AS (
    SELECT a.target,
           date_trunc('hour', a.created_at, 'UTC') AS hour,
           count(*) AS requests,
           count(*) FILTER (WHERE a.outcome = 'conflict') AS conflicts,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms) AS p95_ms
    FROM stagesync.attempts a
    WHERE a.created_at >= date_trunc('hour', conflict_rates_since.since, 'UTC')
    GROUP BY 1, 2
), finished AS (
    SELECT c.target,
           date_trunc('hour', c.finished_at, 'UTC') AS hour,
           count(*) FILTER (WHERE c.status = 'applied') AS applied,
           count(*) FILTER (WHERE c.status = 'merged') AS merged,
           count(*) FILTER (WHERE c.status = 'noop') AS noop,
           count(*) FILTER (WHERE c.status = 'dead') AS dead,
           count(*) FILTER (WHERE c.status = 'rejected') AS rejected
    FROM stagesync.changes c
    WHERE c.finished_at >= date_trunc('hour', conflict_rates_since.since, 'UTC')
    GROUP BY 1, 2
)
SELECT coalesce(r.target, f.target)::text,
       coalesce(r.hour, f.hour)::timestamptz,
       coalesce(r.requests, 0)::bigint,
       coalesce(r.conflicts, 0)::bigint,
       (CASE WHEN coalesce(r.requests, 0) = 0 THEN 0
             ELSE round(r.conflicts::numeric / r.requests, 4) END)::float8,
       coalesce(f.applied, 0)::bigint,
       coalesce(f.merged, 0)::bigint,
       coalesce(f.noop, 0)::bigint,
       coalesce(f.dead, 0)::bigint,
       coalesce(f.rejected, 0)::bigint,
       r.p50_ms::float8,
       r.p95_ms::float8
FROM requests r
FULL JOIN finished f ON f.target = r.target AND f.hour = r.hour;
$$;
-- +goose StatementEnd

CREATE VIEW stagesync.conflict_rates AS
SELECT * FROM stagesync.conflict_rates_since('-infinity');

CREATE VIEW stagesync.backlog AS
SELECT t.name AS target,
       count(c.id) FILTER (WHERE c.status = 'pending') AS pending,
       count(c.id) FILTER (WHERE c.status = 'processing') AS processing,
       (min(c.created_at) FILTER (WHERE c.status = 'pending'))::timestamptz AS oldest_pending_at,
       (now() - min(c.created_at) FILTER (WHERE c.status = 'pending'))::interval AS oldest_pending_age
FROM stagesync.targets t
LEFT JOIN stagesync.changes c
       ON c.target = t.name AND c.status IN ('pending', 'processing')
GROUP BY t.name;

CREATE VIEW stagesync.dead_letters AS
SELECT id, target, resource_id, op, fields, status, attempts, last_error,
       source, idempotency_key, created_at, finished_at
FROM stagesync.changes
WHERE status IN ('dead', 'rejected')
ORDER BY finished_at DESC, id DESC;

-- Everything that happened to one change, in order: staged, each HTTP
-- request that carried it, each merge that decided its fields, its end.
-- +goose StatementBegin
CREATE FUNCTION stagesync.change_history(change_id bigint)
RETURNS TABLE (at timestamptz, event text, method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE AS $$
    SELECT h.at, h.event, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, 0::bigint AS seq, 'staged' AS event,
               NULL::text AS method, NULL::text AS url, NULL::integer AS status_code,
               NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM stagesync.changes c WHERE c.id = change_history.change_id
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.method, a.url, a.status_code, a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error,
                                  'change_ids', a.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.attempts a
          ON a.target = c.target AND a.resource_id = c.resource_id
         AND a.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions,
                                  'change_ids', m.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.merges m
          ON m.target = c.target AND m.resource_id = c.resource_id
         AND m.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT c.finished_at, 2, 0, 'finished', NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts)
        FROM stagesync.changes c
        WHERE c.id = change_history.change_id AND c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd

-- requeue moves dead (and, if asked, rejected) changes back to pending with a
-- fresh attempt budget. SECURITY DEFINER so stagesync_admin needs no write
-- privilege on the tables; the actor recorded is the login (session_user).
-- Concurrent calls are safe: a row moved by one call no longer matches the
-- status filter when the other re-checks it after the row lock.
-- +goose StatementBegin
CREATE FUNCTION stagesync.requeue(
    ids bigint[] DEFAULT NULL,
    target text DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    include_rejected boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    moved integer;
BEGIN
    IF requeue.since IS NOT NULL AND requeue.until IS NOT NULL AND requeue.since > requeue.until THEN
        RAISE EXCEPTION 'requeue: since (%) is after until (%)', requeue.since, requeue.until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF requeue.target IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM stagesync.targets t WHERE t.name = requeue.target) THEN
        RAISE EXCEPTION 'requeue: unknown target %', quote_literal(requeue.target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH m AS (
        UPDATE stagesync.changes c
        SET status = 'pending', attempts = 0, last_error = NULL,
            finished_at = NULL, applied_etag = NULL
        WHERE (c.status = 'dead' OR (requeue.include_rejected AND c.status = 'rejected'))
          AND (requeue.ids IS NULL OR c.id = ANY (requeue.ids))
          AND (requeue.target IS NULL OR c.target = requeue.target)
          AND (requeue.since IS NULL OR c.finished_at >= requeue.since)
          AND (requeue.until IS NULL OR c.finished_at < requeue.until)
        RETURNING 1
    )
    SELECT count(*) INTO moved FROM m;

    INSERT INTO stagesync.admin_actions (actor, action, params, affected)
    VALUES (session_user, 'requeue',
            jsonb_strip_nulls(jsonb_build_object(
                'ids', requeue.ids, 'target', requeue.target,
                'since', requeue.since, 'until', requeue.until,
                'include_rejected', requeue.include_rejected)),
            moved);

    IF moved > 0 THEN
        PERFORM pg_notify('stagesync_changes', 'REQUEUE');
    END IF;
    RETURN moved;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean);
DROP FUNCTION stagesync.change_history(bigint);
DROP VIEW stagesync.dead_letters;
DROP VIEW stagesync.backlog;
DROP VIEW stagesync.conflict_rates;
DROP FUNCTION stagesync.conflict_rates_since(timestamptz);
